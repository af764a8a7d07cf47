"""parotid-import: bring-your-own cohort (per-sequence NIfTI / DICOM + label table) -> study folder."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parotid.cohort import load_cohort
from parotid.study import read_study

BIN = Path(sys.executable).parent
HUMAN_NAMES = {"T2": "t2_tse_fs_axial.nii.gz", "CET1": "T1 post gad VIBE.nii.gz", "ADC": "ep2d_diff_ADC.nii.gz",
               "T1": "t1_tse.nii.gz", "DWI_B0": "dwi_b0.nii.gz", "DWI_B1000": "dwi_b1000.nii.gz"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "c"
    subprocess.run([str(BIN / "parotid-synth"), "--out", str(out), "--n", "3", "--seed", "555", "--quiet"], check=True)
    return out


def _byo(synth: Path, dst: Path, rows: list[dict]) -> Path:
    src = dst / "cohort"
    for item in load_cohort(str(synth)):
        d = src / item.study_id
        d.mkdir(parents=True)
        for f in (synth / "raw" / item.study_id).glob("*.nii.gz"):
            key = f.name[: -len(".nii.gz")]
            shutil.copy(f, d / HUMAN_NAMES[key])
        shutil.copy(item.label, d / "label.nii.gz")
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["study_id", "tumor_class", "age", "sex", "smoker"])
        w.writeheader()
        w.writerows(rows)
    return src


def test_import_reproduces_the_study_and_its_labels(synth, tmp_path):
    items = load_cohort(str(synth))
    rows = [{"study_id": it.study_id, "tumor_class": it.tumor_class, "age": 50, "sex": "F", "smoker": 0} for it in items]
    src = _byo(synth, tmp_path, rows)
    out = tmp_path / "studies"
    r = subprocess.run([str(BIN / "parotid-import"), "--src", str(src), "--table", str(tmp_path / "labels.csv"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    imported = {it.study_id: it for it in load_cohort(str(out))}
    assert set(imported) == {it.study_id for it in items}
    for it in items:
        a, b = read_study(it.image), read_study(imported[it.study_id].image)
        assert a.sequences == b.sequences and a.shape == b.shape
        assert np.allclose(a.image.GetOrigin(), b.image.GetOrigin(), atol=1e-3)
        # the synthetic study was stored as int16: values agree to rounding
        assert np.abs(a.array() - b.array()).max() <= 0.51
        assert imported[it.study_id].tumor_class == it.tumor_class
        assert imported[it.study_id].roi is not None


def test_import_reports_bad_studies_and_keeps_the_good_ones(synth, tmp_path):
    items = load_cohort(str(synth))
    rows = [{"study_id": items[0].study_id, "tumor_class": items[0].tumor_class},
            {"study_id": items[1].study_id, "tumor_class": "oncocytoma"},
            {"study_id": "not_there", "tumor_class": "warthin"}]
    src = _byo(synth, tmp_path, rows)
    out = tmp_path / "studies"
    r = subprocess.run([str(BIN / "parotid-import"), "--src", str(src), "--table", str(tmp_path / "labels.csv"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "oncocytoma" in r.stderr and "not_there" in r.stderr
    assert [it.study_id for it in load_cohort(str(out)) if it.tumor_class] == [items[0].study_id]
