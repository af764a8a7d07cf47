"""Write a synthetic cohort folder (layout: docs/dev/CONTRACT.md "Study folder").

::

    DIR/<study_id>.nii.gz               study (vector NIfTI on the reference grid, int16)
    DIR/labels/final/<study_id>.nii.gz  uint8 label map (0 bg, 1 gland, 2 tumour)
    DIR/datastore_v2.json               written by MONAI Label's LocalDatastore (save_label)
    DIR/cohort.csv                      one row per study (clinical variables, class, roi, split)
    DIR/raw/<study_id>/<SEQ>.nii.gz     native acquisitions (unless raw=False)
    DIR/dicom/<study_id>/<SEQ>/*.dcm    with dicom=True

ALL DATA ARE SYNTHETIC.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from parotid.study import copy_geometry, write_study
from parotid.synth.phantom import Rendered, generate, study_id

CSV_FIELDS = ["study_id", "tumor_class", "age", "sex", "smoker", "side", "n_tumors", "roi", "split", "size_mm",
              "ill_defined", "sequences", "missing", "reference", "seed", "index", "synthetic", "site"]


class CohortError(ValueError):
    """Bad output folder or arguments (message for the user)."""


@dataclass
class Summary:
    out: str
    study_ids: list
    seconds: float           # everything
    seconds_studies: float   # rendering + writing the studies (without the datastore indexing)


def _is_cohort(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cohort.csv")) or os.path.exists(os.path.join(path, "datastore_v2.json"))


def prepare_out(out: str, overwrite: bool = False, append: bool = False) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CohortError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if append:
            if not _is_cohort(out):
                raise CohortError(f"--append: {out} is not a parotid-synth cohort (no cohort.csv)")
            return
        if not overwrite:
            raise CohortError(f"output folder {out} exists and is not empty (use --overwrite to replace it, "
                              f"or --append to add studies to a cohort)")
        if not _is_cohort(out):
            raise CohortError(f"refusing to --overwrite {out}: it is not a parotid-synth cohort (no cohort.csv)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)


def _int16(img: sitk.Image) -> sitk.Image:
    arr = np.clip(np.rint(sitk.GetArrayViewFromImage(img)), -32768, 32767).astype(np.int16)
    return copy_geometry(sitk.GetImageFromArray(arr), img)


def label_image(r: Rendered) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(r.label.T))
    return copy_geometry(img, r.study.reference)


def label_info(r: Rendered) -> dict:
    c = r.case
    return {"tumor_class": c.tumor_class, "roi": list(r.roi), "synthetic": True, "sequences": list(c.sequences),
            "n_tumors": c.n_tumors, "side": c.side, "size_mm": c.size_mm, "reference": c.extra["reference"],
            "site": c.extra["profile"].name}


def csv_row(r: Rendered) -> dict:
    c = r.case
    return {"study_id": c.study_id, "tumor_class": c.tumor_class, "age": c.age, "sex": c.sex,
            "smoker": int(c.smoker), "side": c.side, "n_tumors": c.n_tumors, "roi": json.dumps(list(r.roi)),
            "split": c.split, "size_mm": c.size_mm, "ill_defined": int(c.ill_defined),
            "sequences": ",".join(c.sequences), "missing": c.missing or "", "reference": c.extra["reference"],
            "seed": c.seed, "index": c.index, "synthetic": 1, "site": c.extra["profile"].name}


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: r["study_id"])
    tmp = path + ".part"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    os.replace(tmp, path)


def write_cohort(out: str, n: int, seed: int, start: int = 0, raw: bool = True, dicom: bool = False,
                 overwrite: bool = False, append: bool = False, keep=(), progress: bool = True,
                 profile: str = "default") -> Summary:
    """Generate studies ``start .. start+n-1`` of cohort `seed` into `out` with acquisition `profile`
    (``parotid.synth.profiles``; the ``site`` column of cohort.csv)."""
    if n <= 0:
        raise CohortError(f"--n must be a positive number of studies, got {n}")
    if start < 0:
        raise CohortError(f"--start must be >= 0, got {start}")
    if seed < 0:
        raise CohortError(f"--seed must be >= 0, got {seed}")
    from parotid.synth.profiles import PROFILES

    if profile not in PROFILES:
        raise CohortError(f"--profile: unknown acquisition profile {profile!r}; known: {sorted(PROFILES)}")
    out = os.path.abspath(out)
    prepare_out(out, overwrite=overwrite, append=append)
    ids = [study_id(seed, i) for i in range(start, start + n)]
    clash = [s for s in ids if os.path.exists(os.path.join(out, s + ".nii.gz"))]
    if clash:
        raise CohortError(f"{len(clash)} studies already exist in {out} (e.g. {clash[0]}); pick another --start or --seed")

    from tqdm import tqdm

    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix=".synth_tmp", dir=out)
    rows, infos = [], {}
    try:
        for i in tqdm(range(start, start + n), desc="parotid-synth (synthetic)", unit="study", disable=not progress):
            r = generate(seed, i, keep, profile)
            sid = r.case.study_id
            write_study(r.study, os.path.join(out, sid + ".nii.gz"), as_int16=True)
            sitk.WriteImage(label_image(r), os.path.join(tmp, sid + ".nii.gz"), useCompression=True)
            if raw:
                d = os.path.join(out, "raw", sid)
                os.makedirs(d, exist_ok=True)
                for key, img in r.raw.items():
                    sitk.WriteImage(_int16(img), os.path.join(d, key + ".nii.gz"), useCompression=True)
            if dicom:
                from parotid.synth.dicom import write_dicom_study

                write_dicom_study(r, os.path.join(out, "dicom", sid))
            rows.append(csv_row(r))
            infos[sid] = label_info(r)
        t_studies = time.time() - t0
        _register(out, tmp, infos)
        old = read_csv(os.path.join(out, "cohort.csv")) if append and os.path.exists(os.path.join(out, "cohort.csv")) else []
        write_csv(os.path.join(out, "cohort.csv"), old + rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Summary(out, ids, time.time() - t0, t_studies)


def _register(out: str, label_dir: str, infos: dict) -> None:
    """Index studies and final labels with MONAI Label's own LocalDatastore.

    LocalDatastore lists ``*.nii.gz`` directly under `out` (``os.listdir`` + fnmatch, not
    recursive), so ``raw/``, ``dicom/`` and the temporary label folder are never taken for images;
    ``save_label`` copies the label file to ``labels/final/<image_id>.nii.gz``.
    """
    from monailabel.datastore.local import LocalDatastore

    logging.getLogger("monailabel").setLevel(logging.WARNING)
    ds = LocalDatastore(out, extensions=("*.nii.gz",), auto_reload=False)
    known = set(ds.list_images())
    for sid, info in infos.items():
        if sid not in known:
            raise CohortError(f"LocalDatastore did not index {sid}")
        ds.update_image_info(sid, {"synthetic": True, "sequences": info["sequences"]})
        ds.save_label(sid, os.path.join(label_dir, sid + ".nii.gz"), "final", dict(info))
