"""Acquisition profiles of ``parotid-synth --profile`` (parotid.synth.profiles). ALL DATA ARE SYNTHETIC.

Each physical claim is measured on the rendered output. Where a profile changes several things at
once, the parameter under test is copied alone into an otherwise neutral profile (same grid, same
noise stream), so the measurement isolates it and turns neutral (fails) when the parameter is 1/0.
"""

from __future__ import annotations

import dataclasses
import filecmp
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from parotid.synth import cli
from parotid.synth.cohort import read_csv
from parotid.synth.phantom import generate, sample_case
from parotid.synth.profiles import PROFILES, get_profile

SEED, INDEX = 7, 1  # all six sequences present, malignant, 29 mm, CE-T1 reference
DEFAULT = get_profile("default")
B, C, D = get_profile("siteB_1.5T"), get_profile("siteC_3T_ssEPI"), get_profile("siteD_1.5T_thick")
# one parameter (copied from a shipped profile) per channel, so they do not interfere
P1 = dataclasses.replace(DEFAULT, name="p1", contrast={"T1": D.contrast["T1"]}, fat_residual=D.fat_residual,
                         adc_scale=C.adc_scale)
P2 = dataclasses.replace(DEFAULT, name="p2", gain={"T1": B.gain["T1"]}, bias={"T2": C.bias["T2"]},
                         dwi_shift_mm=C.dwi_shift_mm)


@pytest.fixture(scope="module")
def rendered():
    return {p.name: generate(SEED, INDEX, profile=p) for p in (DEFAULT, B, P1, P2)}


def _a(img):
    return sitk.GetArrayFromImage(img).astype(np.float64)  # (K, J, I)


def _label_on(r, img):
    lab = sitk.GetImageFromArray(np.ascontiguousarray(r.label.T))
    lab.CopyInformation(r.study.reference)
    return sitk.GetArrayFromImage(sitk.Resample(lab, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


def test_profiles_shipped_and_documented():
    assert {"default", "siteB_1.5T", "siteC_3T_ssEPI", "siteD_1.5T_thick"} <= set(PROFILES)
    assert len(PROFILES) >= 4 and set(PROFILES["default"]) == {"description"}  # default: every parameter neutral
    readme = open(os.path.join(os.path.dirname(cli.__file__), "README.md")).read()
    helptext = cli.build_parser().format_help()
    for name in PROFILES:
        assert name in readme and name in helptext
    with pytest.raises(KeyError):
        get_profile("siteZ")


def test_same_patients_whatever_the_profile():
    for i in range(3):
        cases = [sample_case(SEED, i, profile=p) for p in PROFILES]
        for c in cases[1:]:
            for k in ("tumor_class", "age", "sex", "smoker", "side", "split", "size_mm", "n_tumors", "missing"):
                assert getattr(c, k) == getattr(cases[0], k), k


def test_spacing_and_labels(rendered):
    r, d = rendered[B.name], rendered["default"]
    for key, img in r.raw.items():
        proto = "DWI" if key.startswith("DWI") or key == "ADC" else key
        assert img.GetSpacing() == pytest.approx(B.spacing[proto])
        assert d.raw[key].GetSpacing() != pytest.approx(B.spacing[proto])
    assert r.study.reference.GetSpacing() == pytest.approx(B.spacing["CET1"])
    for p in (C, D):  # grids of the other shipped profiles, without rendering
        g = sample_case(SEED, INDEX, profile=p).grids["CET1"]
        assert g.spacing == pytest.approx(p.spacing["CET1"])
    # same tumour up to resampling: volume in mm³ within 15 %
    vol = [float((x.label == 2).sum() * np.prod(x.study.reference.GetSpacing())) for x in (d, r)]
    assert vol[1] == pytest.approx(vol[0], rel=0.15)


def _snr(r):
    """T2 gland mean / noise sigma from the air corners (Rayleigh: mean = sigma * sqrt(pi / 2))."""
    img = r.raw["T2"]
    a = _a(img)
    gland = ndimage.binary_erosion(_label_on(r, img) == 1, iterations=1)
    corners = np.concatenate([a[:, :8, :8].ravel(), a[:, :8, -8:].ravel(), a[:, -8:, :8].ravel(), a[:, -8:, -8:].ravel()])
    sigma = corners.mean() / np.sqrt(np.pi / 2)
    return a[gland].mean() / sigma


def test_snr(rendered):
    ratio = _snr(rendered["default"]) / _snr(rendered[B.name])
    assert ratio == pytest.approx(B.noise["T2"], rel=0.2), ratio


def test_contrast_tumour_gland(rendered):
    def ratio(r):
        img = r.raw["T1"]
        lab = _label_on(r, img)
        a = _a(img)
        t = ndimage.binary_erosion(lab == 2, iterations=2)
        g = ndimage.binary_erosion(lab == 1, iterations=2)
        return np.median(a[t]) / np.median(a[g])

    rd, rx = ratio(rendered["default"]), ratio(rendered["p1"])
    assert abs(np.log(rd)) > 0.1
    assert np.log(rx) / np.log(rd) == pytest.approx(D.contrast["T1"], abs=0.08), (rd, rx)


def test_fat_suppression(rendered):
    d, x = _a(rendered["default"].raw["T2"]), _a(rendered["p1"].raw["T2"])
    # fat voxels gain fat_residual * (650 - 110) (x gain ~0.75-1.3, bias); nothing else changes on T2
    frac = np.mean((x - d) > 0.5 * P1.fat_residual * 540 * 0.75)
    assert frac > 0.05, frac
    assert np.mean(x < d - 30) < 0.01


def test_adc_calibration_offset(rendered):
    d, x = _a(rendered["default"].raw["ADC"]), _a(rendered["p1"].raw["ADC"])
    m = (d > 700) & (d < 2500) & (x > 0)
    assert m.sum() > 1000
    assert np.median(x[m] / d[m]) == pytest.approx(C.adc_scale, abs=0.015)


def test_vendor_gain(rendered):
    d, x = rendered["default"].raw, rendered["p2"].raw
    head = _a(d["T1"]) > 100
    assert np.median(_a(x["T1"])[head] / _a(d["T1"])[head]) == pytest.approx(B.gain["T1"], abs=0.01)


def test_bias_strength(rendered):
    d, x = rendered["default"].raw, rendered["p2"].raw
    # bias: the smoothed log-ratio T2(p2) / T2(default) varies across the head (0 when the bias is unchanged)
    t2d, t2x = _a(d["T2"]), _a(x["T2"])
    head = ndimage.binary_erosion(t2d > 150, iterations=2)
    lr = ndimage.gaussian_filter(np.log(np.maximum(t2x, 1) / np.maximum(t2d, 1)), 3)[head]
    assert np.percentile(lr, 95) - np.percentile(lr, 5) > 0.05


def test_dwi_shift(rendered):
    d, x = _a(rendered["default"].raw["DWI_B0"]), _a(rendered["p2"].raw["DWI_B0"])
    sp = rendered["default"].raw["DWI_B0"].GetSpacing()[1]
    shifts = list(range(-5, 6))
    corr = [np.corrcoef(np.roll(d, s, axis=1)[:, 6:-6].ravel(), x[:, 6:-6].ravel())[0, 1] for s in shifts]
    best = shifts[int(np.argmax(corr))]
    assert abs(best) * sp == pytest.approx(P2.dwi_shift_mm, abs=sp / 2 + 0.1), (best, corr)
    # the other sequences do not move (CE-T1 untouched by p2)
    assert np.array_equal(_a(rendered["default"].raw["CET1"]), _a(rendered["p2"].raw["CET1"]))


def test_deterministic_files_and_site_column(tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"c{k}"
        assert cli.main(["--out", str(out), "--n", "1", "--seed", "3", "--no-raw", "--quiet",
                         "--profile", "siteD_1.5T_thick"]) == 0
        outs.append(out)
    sid = "syn3_0000"
    for rel in (f"{sid}.nii.gz", f"labels/final/{sid}.nii.gz"):
        a, b = (sitk.ReadImage(str(o / rel)) for o in outs)
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert filecmp.cmp(outs[0] / "cohort.csv", outs[1] / "cohort.csv", shallow=False)
    rows = read_csv(str(outs[0] / "cohort.csv"))
    assert rows[0]["site"] == "siteD_1.5T_thick"
    assert sitk.ReadImage(str(outs[0] / f"{sid}.nii.gz")).GetSpacing()[2] == pytest.approx(D.spacing["CET1"][2])


def test_default_is_bit_identical_to_sample_data():
    """sample-data/studies was made by the generator before profiles (seed 7, --keep CET1,T2)."""
    root = os.path.join(os.path.dirname(__file__), "..", "sample-data", "studies")
    r = generate(7, 0, ("CET1", "T2"), profile="default")
    from parotid.study import write_study

    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"prof_default_{os.getpid()}.nii.gz")
    try:
        write_study(r.study, tmp, as_int16=True)
        a, b = sitk.ReadImage(tmp), sitk.ReadImage(os.path.join(root, "syn7_0000.nii.gz"))
    finally:
        os.remove(tmp)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())
    lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(root, "labels", "final", "syn7_0000.nii.gz")))
    assert np.array_equal(lab, r.label.T)
