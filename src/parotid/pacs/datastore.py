"""A study-grouping DICOMweb datastore for MONAI Label.

MONAI Label's stock ``DICOMWebDatastore`` serves one *series* per image, downloads dcmqi at start-up
and filters CT. This datastore serves one *study* per image:

* image id = StudyInstanceUID; ``list_images`` is a QIDO-RS study search (default: MR studies);
* the study's series are mapped to sequence keys by SeriesDescription (deployment patterns, then
  ``parotid.sequences.match_sequence``); duplicates -> latest SeriesNumber; unknown series are ignored;
* ``get_image_uri`` fetches each chosen series (WADO-RS), converts it in a contained child process
  (``parotid.safe_read``: a reader crash is a 422; geometry checked, Enhanced MR by its per-frame
  geometry, see ``parotid.pacs.convert``), assembles the
  study on the reference grid (``parotid.study.assemble_study``) and caches the study file under
  ``<cache>/<hash(url)>/studies/<StudyInstanceUID>.nii.gz``; the cache entry is keyed by the
  StudyInstanceUID and the chosen series UIDs + instance counts, so a new/changed series refetches;
* labels are kept in a LocalDatastore index in the cache folder (``datastore_v2.json``), so
  ``save_label``, ``next_sample``, ``datalist`` and ``/datastore`` work as with a local folder; final
  labels are also written back to the PACS as DICOM SEG referencing the reference series (optional);
* ``write_classification(study_uid, result, write_sr)`` stores a classification result as a DICOM SR, once
  per (study, model checkpoint, source series, box).

No patient attributes are stored in the index or written to logs.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional

import pydicom
import requests
import SimpleITK as sitk
from filelock import FileLock
from pydicom.dataset import Dataset

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException

from parotid.label_validation import check_label_info, validate_label
from parotid.pacs.client import make_client, phi_safe_id
from parotid.pacs.convert import (MIXED_DWI, StudyGrouping, datasets_to_image, group_series, load_patterns,
                                  series_info_from_qido, split_dwi)
from parotid.pacs import writeback
from parotid.sequences import DIFFUSION, DWI_KEYS, SEQUENCE_KEYS, reference_key
from parotid.study import NotFoundError, StudyError, assemble_study, read_study, write_study

logger = logging.getLogger(__name__)

DEFAULT_FILTER = {"Modality": "MR"}


class StudyNotFound(NotFoundError):
    """The PACS has no such study (``get_image_uri`` returns "" for it, like LocalDatastore)."""
SERIES_FIELDS = ["SeriesDescription", "SeriesNumber", "Modality", "NumberOfSeriesRelatedInstances"]


def qido_all(search, page: int = 500, **kw) -> list[dict]:
    """All QIDO-RS results, paging with limit/offset. (dicomweb_client's ``get_remaining`` loops forever
    on servers that ignore ``offset`` without ``limit``; a page that repeats the previous one stops too.)"""
    out: list[dict] = []
    seen_first = None
    offset = 0
    while True:
        sub = search(limit=page, offset=offset, **kw)
        if not sub:
            break
        first = json.dumps(sub[0], sort_keys=True)
        if first == seen_first:
            break
        seen_first = first
        out.extend(sub)
        if len(sub) < page:
            break
        offset += len(sub)
    return out


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


class ParotidDICOMwebDatastore(LocalDatastore):
    def __init__(
        self,
        client,
        cache_dir: str,
        search_filter: Optional[Dict[str, Any]] = None,
        sequence_patterns=None,
        reference: Optional[str] = None,
        writeback_labels: bool = True,
        list_ttl: float = 30.0,
    ):
        self._client = client
        self._filter = dict(search_filter if search_filter is not None else DEFAULT_FILTER)
        self._patterns = load_patterns(sequence_patterns)
        if reference is not None and reference not in SEQUENCE_KEYS:
            raise ValueError(f"reference sequence {reference!r} unknown; known {list(SEQUENCE_KEYS)}")
        self._reference = reference
        self._writeback = writeback_labels
        self._list_ttl = float(list_ttl)
        self._list_cache: tuple[float, list[str]] | None = None
        self._mutex = threading.RLock()
        os.makedirs(cache_dir, exist_ok=True)
        self._cache_dir = cache_dir
        super().__init__(
            datastore_path=cache_dir, images_dir="studies", labels_dir="labels",
            extensions=("*.nii.gz",), auto_reload=False,
        )
        self._datastore.name = "parotid-dicomweb"
        self._datastore.description = f"DICOMweb studies at {self._safe_url()} (one image per StudyInstanceUID)"
        logger.info("DICOMweb study datastore: %s; cache %s; filter %s", self._safe_url(), cache_dir, self._filter)

    # ------------------------------------------------------------------ helpers
    def _safe_url(self) -> str:
        return str(self._client.base_url)

    def name(self) -> str:
        return self._datastore.name

    def _study_filter(self) -> Dict[str, Any]:
        f = dict(self._filter)
        if "Modality" in f:  # a study-level search filters on the modalities in the study
            f["ModalitiesInStudy"] = f.pop("Modality")
        return f

    def _series_modalities(self) -> tuple[str, ...]:
        m = self._filter.get("Modality") or self._filter.get("ModalitiesInStudy")
        if not m:
            return ()
        return tuple(m) if isinstance(m, (list, tuple)) else tuple(str(m).replace("\\", ",").split(","))

    def _remote_studies(self) -> list[str]:
        with self._mutex:
            now = time.monotonic()
            if self._list_cache and now - self._list_cache[0] < self._list_ttl:
                return self._list_cache[1]
            res = qido_all(self._client.search_for_studies, search_filters=self._study_filter(),
                           fields=["StudyInstanceUID"])
            uids = sorted({str(Dataset.from_json(r).StudyInstanceUID) for r in res})
            self._list_cache = (now, uids)
            logger.info("PACS lists %d studies", len(uids))
            return uids

    def invalidate(self) -> None:
        """Forget the cached study list (e.g. after uploading studies)."""
        with self._mutex:
            self._list_cache = None

    def grouping(self, study_uid: str) -> StudyGrouping:
        res = qido_all(self._client.search_for_series, study_instance_uid=study_uid, fields=SERIES_FIELDS)
        series = [series_info_from_qido(Dataset.from_json(r)) for r in res]
        if not series:
            raise StudyNotFound(f"study {study_uid} not found on the PACS")
        g = group_series(study_uid, series, self._patterns, self._series_modalities())
        if not g.sequences:
            seen = sorted({s.description or "<no SeriesDescription>" for s in series})
            raise StudyError(
                f"study {study_uid}: no series with a recognisable MR sequence ({len(series)} series; descriptions "
                f"{seen[:8]}); known sequences {list(SEQUENCE_KEYS)} — add SeriesDescription patterns with "
                f"--conf dicomweb_sequence_patterns"
            )
        return g

    def _study_path(self, study_uid: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), f"{study_uid}.nii.gz"))

    def _headers_dir(self, study_uid: str) -> str:
        return os.path.join(self._cache_dir, "headers", study_uid)

    # ------------------------------------------------------------------ images
    def list_images(self) -> List[str]:
        try:
            return self._remote_studies()
        except (requests.RequestException, OSError) as e:
            logger.warning("PACS unreachable (%s); listing cached studies only", type(e).__name__)
            return super().list_images()

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        labeled = set(self.get_labeled_images())
        return [s for s in self.list_images() if s not in labeled]

    def get_image_uri(self, image_id: str) -> str:
        study_uid = image_id
        path = self._study_path(study_uid)
        try:
            g = self.grouping(study_uid)
        except StudyNotFound:
            logger.info("study %s not on the PACS", study_uid)
            return ""
        except (requests.RequestException, OSError) as e:
            if study_uid in self._datastore.objects and os.path.exists(path):
                logger.warning("PACS unreachable (%s); serving cached study %s", type(e).__name__, study_uid)
                return path
            if isinstance(e, requests.HTTPError) and e.response is not None and e.response.status_code in (401, 403):
                raise StudyError("the PACS refused the datastore's credentials") from None
            raise StudyError(f"PACS unreachable and study {study_uid} is not cached") from None
        key = g.cache_key()
        with FileLock(os.path.join(self._cache_dir, f".{phi_safe_id(study_uid)}.lock")):
            self._init_from_datastore_file()
            obj = self._datastore.objects.get(study_uid)
            if obj and obj.image.info.get("cache_key") == key and os.path.exists(path):
                return path
            self._fetch_and_convert(g, key)
        return path

    def _fetch_and_convert(self, g: StudyGrouping, key: str) -> None:
        t0 = time.perf_counter()
        study_uid = g.study_uid
        present = [k for k in g.sequences if k != MIXED_DWI]
        if MIXED_DWI in g.sequences:
            present += [k for k in DWI_KEYS if k not in present]
        ref_key = self._reference if self._reference in present else reference_key(present)
        volumes: dict[str, sitk.Image] = {}
        series_of: dict[str, str] = {}
        ref_datasets: dict[str, list] = {}
        n_inst = 0
        # dedicated series first, so that a mixed diffusion series only fills the b-values still missing
        for seq, s in sorted(g.sequences.items(), key=lambda kv: kv[0] == MIXED_DWI):
            datasets = self._client.retrieve_series(study_uid, s.series_uid)
            n_inst += len(datasets)
            parts = split_dwi(datasets, name=f"diffusion series {s.series_uid}") if seq == MIXED_DWI else {seq: datasets}
            for seq_key, dsets in parts.items():
                if seq_key in volumes:
                    continue
                volumes[seq_key] = datasets_to_image(dsets, name=f"{seq_key} series")
                series_of[seq_key] = s.series_uid
                if seq_key == ref_key or seq_key in DIFFUSION:
                    ref_datasets[seq_key] = dsets  # fallback references when an expected b-value is missing
        if ref_key not in volumes:
            ref_key = reference_key(list(volumes))
        self._save_headers(self._headers_dir(study_uid), series_of[ref_key], ref_datasets[ref_key])
        study = assemble_study(volumes, reference=ref_key)
        with tempfile.TemporaryDirectory(dir=self._cache_dir, prefix=".tmp-") as tmp:
            tmp_path = os.path.join(tmp, f"{study_uid}.nii.gz")
            write_study(study, tmp_path)
            info = {
                "StudyInstanceUID": study_uid,
                "sequences": list(study.sequences),
                "series": series_of,
                "reference_sequence": ref_key,
                "reference_series": series_of[ref_key],
                "ignored_series": len(g.ignored),
                "cache_key": key,
                "source": "dicomweb",
            }
            self.add_image(study_uid, tmp_path, info)
        logger.info("study %s fetched: %s (%d instances, %d ignored series) in %.2fs",
                    study_uid, ",".join(study.sequences), n_inst, len(g.ignored), time.perf_counter() - t0)

    @staticmethod
    def _save_headers(folder: str, series_uid: str, datasets) -> None:
        """Keep the reference series' headers (no pixel data) for SEG/SR write-back."""
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        for i, ds in enumerate(datasets):
            h = pydicom.Dataset(ds)
            h.file_meta = ds.file_meta
            for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if tag in h:
                    del h[tag]
            h.save_as(os.path.join(folder, f"{i:05d}.dcm"), write_like_original=False)
        with open(os.path.join(folder, "series.json"), "w") as f:
            json.dump({"SeriesInstanceUID": series_uid}, f)

    def reference_headers(self, study_uid: str, resolved: bool = False) -> list[Dataset]:
        """Headers of the study's reference (source) series, fetching the study first if needed
        (`resolved`: this request's ``get_image_uri`` has fetched it already)."""
        if not resolved and not self.get_image_uri(study_uid):
            raise StudyError(f"study {study_uid} not found on the PACS")
        folder = self._headers_dir(study_uid)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".dcm")) if os.path.isdir(folder) else []
        if not files:
            raise StudyError(f"study {study_uid}: reference series headers missing from the cache")
        return [pydicom.dcmread(os.path.join(folder, f)) for f in files]

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        info = super().get_image_info(image_id)
        if not info:
            info = {"StudyInstanceUID": image_id, "fetched": False}
        return info

    # ------------------------------------------------------------------ labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = "") -> str:
        if image_id not in self._datastore.objects:
            self.get_image_uri(image_id)  # labels attach to a cached study ("" if not on the PACS)
        if image_id not in self._datastore.objects:
            raise ImageNotFoundException(f"Image {image_id} not found")
        if not isinstance(label_info or {}, dict):
            raise StudyError(f"label info must be a JSON object, got {type(label_info).__name__}")
        label_info = dict(label_info or {})
        # the same rules as the study-folder datastore, before anything is stored or sent to the PACS
        validate_label(label_filename, read_study(self.get_image_uri(image_id), image_id), label_info)
        if label_tag == DefaultLabelTag.FINAL and self._writeback:
            try:
                headers = self.reference_headers(image_id)
                seg = writeback.write_seg(label_filename, headers)
                writeback.store(self._client, seg)
                label_info["seg_series_uid"] = str(seg.SeriesInstanceUID)
                logger.info("final label of study %s written to the PACS as SEG", image_id)
            except Exception as e:  # noqa: BLE001 - the local label must still be saved
                label_info["pacs_writeback_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                logger.error("SEG write-back failed for study %s: %s", image_id, label_info["pacs_writeback_error"])
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            raise NotFoundError(f"study '{label_id}' has no label with tag '{label_tag}'")
        return label.info

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        self.get_label_info(label_id, label_tag)  # 404 for an unknown study or tag
        if not isinstance(info or {}, dict):
            raise StudyError(f"label info must be a JSON object, got {type(info).__name__}")
        info = dict(info or {})
        # the study file is cached: the label exists
        check_label_info(info, read_study(self._study_path(label_id)).shape if info.get("roi") is not None else None)
        super().update_label_info(label_id, label_tag, info)

    def write_classification(self, image_id: str, result: Dict[str, Any], write_sr: str = "auto",
                             study_path: Optional[str] = None) -> Dict[str, Any]:
        """Store a classification result as a DICOM SR referencing the reference series, at most once per
        (study, model checkpoint, source series, box): the SR's UIDs are derived from those
        (``writeback.sr_uids``) and looked up on the PACS first. ``write_sr`` (``auto``, ``always``,
        ``never``): see ``writeback.sr_skip_reason``. `study_path`: the study file this request's
        ``get_image_uri`` returned (the study is not looked up on the PACS again). Returns
        ``{"series_uid", "sop_instance_uid", "status": "written" | "reused" | "skipped", "reason"}``."""
        r = writeback.normalise_result(result)
        reason = writeback.sr_skip_reason(r, write_sr)
        if reason:
            return {"series_uid": None, "sop_instance_uid": None, "status": "skipped", "reason": reason}
        headers = self.reference_headers(image_id, resolved=bool(study_path))
        series_uid, sop_uid = writeback.sr_uids(image_id, r, str(headers[0].SeriesInstanceUID))
        out = {"series_uid": series_uid, "sop_instance_uid": sop_uid}
        reused = dict(out, status="reused", reason="the PACS already holds this model checkpoint's SR of this study "
                                                   "(same source series and box)")
        with FileLock(os.path.join(self._cache_dir, f".{phi_safe_id(image_id)}.sr.lock")):  # one replica: one STOW
            if self._sr_stored(image_id, series_uid, sop_uid):
                return reused
            grid = read_study(study_path or self._study_path(image_id)).reference
            sr = writeback.write_classification_sr(result, headers, reference_grid=grid)
            try:
                writeback.store(self._client, sr)
            except (RuntimeError, requests.HTTPError):
                if self._sr_stored(image_id, series_uid, sop_uid):  # another replica stored it first
                    return reused
                raise
        logger.info("classification of study %s written to the PACS as SR", image_id)
        return dict(out, status="written", reason=None)

    def _sr_stored(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        found = self._client.search_for_instances(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                                  search_filters={"SOPInstanceUID": sop_uid},
                                                  fields=["SOPInstanceUID"])
        return any(str(Dataset.from_json(f).get("SOPInstanceUID", "")) == sop_uid for f in found or [])

    # ------------------------------------------------------------------ listing
    def status(self) -> Dict[str, Any]:
        s = super().status()
        s["total"] = len(self.list_images())
        s["cached"] = len(self._datastore.objects)
        return s

    def json(self):
        d = super().json()
        for uid in self.list_images():
            d["objects"].setdefault(uid, {"image": {"ext": ".nii.gz", "info": {"StudyInstanceUID": uid, "fetched": False}},
                                          "labels": {}})
        return d


# ---------------------------------------------------------------------- entry point
def _conf(conf: dict, key: str, env: str, default=None):
    v = (conf or {}).get(key)
    if v in (None, ""):
        v = os.environ.get(env, "")
    return v if v not in (None, "") else default


def make_dicomweb_datastore(studies_url: str, conf: dict) -> ParotidDICOMwebDatastore:
    """Entry point for ``apps/parotid/main.py`` when ``--studies`` is an http(s) DICOMweb URL.

    Conf keys (``--conf KEY VALUE``; environment fallback in brackets):
      dicomweb_cache_dir        [PAROTID_DICOMWEB_CACHE, MONAI_LABEL_DATASTORE_CACHE_PATH] default ~/.cache/parotid/dicomweb
      dicomweb_filter           [PAROTID_DICOMWEB_FILTER] QIDO filter JSON, default {"Modality": "MR"}
      dicomweb_sequence_patterns[PAROTID_SEQUENCE_PATTERNS] JSON or JSON file {key: [fnmatch patterns]}
      dicomweb_reference        [PAROTID_DICOMWEB_REFERENCE] reference sequence key (default: CET1, else T2 ...)
      dicomweb_writeback        [PAROTID_DICOMWEB_WRITEBACK] "true": final labels -> DICOM SEG on the PACS
      dicomweb_list_ttl         [PAROTID_DICOMWEB_LIST_TTL] seconds the study list is cached (default 30)
    Credentials only from the environment: MONAI_LABEL_DATASTORE_USERNAME / _PASSWORD (or the
    MONAI_LABEL_DICOMWEB_* names).
    """
    url = studies_url.rstrip("/").strip()
    client = make_client(url)
    cache_root = _conf(conf, "dicomweb_cache_dir", "PAROTID_DICOMWEB_CACHE") or os.environ.get(
        "MONAI_LABEL_DATASTORE_CACHE_PATH") or os.path.join(pathlib.Path.home(), ".cache", "parotid", "dicomweb")
    cache_dir = os.path.join(os.path.expanduser(cache_root), phi_safe_id(url))
    flt = _conf(conf, "dicomweb_filter", "PAROTID_DICOMWEB_FILTER")
    flt = json.loads(flt) if isinstance(flt, str) else flt
    ds = ParotidDICOMwebDatastore(
        client,
        cache_dir,
        search_filter=flt if flt is not None else DEFAULT_FILTER,
        sequence_patterns=_conf(conf, "dicomweb_sequence_patterns", "PAROTID_SEQUENCE_PATTERNS"),
        reference=_conf(conf, "dicomweb_reference", "PAROTID_DICOMWEB_REFERENCE"),
        writeback_labels=_truthy(_conf(conf, "dicomweb_writeback", "PAROTID_DICOMWEB_WRITEBACK", "true")),
        list_ttl=float(_conf(conf, "dicomweb_list_ttl", "PAROTID_DICOMWEB_LIST_TTL", 30)),
    )
    try:  # fail fast on wrong credentials; an unreachable PACS only warns (cached studies still work)
        ds._remote_studies()
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else None
        if code in (401, 403):
            raise RuntimeError(
                f"the PACS at {url} refused the credentials (HTTP {code}); set MONAI_LABEL_DATASTORE_USERNAME / "
                "MONAI_LABEL_DATASTORE_PASSWORD") from None
        logger.warning("PACS study search failed (HTTP %s); continuing with the cache", code)
    except (requests.RequestException, OSError) as e:
        logger.warning("PACS unreachable at start-up (%s); continuing with the cache", type(e).__name__)
    return ds
