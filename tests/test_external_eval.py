"""``parotid-eval external``: cross-site validation (SYNTHETIC cohorts, tiny settings, CPU).

Site A: the shipped sample-data/studies (seed 7, default profile; no ``site`` column -> the folder
name). Site B: 5 new patients (seed 7, indices 22-26: all four classes) with the ``siteB_1.5T``
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
    b = tmp / "siteB"
    write_cohort(str(b), n=5, seed=7, start=22, raw=True, keep=("CET1", "T2"), profile="siteB_1.5T", progress=False)
    os.environ.setdefault("PAROTID_CROP_CACHE", str(tmp / "crops"))
    return a, b, tmp


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
