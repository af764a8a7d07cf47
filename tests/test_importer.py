"""parotid-import: bring-your-own cohort (per-sequence NIfTI / DICOM + label table) -> study folder."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

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


def test_import_reads_dicom_geometry_and_refuses_what_it_would_have_to_invent(tmp_path, capsys):
    """DICOM folders: a T2 folder that also holds a CE-T1 series (the T2 is picked), an Enhanced (multi-frame)
    CE-T1; refused with the reason: no geometry, eight copies of one slice, two series none named T2."""
    import copy as _copy

    from pydicom.uid import generate_uid

    from parotid.importer import main
    from parotid.pacs.dicomio import save_series, volume_to_mr_series
    from test_formats import _volume, enhanced_mr

    t2, ce = _volume(1), _volume(2)
    src = tmp_path / "cohort"
    uid = generate_uid()
    save_series(volume_to_mr_series(ce, "T1 post gad", uid), str(src / "good" / "T2" / "a"))  # sorts first
    save_series(volume_to_mr_series(t2, "t2_tse_fs", uid), str(src / "good" / "T2" / "b"))
    (src / "good" / "CET1").mkdir(parents=True)
    enhanced_mr(volume_to_mr_series(ce, "T1 post gad", uid)).save_as(str(src / "good" / "CET1" / "mf.dcm"),
                                                                     write_like_original=False)
    series = volume_to_mr_series(t2, "t2_tse_fs", generate_uid())
    nogeo = _copy.deepcopy(series)
    for ds in nogeo:
        del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    save_series(nogeo, str(src / "nogeo" / "T2"))
    copies = [_copy.deepcopy(series[2]) for _ in range(8)]
    for ds in copies:
        ds.SOPInstanceUID = generate_uid()
    save_series(copies, str(src / "copies" / "T2"))
    save_series(volume_to_mr_series(t2, "ax fse", uid), str(src / "mixed" / "T2" / "a"))
    save_series(volume_to_mr_series(ce, "survey", uid), str(src / "mixed" / "T2" / "b"))
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("study_id,tumor_class\ngood,\nnogeo,\ncopies,\nmixed,\n")
    rc = main(["--src", str(src), "--table", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "studies")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "SKIPPED nogeo: T2: 8 of 8 images lack ImageOrientationPatient, ImagePositionPatient, PixelSpacing" in err
    assert "SKIPPED copies: T2: duplicate slice positions" in err
    assert "SKIPPED mixed: T2: the folder holds 2 DICOM series (none of them match T2)" in err and "'ax fse'" in err
    assert "good" not in err
    study = read_study(str(tmp_path / "studies" / "good.nii.gz"))
    assert study.sequences == ("T2", "CET1")
    for key, vol in (("T2", t2), ("CET1", ce)):  # the right series in each channel, on the Enhanced MR's grid
        assert np.allclose(study.array([key])[0], sitk.GetArrayFromImage(vol).transpose(2, 1, 0), atol=1e-2), key
    assert np.allclose(study.image.GetOrigin(), ce.GetOrigin(), atol=1e-3)
