"""Series grouping (SeriesDescription -> sequence key) and DICOM series -> SimpleITK conversion."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset

from parotid.sequences import SEQUENCE_KEYS, match_sequence
from parotid.study import StudyError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- grouping
# A diffusion series holding several b-values (one series, b=0 and b=1000 images at the same positions,
# as most scanners store it) has no single sequence key: it is grouped as MIXED_DWI and split by
# DiffusionBValue (0018,9087) after download (``split_dwi``).
MIXED_DWI = "DWI*"
DWI_PATTERNS = ("*dwi*", "*diff*", "*ep2d*", "*trace*")
@dataclass
class SeriesInfo:
    series_uid: str
    description: str
    modality: str
    number: int | None
    n_instances: int | None
    sequence: str | None = None


@dataclass
class StudyGrouping:
    study_uid: str
    sequences: dict[str, SeriesInfo] = field(default_factory=dict)  # key -> chosen series
    ignored: list[SeriesInfo] = field(default_factory=list)  # unrecognised or superseded series

    def cache_key(self) -> str:
        import hashlib

        parts = [self.study_uid] + [
            f"{k}={s.series_uid}:{s.n_instances}" for k, s in sorted(self.sequences.items())
        ]
        return hashlib.sha1("|".join(parts).encode()).hexdigest()


def load_patterns(spec) -> dict[str, tuple[str, ...]]:
    """Deployment overrides of SeriesDescription patterns: a dict or a JSON string / file path
    mapping sequence key -> list of case-insensitive fnmatch patterns (checked before the defaults)."""
    if not spec:
        return {}
    if isinstance(spec, str):
        spec = spec.strip()
        if os.path.isfile(spec):
            with open(spec) as f:
                spec = json.load(f)
        else:
            spec = json.loads(spec)
    out = {}
    for key, pats in dict(spec).items():
        if key not in SEQUENCE_KEYS:
            raise ValueError(f"sequence pattern override names unknown sequence {key!r}; known {list(SEQUENCE_KEYS)}")
        out[key] = tuple(p.lower() for p in ([pats] if isinstance(pats, str) else pats))
    return out


def classify_series(description: str, patterns: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """Sequence key of a SeriesDescription: deployment patterns first (most specific wins), then
    ``parotid.sequences.match_sequence``."""
    low = (description or "").strip().lower()
    best = None
    for key, pats in (patterns or {}).items():
        for p in pats:
            if fnmatch.fnmatchcase(low, p):
                spec = len(p.replace("*", ""))
                if best is None or spec > best[0]:
                    best = (spec, key)
    if best:
        return best[1]
    key = match_sequence(low) if low else None
    if key is None and any(fnmatch.fnmatchcase(low, p) for p in DWI_PATTERNS):
        return MIXED_DWI
    return key


def _val(ds: Dataset, name: str, default=None):
    v = ds.get(name, None)
    if v is None or v == "":
        return default
    return v


def series_info_from_qido(ds: Dataset) -> SeriesInfo:
    n = _val(ds, "NumberOfSeriesRelatedInstances")
    num = _val(ds, "SeriesNumber")
    return SeriesInfo(
        series_uid=str(ds.SeriesInstanceUID),
        description=str(_val(ds, "SeriesDescription", "")),
        modality=str(_val(ds, "Modality", "")),
        number=int(num) if num is not None else None,
        n_instances=int(n) if n is not None else None,
    )


def group_series(study_uid: str, series: Iterable[SeriesInfo], patterns=None, modalities=("MR",)) -> StudyGrouping:
    """Map the series of one study to sequence keys. When several series match the same key the one
    with the highest SeriesNumber (the latest acquisition) wins; the others are listed as ignored."""
    g = StudyGrouping(study_uid)
    for s in series:
        if modalities and s.modality and s.modality not in modalities:
            g.ignored.append(s)
            continue
        s.sequence = classify_series(s.description, patterns)
        if s.sequence is None:
            g.ignored.append(s)
            continue
        cur = g.sequences.get(s.sequence)
        if cur is None or (s.number or -1) > (cur.number or -1):
            if cur is not None:
                g.ignored.append(cur)
            g.sequences[s.sequence] = s
        else:
            g.ignored.append(s)
    # a multi-b-value series is only used for the b-values no dedicated series provides
    if MIXED_DWI in g.sequences and "DWI_B0" in g.sequences and "DWI_B1000" in g.sequences:
        g.ignored.append(g.sequences.pop(MIXED_DWI))
    return g


def b_value(ds: Dataset) -> float | None:
    v = ds.get("DiffusionBValue", None)
    if v is None:
        for item in ds.get("MRDiffusionSequence", []) or []:
            if "DiffusionBValue" in item:
                v = item.DiffusionBValue
    try:
        return float(v) if v is not None and v != "" else None
    except (TypeError, ValueError):
        return None


def split_dwi(datasets: Sequence[Dataset], name: str = "DWI series") -> dict[str, list[Dataset]]:
    """Split a multi-b-value diffusion series into {"DWI_B0": [...], "DWI_B1000": [...]} by DiffusionBValue
    (b0: the lowest b <= 50; b1000: the b closest to 1000 within 500..1500). Raises StudyError if the
    instances carry no b-values."""
    by_b: dict[float, list[Dataset]] = {}
    for ds in datasets:
        b = b_value(ds)
        if b is None:
            raise StudyError(f"{name}: diffusion series without DiffusionBValue; cannot tell b0 from b1000 "
                             "(store one series per b-value or add SeriesDescription patterns)")
        by_b.setdefault(b, []).append(ds)
    out: dict[str, list[Dataset]] = {}
    low = [b for b in by_b if b <= 50]
    if low:
        out["DWI_B0"] = by_b[min(low)]
    high = [b for b in by_b if 500 <= b <= 1500]
    if high:
        out["DWI_B1000"] = by_b[min(high, key=lambda b: abs(b - 1000))]
    if not out:
        raise StudyError(f"{name}: b-values {sorted(by_b)} include neither b0 nor b~1000")
    return out


# --------------------------------------------------------------------------- conversion
def datasets_to_image(datasets: Sequence[Dataset], name: str = "series") -> sitk.Image:
    """Convert the instances of one series to a 3D SimpleITK image (GDCM sorts slices by position).

    The instances are written to a temporary folder and read with ``sitk.ImageSeriesReader``, which
    handles rescale slope/intercept, compressed transfer syntaxes and multi-frame files. Failures become
    ``StudyError`` with a user-facing message."""
    if not datasets:
        raise StudyError(f"{name}: the series has no instances")
    series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
    with tempfile.TemporaryDirectory(prefix="parotid-series-") as tmp:
        for i, ds in enumerate(datasets):
            if "PixelData" not in ds and "FloatPixelData" not in ds:
                raise StudyError(f"{name}: instance {i} has no pixel data (not an image series)")
            path = os.path.join(tmp, f"{i:05d}.dcm")
            try:
                if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
                    ds.file_meta = ds.file_meta if getattr(ds, "file_meta", None) else pydicom.dataset.FileMetaDataset()
                    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
                    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(path, write_like_original=False)
            except Exception as e:  # noqa: BLE001 - anything pydicom raises on malformed input
                raise StudyError(f"{name}: cannot write instance {i} ({type(e).__name__}: {str(e)[:120]})") from None
        return read_series_folder(tmp, series_uid, name)


def read_series_folder(folder: str, series_uid: str = "", name: str = "series") -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        files = reader.GetGDCMSeriesFileNames(folder, series_uid) if series_uid else reader.GetGDCMSeriesFileNames(folder)
        if not files:
            files = reader.GetGDCMSeriesFileNames(folder)
        if not files:
            raise StudyError(f"{name}: no readable DICOM image in the series")
        reader.SetFileNames(files)
        img = reader.Execute()
    except RuntimeError as e:
        msg = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise StudyError(f"{name}: DICOM series could not be converted ({(msg[-1] if msg else 'unknown error')[:160]})") from None
    if img.GetDimension() == 2:
        raise StudyError(f"{name}: a single 2D image of size {list(img.GetSize())}, not a 3D series")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError(f"{name}: colour/multi-component images are not MR sequences")
    if min(img.GetSize()) < 2:
        raise StudyError(f"{name}: volume of size {list(img.GetSize())} is not 3D (a single slice?)")
    if not np.isfinite(sitk.GetArrayViewFromImage(img)).all():
        raise StudyError(f"{name}: contains NaN or infinite voxels")
    return img
