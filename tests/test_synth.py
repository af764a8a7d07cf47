"""Synthetic phantom cohort generator (parotid.synth, `parotid-synth`). ALL DATA ARE SYNTHETIC.

Fast (small N, CPU). The full separability check (~160 studies) runs with PAROTID_SLOW=1.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from parotid.labels import get_label_set
from parotid.sequences import SEQUENCE_KEYS
from parotid.study import check_roi, read_study, roi_from_mask
from parotid.synth import cli
from parotid.synth.cohort import read_csv, write_cohort
from parotid.synth.phantom import CLASSES, generate, sample_case

SEED = 5


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    write_cohort(str(out), n=3, seed=SEED, dicom=True, progress=False)
    return out


def test_classes_match_label_set():
    assert tuple(get_label_set("subtype4").classes) == CLASSES


def test_layout_and_datastore(cohort):
    ids = [f"syn{SEED}_{i:04d}" for i in range(3)]
    for sid in ids:
        assert (cohort / f"{sid}.nii.gz").is_file()
        assert (cohort / "labels" / "final" / f"{sid}.nii.gz").is_file()
        assert (cohort / "raw" / sid).is_dir() and (cohort / "dicom" / sid).is_dir()
    rows = read_csv(cohort / "cohort.csv")
    assert [r["study_id"] for r in rows] == ids
    for r in rows:
        assert r["tumor_class"] in CLASSES and r["sex"] in ("M", "F") and 16 <= int(r["age"]) <= 92
        assert r["split"] in ("train", "val", "test") and r["synthetic"] == "1"
    # the index written by MONAI Label's own LocalDatastore: only the studies are images
    from monailabel.datastore.local import LocalDatastore

    ds = LocalDatastore(str(cohort), extensions=("*.nii.gz",), auto_reload=False, read_only=True)
    assert sorted(ds.list_images()) == ids
    assert sorted(ds.get_labeled_images("final")) == ids
    subtype4 = get_label_set("subtype4")
    for sid, row in zip(ids, rows):
        info = ds.get_label_info(sid, "final")
        assert info["synthetic"] is True
        assert subtype4.accepts(info["tumor_class"]) and info["tumor_class"] == row["tumor_class"]
        study = read_study(ds.get_image_uri(sid))
        check_roi(info["roi"], study.shape)
        assert json.loads(row["roi"]) == info["roi"]
        assert list(study.sequences) == info["sequences"]


def test_label_on_reference_grid(cohort):
    for sid in ("syn5_0000", "syn5_0001", "syn5_0002"):
        study = read_study(str(cohort / f"{sid}.nii.gz"))
        lab = sitk.ReadImage(str(cohort / "labels" / "final" / f"{sid}.nii.gz"))
        assert lab.GetPixelID() == sitk.sitkUInt8
        assert lab.GetSize() == study.image.GetSize()
        assert np.allclose(lab.GetSpacing(), study.image.GetSpacing())
        assert np.allclose(lab.GetOrigin(), study.image.GetOrigin())
        assert np.allclose(lab.GetDirection(), study.image.GetDirection())
        a = _arr(cohort / "labels" / "final" / f"{sid}.nii.gz")
        assert set(np.unique(a)) == {0, 1, 2}
        # reference grid 110 x 90 x 24 (CE-T1, 1.5 x 1.5 x 3 mm, FOV 165 x 135 x 72 mm) when CE-T1 is present
        if "CET1" in study.sequences:
            assert study.shape == (110, 90, 24)
            assert np.allclose(study.image.GetSpacing(), (1.5, 1.5, 3.0))


def test_roi_encloses_index_tumour():
    for i in range(4):
        r = generate(SEED, i)
        case = r.case
        roi = r.roi
        sl = check_roi(roi, r.label.shape)
        inside = np.zeros(r.label.shape, bool)
        inside[sl] = True
        tumour = r.label == 2
        assert tumour[sl].any()
        if case.n_tumors == 1:
            assert roi == roi_from_mask(tumour)  # tight box around the only tumour
            assert not (tumour & ~inside).any()


def test_deterministic_same_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_cohort(str(a), n=2, seed=SEED, raw=True, progress=False)
    write_cohort(str(b), n=2, seed=SEED, raw=True, progress=False)
    for sid in ("syn5_0000", "syn5_0001"):
        assert np.array_equal(_arr(a / f"{sid}.nii.gz"), _arr(b / f"{sid}.nii.gz"))
        assert np.array_equal(_arr(a / "labels/final" / f"{sid}.nii.gz"), _arr(b / "labels/final" / f"{sid}.nii.gz"))
        for f in sorted(os.listdir(a / "raw" / sid)):
            assert np.array_equal(_arr(a / "raw" / sid / f), _arr(b / "raw" / sid / f))
    assert read_csv(a / "cohort.csv") == read_csv(b / "cohort.csv")
    # a study does not depend on --start/--n: study 1 alone equals study 1 of the pair
    c = tmp_path / "c"
    write_cohort(str(c), n=1, seed=SEED, start=1, raw=False, progress=False)
    assert np.array_equal(_arr(a / "syn5_0001.nii.gz"), _arr(c / "syn5_0001.nii.gz"))


def test_study_without_cet1_uses_t2_reference():
    case = sample_case(3, 33)  # a study drawn without CE-T1 (found by scanning sample_case)
    assert case.missing == "CET1" and case.extra["reference"] == "T2"
    r = generate(3, 33)
    assert "CET1" not in r.study.sequences and r.study.shape == r.raw["T2"].GetSize()
    assert r.label.shape == r.study.shape and (r.label == 2).any()
    check_roi(r.roi, r.study.shape)


def test_series_descriptions_are_recognised():
    from parotid.sequences import match_sequence
    from parotid.synth.phantom import SERIES_DESCRIPTION

    assert {k: match_sequence(v) for k, v in SERIES_DESCRIPTION.items()} == {k: k for k in SERIES_DESCRIPTION}


def test_different_seeds_differ():
    r1, r2 = generate(5, 0), generate(6, 0)
    assert r1.case.study_id != r2.case.study_id  # ids carry the seed: cohorts never collide
    a1, a2 = r1.study.array(), r2.study.array()
    assert a1.shape != a2.shape or not np.array_equal(a1, a2)
    assert not np.array_equal(r1.label, r2.label)


def test_raw_geometries_differ(cohort):
    d = cohort / "raw" / "syn5_0000"
    imgs = {f[:-7]: sitk.ReadImage(str(d / f)) for f in os.listdir(d)}
    assert "CET1" in imgs and "T2" in imgs
    spacings = {k: tuple(np.round(v.GetSpacing(), 3)) for k, v in imgs.items()}
    assert spacings["CET1"] == (1.5, 1.5, 3.0) and spacings["T2"] == (0.75, 0.75, 4.0)
    if "T1" in imgs:
        assert spacings["T1"] == (1.0, 1.0, 4.0)
    for k in ("DWI_B0", "DWI_B1000", "ADC"):
        if k in imgs:
            assert spacings[k] == (2.0, 2.0, 4.0)
    # distinct grids (size/origin/direction), none axis-aligned (head rotation + obliquity)
    geo = {k: (v.GetSize(), tuple(np.round(v.GetOrigin(), 3)), tuple(np.round(v.GetDirection(), 5)))
           for k, v in imgs.items()}
    assert len({geo[k] for k in ("CET1", "T2")}) == 2
    for v in imgs.values():
        assert not np.allclose(np.array(v.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-3)


def test_dwi_adc_consistent(cohort):
    d = cohort / "raw" / "syn5_0001"
    if not all((d / f"{k}.nii.gz").exists() for k in ("DWI_B0", "DWI_B1000", "ADC")):
        pytest.skip("this study lacks a DWI series")
    b0, b1, adc = (_arr(d / f"{k}.nii.gz").astype(float) for k in ("DWI_B0", "DWI_B1000", "ADC"))
    m = (adc > 200) & (adc < 3400) & (b1 > 30)
    pred = b0[m] * np.exp(-adc[m] / 1000.0)  # ADC in 1e-6 mm²/s, b = 1000 s/mm²
    assert np.median(np.abs(pred - b1[m]) / b1[m]) < 0.01


def test_dicom_roundtrip(cohort):
    import pydicom

    sid = "syn5_0002"
    uids = set()
    for key in read_study(str(cohort / f"{sid}.nii.gz")).sequences:
        series = cohort / "dicom" / sid / key
        raw = sitk.ReadImage(str(cohort / "raw" / sid / f"{key}.nii.gz"))
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(series))
        assert len(files) == raw.GetSize()[2]
        reader.SetFileNames(files)
        img = reader.Execute()
        assert img.GetSize() == raw.GetSize()
        assert np.allclose(img.GetSpacing(), raw.GetSpacing(), atol=1e-4)
        assert np.allclose(img.GetOrigin(), raw.GetOrigin(), atol=1e-3)
        assert np.allclose(img.GetDirection(), raw.GetDirection(), atol=1e-5)
        assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(raw))
        ds = pydicom.dcmread(files[0])
        assert ds.Modality == "MR" and ds.PatientID == sid and str(ds.PatientName) == f"SYNTHETIC^{sid}"
        assert float(ds.SpacingBetweenSlices) == pytest.approx(raw.GetSpacing()[2])
        uids.add((ds.StudyInstanceUID, ds.FrameOfReferenceUID))
        assert ds.SeriesDescription
    assert len(uids) == 1  # one study, one frame of reference for all series


def test_clinical_associations_and_prevalence():
    cases = [sample_case(3, i) for i in range(400)]
    by = {c: [x for x in cases if x.tumor_class == c] for c in CLASSES}
    frac = {c: len(v) / len(cases) for c, v in by.items()}
    assert 0.35 < frac["pleomorphic_adenoma"] < 0.55 and 0.12 < frac["malignant"] < 0.28
    assert all(len(v) > 15 for v in by.values())
    age = {c: np.mean([x.age for x in v]) for c, v in by.items()}
    male = {c: np.mean([x.sex == "M" for x in v]) for c, v in by.items()}
    smoke = {c: np.mean([x.smoker for x in v]) for c, v in by.items()}
    assert age["warthin"] > age["pleomorphic_adenoma"] + 5 and age["malignant"] > age["pleomorphic_adenoma"] + 5
    assert male["warthin"] > 0.65 > male["pleomorphic_adenoma"]
    assert smoke["warthin"] > 2 * smoke["pleomorphic_adenoma"]
    sizes = [x.size_mm for x in cases]
    assert 11 <= min(sizes) and max(sizes) <= 61 and 20 < np.mean(sizes) < 32
    missing = [x for x in cases if x.missing]
    assert 0.05 < len(missing) / len(cases) < 0.16
    assert all(x.missing not in x.sequences and len(x.sequences) == 5 for x in missing)
    assert any(x.n_tumors > 1 for x in by["warthin"])
    kept = [sample_case(3, x.index, keep=SEQUENCE_KEYS) for x in missing[:5]]
    assert all(len(k.sequences) == 6 for k in kept)


# --------------------------------------------------------------------------- CLI errors
def _cli_error(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("n", ["0", "-3"])
def test_cli_bad_n(tmp_path, capsys, n):
    err = _cli_error(["--out", str(tmp_path / "x"), "--n", n], capsys)
    assert "--n must be a positive" in err


def test_cli_existing_nonempty_out(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    err = _cli_error(["--out", str(out), "--n", "1"], capsys)
    assert "not empty" in err and "--overwrite" in err
    # --overwrite refuses a folder that is not a parotid-synth cohort
    err = _cli_error(["--out", str(out), "--n", "1", "--overwrite"], capsys)
    assert "not a parotid-synth cohort" in err
    assert (out / "something.txt").exists()


def test_cli_other_bad_args(tmp_path, capsys):
    assert "--seed" in _cli_error(["--out", str(tmp_path / "y"), "--n", "1", "--seed", "-1"], capsys)
    assert "--keep" in _cli_error(["--out", str(tmp_path / "y"), "--n", "1", "--keep", "FLAIR"], capsys)
    assert "--start" in _cli_error(["--out", str(tmp_path / "y"), "--n", "1", "--start", "-1"], capsys)


def test_cli_overwrite_and_append(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["--out", str(out), "--n", "1", "--seed", "9", "--no-raw", "--quiet"]) == 0
    assert "not empty" in _cli_error(["--out", str(out), "--n", "1", "--seed", "9"], capsys)
    assert cli.main(["--out", str(out), "--n", "1", "--seed", "9", "--start", "1", "--no-raw", "--quiet",
                     "--append"]) == 0
    assert [r["study_id"] for r in read_csv(out / "cohort.csv")] == ["syn9_0000", "syn9_0001"]
    assert "already exist" in _cli_error(["--out", str(out), "--n", "1", "--seed", "9", "--append"], capsys)
    assert cli.main(["--out", str(out), "--n", "1", "--seed", "9", "--no-raw", "--quiet", "--overwrite"]) == 0
    assert [r["study_id"] for r in read_csv(out / "cohort.csv")] == ["syn9_0000"]
    assert not (out / "raw").exists()


# --------------------------------------------------------------------------- class structure
@functools.lru_cache(maxsize=None)  # the fast separability test reuses test_class_appearance_small's studies
def _feature_rows(seed, n):
    from parotid.synth.features import tumour_features

    rows = []
    for i in range(n):
        r = generate(seed, i, keep=SEQUENCE_KEYS)
        f = tumour_features(r.study.array(), r.label, r.study.sequences, r.study.image.GetSpacing())
        f["tumor_class"] = r.case.tumor_class
        rows.append(f)
    return rows


def test_class_appearance_small():
    """Direction of the published per-class differences on a few studies (fast)."""
    rows = _feature_rows(21, 40)
    m = {c: {k: np.mean([r[k] for r in rows if r["tumor_class"] == c]) for k in ("ADC_mean", "T2_mean", "CET1_mean")}
         for c in CLASSES if any(r["tumor_class"] == c for r in rows)}
    pa, wt, mal = m["pleomorphic_adenoma"], m["warthin"], m["malignant"]
    assert 1.4 < pa["ADC_mean"] < 2.1 and 0.8 < wt["ADC_mean"] < 1.3 and 0.75 < mal["ADC_mean"] < 1.2
    assert pa["T2_mean"] > wt["T2_mean"] and pa["T2_mean"] > mal["T2_mean"]


def test_separability_fusion_beats_single_sequences_small():
    """The fusion claim on the 40 studies above (no extra rendering; runs in CI). Measured with seed 21:
    fusion macro AUC 0.880, best single sequence 0.817 (ADC). The benign-vs-malignant claims need the
    160 studies of the slow test below (on 40 studies DWI_B0 alone scores 0.81, the fusion 0.78)."""
    from parotid.synth.features import separability

    res = separability(_feature_rows(21, 40), CLASSES, SEQUENCE_KEYS)
    assert res["fusion"] >= max(res["single"].values()) + 0.04, res


# kept out of the default run: rendering 160 studies takes ~7 min on one idle core (~20 min on the shared
# 2-core CI machine); the fast variant above checks the macro claim on every run
@pytest.mark.skipif(not os.environ.get("PAROTID_SLOW"), reason="slow (~7-20 min): set PAROTID_SLOW=1")
def test_separability_fusion_beats_single_sequences():
    """No single sequence separates the classes; the fusion does (logistic regression, 5-fold CV)."""
    from parotid.synth.features import separability

    res = separability(_feature_rows(11, 160), CLASSES, SEQUENCE_KEYS)
    print(json.dumps(res, indent=1))
    best_single = max(res["single"].values())
    assert res["fusion"] >= best_single + 0.04
    assert res["fusion_benign_vs_malignant"] >= 0.93
    assert max(res["single_benign_vs_malignant"].values()) < res["fusion_benign_vs_malignant"]
