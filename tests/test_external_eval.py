"""``parotid-eval external``: cross-site validation (SYNTHETIC cohorts, tiny settings, CPU).

Site A: the shipped sample-data/studies (seed 7, default profile), copied with its ``site`` column and
label-info ``site`` removed (a cohort that does not say its site -> the folder name). Site B: 5 new patients (seed 7, indices 22-26: all four classes) with the ``siteB_1.5T``
acquisition profile (``site`` column of cohort.csv).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from parotid import input_check
from parotid.evaluation import cli
from parotid.evaluation.external import load_pool, study_sites
from parotid.study import read_study
from parotid.importer import main as import_main
from parotid.synth.cohort import write_cohort

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = ["--fusion", "T2", "CET1", "--size", "32", "--epochs1", "1", "--epochs2", "2", "--folds", "2", "--n-boot", "10",
        "--threads", "1", "--no-input-check"]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ext")
    a = tmp / "siteA"
    shutil.copytree(os.path.join(ROOT, "sample-data", "studies"), a)
    _remove_site(a)
    b = tmp / "siteB"
    write_cohort(str(b), n=5, seed=7, start=22, raw=True, keep=("CET1", "T2"), profile="siteB_1.5T", progress=False)
    os.environ.setdefault("PAROTID_CROP_CACHE", str(tmp / "crops"))
    return a, b, tmp


def _remove_site(folder) -> None:
    rows = list(csv.DictReader(open(folder / "cohort.csv")))
    with open(folder / "cohort.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "site"])
        w.writeheader()
        w.writerows([{k: v for k, v in r.items() if k != "site"} for r in rows])
    ds = json.load(open(folder / "datastore_v2.json"))
    for obj in ds["objects"].values():
        obj["labels"]["final"]["info"].pop("site", None)
    json.dump(ds, open(folder / "datastore_v2.json", "w"))


def test_sample_data_says_its_site():
    sample = os.path.join(ROOT, "sample-data", "studies")
    assert set(study_sites(sample).values()) == {"default"}
    assert {r["site"] for r in csv.DictReader(open(os.path.join(sample, "cohort.csv")))} == {"default"}


def test_sites_read_from_cohort_csv_label_info_or_folder(sites, tmp_path):
    a, b, _ = sites
    assert set(study_sites(str(b)).values()) == {"siteB_1.5T"}
    assert study_sites(str(a))["syn7_0000"] == "siteA"  # no site column: the folder name
    # parotid-import cohorts: `site` column of labels.csv -> final-label info (no cohort.csv)
    src = tmp_path / "byo"
    rows = [r for r in csv.DictReader(open(b / "cohort.csv"))][:2]
    for r in rows:
        d = src / r["study_id"]
        shutil.copytree(b / "raw" / r["study_id"], d)
        shutil.copy(b / "labels" / "final" / f"{r['study_id']}.nii.gz", d / "label.nii.gz")
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["study_id", "tumor_class", "site"])
        w.writeheader()
        w.writerows([{"study_id": r["study_id"], "tumor_class": r["tumor_class"], "site": "Hosp2"} for r in rows])
    imported = tmp_path / "imported"
    assert import_main(["--src", str(src), "--table", str(tmp_path / "labels.csv"), "--out", str(imported)]) == 0
    assert not (imported / "cohort.csv").exists()
    assert set(study_sites(str(imported)).values()) == {"Hosp2"}
    cs, s = load_pool([str(imported)], size=32)
    assert list(s) == ["Hosp2", "Hosp2"] and len(cs) == 2


def test_external_metrics_agree_with_sklearn(sites):
    a, b, tmp = sites
    out = tmp / "out1"
    res = cli.main(["external", "--train", str(a), "--test", str(b), "--out", str(out), "--name", "ext"] + TINY)
    assert list(res) == ["siteB_1.5T"]
    r = json.load(open(out / "ext.json"))["results"]["siteB_1.5T"]
    assert r["external"]["n"] == 5 and r["internal"]["sites"] == ["siteA"]
    classes = ["pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant"]
    for part in ("external", "internal"):
        pr = [p for p in r["predictions"] if p["part"] == part]
        y = np.array([p["y"] for p in pr])
        prob = np.array([p["prob"] for p in pr])
        yb = (y == classes.index("malignant")).astype(int)
        s = r[part]
        assert s["binary"]["roc_auc"][0] == pytest.approx(roc_auc_score(yb, prob[:, 3]))
        assert s["binary"]["accuracy"][0] == pytest.approx(accuracy_score(yb, prob[:, 3] >= 0.5))
        assert s["multiclass"]["accuracy"][0] == pytest.approx(accuracy_score(y, prob.argmax(1)))
        if part == "external":  # every class present in site B
            assert s["multiclass"]["macro_auc"][0] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr"))
        lo, hi = s["binary"]["roc_auc"][1:]
        assert lo <= s["binary"]["roc_auc"][0] <= hi or not np.isfinite(lo)
    assert r["drop"]["roc_auc"] == pytest.approx(r["internal"]["binary"]["roc_auc"][0] - r["external"]["binary"]["roc_auc"][0])
    assert 0 <= r["external"]["ece_top_label"] <= 1
    assert os.path.getsize(out / "ext_siteB_1.5T_reliability.png") > 1000
    md = (out / "ext.md").read_text()
    assert "siteB_1.5T" in md and "drop" in md


def test_leave_one_site_out(sites):
    a, b, tmp = sites
    out = tmp / "out2"
    res = cli.main(["external", "--leave-one-site-out", "--cohorts", str(a), str(b), "--out", str(out), "--name", "loso",
                    "--label-set", "benign_malignant"] + TINY)
    assert set(res) == {"siteA", "siteB_1.5T"}
    assert res["siteA"]["external"]["n"] == 20 and res["siteA"]["internal"]["sites"] == ["siteB_1.5T"]
    assert res["siteB_1.5T"]["external"]["n"] == 5 and res["siteB_1.5T"]["internal"]["n"] == 20
    for r in res.values():
        assert np.isfinite(r["external"]["binary"]["accuracy"][0])


def test_bad_arguments(sites):
    a, b, tmp = sites
    with pytest.raises(SystemExit):
        cli.main(["external", "--train", str(a), "--out", str(tmp / "x")])  # neither --test nor --leave-one-site-out
    with pytest.raises(SystemExit, match="two sites"):
        cli.main(["external", "--leave-one-site-out", "--cohorts", str(a), "--out", str(tmp / "x")] + TINY)


def test_input_check_flags_are_counted(sites, tmp_path):
    """The report counts the external studies the SERVED input check flags (apps/parotid/model) and gives the
    metrics of the unflagged ones; one study is made implausible (12 mm slices: physical check)."""
    import SimpleITK as sitk

    a, b, tmp = sites
    c = tmp_path / "siteB_flag"
    shutil.copytree(b, c)
    bad = "syn7_0023"
    img = sitk.ReadImage(str(c / f"{bad}.nii.gz"))
    img.SetSpacing(img.GetSpacing()[:2] + (12.0,))
    sitk.WriteImage(img, str(c / f"{bad}.nii.gz"))
    model_dir = os.path.join(ROOT, "apps", "parotid", "model")
    args = [x for x in TINY if x != "--no-input-check"] + ["--input-check", model_dir]
    res = cli.main(["external", "--train", str(a), "--test", str(c), "--out", str(tmp_path / "o"), "--name", "ic"] + args)
    r = res["siteB_1.5T"]
    expect = {}
    for row in csv.DictReader(open(c / "cohort.csv")):  # the served path, study by study
        roi = json.loads(row["roi"])
        comps = input_check.box_components(read_study(str(c / f"{row['study_id']}.nii.gz"), row["study_id"]), roi,
                                           model_dir)
        expect[row["study_id"]] = not input_check.combine(comps)["in_distribution"]
    assert expect[bad]
    assert r["input_check"]["n_checked"] == 5
    assert r["input_check"]["n_flagged"] == sum(expect.values())
    assert r["input_check"]["flagged"] == sorted(k for k, v in expect.items() if v)
    assert r["input_check"]["by_component"].get("physical", 0) >= 1
    pr = [p for p in r["predictions"] if p["part"] == "external"]
    assert {p["study_id"]: p["flagged"] for p in pr} == expect
    ok = [p for p in pr if not p["flagged"]]
    yb = np.array([p["y"] == 3 for p in ok], int)
    if r["external_unflagged"] is None:  # the unflagged studies lack a benign or a malignant one
        assert len(set(yb)) < 2
    else:
        assert r["external_unflagged"]["n"] == len(ok)
        assert r["external_unflagged"]["binary"]["roc_auc"][0] == pytest.approx(
            roc_auc_score(yb, [p["prob"][3] for p in ok]))
    md = (tmp_path / "o" / "ic.md").read_text()
    assert f"{sum(expect.values())} / 5" in md


def test_ablation_switches_each_measure(sites):
    """--ablation: one run per configuration (none, each measure alone, all), one model per configuration
    trained on the --train cohort and tested on every --test site; no internal CV with --folds 0."""
    a, b, tmp = sites
    out = tmp / "abl"
    args = [x if x != "2" or i == 0 else x for i, x in enumerate(TINY)]
    res = cli.main(["external", "--train", str(a), "--test", str(b), "--out", str(out), "--name", "abl", "--ablation",
                    "--label-set", "benign_malignant"] + [x for x in args] + ["--folds", "0"])
    assert list(res) == ["none", "histogram", "augment", "spacing", "histogram+augment+spacing"]
    for cfg, r in res.items():
        assert r["siteB_1.5T"]["internal"] is None and r["siteB_1.5T"]["external"]["n"] == 5
    meta = json.load(open(out / "abl.json"))["meta"]
    assert meta["measures"]["spacing"]["physical_spacing"] and not meta["measures"]["none"]["augment"]
    # different measures, different predictions (each switch does something)
    probs = {k: [p["prob"] for p in r["siteB_1.5T"]["predictions"]] for k, r in res.items()}
    for k in ("histogram", "augment", "spacing"):
        assert not np.allclose(probs[k], probs["none"]), k
    md = (out / "abl.md").read_text()
    assert "Ablation" in md and md.count("| histogram+augment+spacing |") == 1


def test_histogram_standardisation_ignores_the_scanner_scale(sites):
    """Any monotone change of a sequence's intensities (gain, contrast gamma) gives the same standardised
    crops; the served p1/p99 scaling is invariant to gain only."""
    from parotid.evaluation.external import (_standardise_percentile, acquisition_augment, acquisition_transform,
                                             histogram_standardise)

    a, _, _ = sites
    cs, _ = load_pool([str(a)], size=32)
    cs = cs.subset(np.arange(4))
    scanner = cs.subset(np.arange(4))
    x = scanner.slices.astype(np.float32)
    x[:, :, 0] = (np.clip(x[:, :, 0], -2, 4) + 2.0) ** 1.4 * 2.5  # monotone: gamma 1.4 and a gain
    scanner.slices = x.astype(np.float16)
    h0, h1 = histogram_standardise(cs).slices.astype(float), histogram_standardise(scanner).slices.astype(float)
    assert np.abs(h0 - h1)[:, :, 0].mean() < 0.005  # measured 0.002 (256 bins)
    p0 = np.stack([[_standardise_percentile(s[:, c]) for c in range(s.shape[1])] for s in cs.slices.astype(np.float32)])
    p1 = np.stack([[_standardise_percentile(s[:, c]) for c in range(s.shape[1])] for s in x])
    assert np.abs(p0 - p1)[:, 0].mean() > 0.01  # measured 0.015
    # augmentation: MONAI transforms, deterministic per seed, missing sequences stay zero
    names = [type(t).__name__ for t in acquisition_transform(0).transforms]
    assert names == ["RandGaussianSmooth", "RandBiasField", "RandAdjustContrast", "RandScaleIntensity", "RandGaussianNoise"]
    g1, g2 = acquisition_augment(cs, [0, 1, 2], 5), acquisition_augment(cs, [0, 1, 2], 5)
    assert np.array_equal(g1.slices, g2.slices) and not np.array_equal(g1.slices, cs.subset([0, 1, 2]).slices)
    assert (g1.slices[~g1.avail.repeat(1, 0)[:, None, :].repeat(g1.slices.shape[1], 1)] == 0).all()


def test_sites_served_models_per_site(sites, tmp_path):
    """parotid-eval sites: the served classifiers on one site; flag counts, failures flagged and metrics
    agree with the per-study results (scikit-learn); a study with 12 mm slices is flagged."""
    import SimpleITK as sitk

    _, b, _ = sites
    c = tmp_path / "siteB_sites"
    shutil.copytree(b, c)
    img = sitk.ReadImage(str(c / "syn7_0023.nii.gz"))
    img.SetSpacing(img.GetSpacing()[:2] + (12.0,))
    sitk.WriteImage(img, str(c / "syn7_0023.nii.gz"))
    model_dir = os.path.join(ROOT, "apps", "parotid", "model")
    res = cli.main(["sites", "--cohorts", str(c), "--models", model_dir, "--tasks", "classify_malignancy",
                    "--out", str(tmp_path / "o"), "--n-boot", "10", "--internal", "none"])
    r = res[model_dir]["classify_malignancy"]["siteB_1.5T"]
    pr = r["predictions"]
    flagged = {p["study_id"]: not p["check"]["in_distribution"] for p in pr}
    assert len(pr) == 5 and flagged["syn7_0023"]
    assert r["input_check"]["n_flagged"] == sum(flagged.values())
    y = np.array([p["y"] for p in pr])
    score = np.array([p["prob"][1] for p in pr])
    assert r["all"]["roc_auc"][0] == pytest.approx(roc_auc_score(y, score))
    wrong = (score >= 0.5) != (y == 1)
    assert r["misclassified_benign_malignant"] == wrong.sum()
    assert r["of_which_flagged"] == sum(w and flagged[p["study_id"]] for w, p in zip(wrong, pr))
    assert "siteB_1.5T" in (tmp_path / "o" / "sites.md").read_text()
