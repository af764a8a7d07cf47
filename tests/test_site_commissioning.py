"""Site commissioning (``parotid-eval commission``) on a real server: a study from another scanner (the SYNTHETIC
``siteB_1.5T`` acquisition profile) is undetermined because its intensity statistics are unlike the training
cohort's; a commissioning that misses a bar writes nothing (the study stays flagged); one that meets the bars
adds the site's reference, and the running server then passes the study's intensity component (it rereads
input_check.json by modification time); a duplicated series from that site is still flagged; withdrawing the
site flags the study again; a study of another protocol (thicker slices) is not matched by the site; a classifier
replaced after commissioning loses the site's acceptance (its evidence named the old checkpoint). The bars are set by the test (16 studies cannot show AUC 0.90 reliably): the gate
itself is what is tested, with a bar no model can meet next to one every model meets."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from conftest import infer, private_server
from parotid import input_check
from parotid.evaluation import cli
from parotid.evaluation.commission import gate
from parotid.study import read_study, study_from_array, write_study

ROOT = Path(__file__).resolve().parents[1]
SITE = "siteB_1.5T"
OTHER_PROTOCOL = "siteD_1.5T_thick"  # 7 mm slices: not the commissioned protocol
TASK = "classify_malignancy"


@pytest.fixture(scope="module")
def site_cohort(tmp_path_factory):
    """16 labelled SYNTHETIC studies of the site (seed 7100) + 2 new studies of the same site (seed 7101)."""
    from parotid.synth.cohort import write_cohort

    root = tmp_path_factory.mktemp("site")
    write_cohort(str(root / "cohort"), 16, 7100, raw=False, progress=False, profile=SITE)
    write_cohort(str(root / "new"), 2, 7101, raw=False, progress=False, profile=SITE)
    write_cohort(str(root / "other"), 2, 7101, raw=False, progress=False, profile=OTHER_PROTOCOL)
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = private_server(tmp_path_factory.mktemp("commission"))
    yield s
    s.stop()


def _new_study(site_cohort, tmp, duplicate=False, folder="new"):
    """(file bytes, roi) of a new study of the site; `duplicate`: its T2 imported again as CE-T1."""
    from parotid.cohort import load_classification_cohort

    r = next(r for r in load_classification_cohort(str(site_cohort / folder))
             if {"CET1", "ADC"} <= set(read_study(r.image, r.study_id).sequences))
    s = read_study(r.image, r.study_id)
    if duplicate:
        arr = s.array(list(s.sequences)).copy()
        arr[s.sequences.index("CET1")] = arr[s.sequences.index("T2")]
        s = study_from_array(arr, list(s.sequences), s.reference)
    out = tmp / f"{folder}{'_dup' if duplicate else ''}.nii.gz"
    write_study(s, str(out))
    return out.read_bytes(), [int(v) for v in r.roi]


def _intensity(srv, data, roi, task=TASK) -> dict:
    r = infer(srv, task, params={"roi": roi}, files={"file": ("site_study.nii.gz", data)})
    assert r.status_code == 200, r.text[:400]
    return r.json()


def _commission(site_cohort, models, *extra):
    return cli.main(["commission", "--cohort", str(site_cohort / "cohort"), "--site", SITE, "--models", str(models),
                     "--min-studies", "10", "--min-malignant", "1", "--n-boot", "50", *extra])


def test_commissioning_gates_and_opens_the_input_check_for_the_site(srv, site_cohort, brain_study, tmp_path):
    models = srv.app.rstrip("/") + "/model"
    ref_path = f"{models}/{input_check.REFERENCE_FILE}"
    data, roi = _new_study(site_cohort, tmp_path)
    dup, _ = _new_study(site_cohort, tmp_path, duplicate=True)
    other, other_roi = _new_study(site_cohort, tmp_path, folder="other")

    before = _intensity(srv, data, roi)
    assert not before["input_check"]["components"]["intensity"]["passed"], before["input_check"]
    assert before["undetermined"] and any("intensity statistics" in r for r in before["undetermined_reasons"])
    assert requests.get(f"{srv.url}/info/", timeout=30).json()["commissioned_sites"] == {}

    # a bar no model meets: refused, named, nothing written, the study stays flagged
    original = open(ref_path, "rb").read()
    res = _commission(site_cohort, models, "--min-roc-auc", "1.01")
    assert res["accepted"] is False and res["written"] is False
    assert any("ROC-AUC" in m for m in res["missed"][TASK]), res["missed"]
    assert open(ref_path, "rb").read() == original
    assert not _intensity(srv, data, roi)["input_check"]["components"]["intensity"]["passed"]

    # bars every model meets: accepted, evidence and the site's reference written
    res = _commission(site_cohort, models, "--min-roc-auc", "0", "--min-macro-auc", "0")
    assert res["accepted"] is True and res["written"] is True, res["missed"]
    ref = json.load(open(ref_path))
    ev = ref["sites"][SITE]["evidence"]
    assert ev["n_studies"] >= 10 and set(ev["tasks"]) == {"classify_malignancy", "classify_subtype"}
    assert ev["tasks"][TASK]["sha256"] == input_check.sha256_of(f"{models}/{TASK}.pt")
    assert ref["intensity"] and ref["anatomy"]  # the training cohort's reference is kept as it was

    listed = requests.get(f"{srv.url}/info/", timeout=30).json()["commissioned_sites"]
    assert listed[SITE]["n_studies"] == ev["n_studies"] and TASK in listed[SITE]["accepted_on"], listed

    after = _intensity(srv, data, roi)["input_check"]["components"]["intensity"]
    assert after["passed"] and after["reference"] == f"site:{SITE}", after
    # the site does not vouch for a duplicated series: CE-T1 = T2 fails the site's pair statistics too
    d = _intensity(srv, dup, roi)
    assert not d["input_check"]["components"]["intensity"]["passed"], d["input_check"]["components"]["intensity"]
    assert any("correlate" in r for r in d["undetermined_reasons"]), d["undetermined_reasons"]

    # a real scan that is not a parotid study (nibabel's brain T1) gains nothing from the commissioned site
    brain, brain_roi = brain_study
    b = _intensity(srv, brain, brain_roi)
    assert b["undetermined"] and not b["input_check"]["in_distribution"], b["input_check"]
    assert b["input_check"]["components"]["intensity"]["reference"] == "training"

    # another protocol (thicker slices) is not vouched for by the site, whatever its intensity statistics
    o = _intensity(srv, other, other_roi)["input_check"]["components"]["intensity"]
    assert not o["passed"] and o["reference_scores"][f"site:{SITE}"] >= input_check.MAX_SCORE, o
    assert any("outside its protocol" in r for r in o["reasons"]), o["reasons"]

    # a classifier replaced after commissioning is not vouched for by the site's evidence; the other one still is
    ck = torch.load(f"{models}/{TASK}.pt", map_location="cpu", weights_only=True)
    buf = io.BytesIO()
    torch.save({**ck, "note": "re-saved: another checkpoint file"}, buf)
    put = requests.put(f"{srv.url}/model/{TASK}", files={"file": ("m.pt", buf.getvalue())}, timeout=60)
    assert put.status_code == 200, put.text[:300]
    stale = _intensity(srv, data, roi)
    assert not stale["input_check"]["components"]["intensity"]["passed"] and stale["undetermined"]
    assert any("commission the site again" in r for r in stale["undetermined_reasons"]), stale["undetermined_reasons"]
    other_task = _intensity(srv, data, roi, "classify_subtype")["input_check"]["components"]["intensity"]
    assert other_task["passed"] and other_task["reference"] == f"site:{SITE}", other_task

    # withdrawn: flagged again
    assert input_check.main(["remove-site", "--models", models, "--site", SITE]) == 0
    assert not _intensity(srv, data, roi, "classify_subtype")["input_check"]["components"]["intensity"]["passed"]
    assert requests.get(f"{srv.url}/info/", timeout=30).json()["commissioned_sites"] == {}


def test_gate_names_every_missed_bar():
    bars = {"min_roc_auc": 0.9, "min_macro_auc": 0.85, "min_studies": 30, "min_malignant": 5}
    good = {"n": 47, "n_malignant": 9, "roc_auc": [0.96, 0.9, 1.0], "macro_auc": [0.95, 0.9, 0.99]}
    assert gate(good, bars) == []
    bad = {"n": 20, "n_malignant": 3, "roc_auc": [0.68, 0.4, 0.9], "macro_auc": [0.80, 0.7, 0.9]}
    missed = gate(bad, bars)
    assert len(missed) == 4 and any("ROC-AUC 0.680" in m for m in missed) and any("macro-AUC" in m for m in missed)
    assert gate({**good, "roc_auc": [float("nan")] * 3}, bars)  # an undefined AUC never passes
    assert gate(None, bars)


def test_site_reference_thresholds_are_leave_one_out():
    """The site fit's thresholds come from held-out (leave-one-out) distances: larger than in-sample ones, so
    the site's own studies pass; an entry with too few studies is left out."""
    rng = np.random.default_rng(0)
    rows = [{"T2": list(rng.normal(size=6)), "ADC": list(rng.normal(size=8))} for _ in range(20)]
    rows[:12] = [{**r, "DWI_B1000": list(rng.normal(size=6))} for r in rows[:12]]
    rows[0].pop("ADC")
    ref = input_check.fit_site_intensity(rows, min_rows=15)
    assert set(ref) == {"T2", "ADC"} and ref["ADC"]["n_train"] == 19
    own = [input_check._intensity_verdict(r, ref)["worst"] for r in rows]
    assert max(own) <= 1.0


def test_commissioning_reports_a_broken_file_and_refuses_a_missing_folder(site_cohort, tmp_path):
    """A cohort with one truncated study file: the run completes, the file is named in the evidence and left
    out (good twin: the other studies are evaluated); a folder that does not exist: a clear message."""
    from parotid.evaluation.commission import BARS, commission

    folder = tmp_path / "cohort"
    shutil.copytree(site_cohort / "cohort", folder)
    victim = sorted(folder.glob("*.nii.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:2000])
    models = tmp_path / "models"
    shutil.copytree(ROOT / "apps" / "parotid" / "model", models)
    res = commission(str(folder), SITE, str(models), {**BARS, "min_studies": 10, "min_malignant": 1}, [TASK],
                     dry_run=True, n_boot=20, progress=lambda *_: None)
    assert list(res["evidence"]["unreadable"]) == [victim.name.split(".")[0]], res["evidence"]["unreadable"]
    assert res["evidence"]["tasks"][TASK]["metrics"]["n"] >= 12 and res["written"] is False
    with pytest.raises(SystemExit, match="cohort folder not found"):
        commission(str(tmp_path / "nowhere"), SITE, str(models), BARS)


def test_concurrent_site_changes_are_all_kept(tmp_path):
    """Eight sites written from eight threads at once into one input_check.json: every one is there (the read-change-
    replace is serialised by a file lock; without it, writers overwrite each other's sites)."""
    import threading

    shutil.copy(ROOT / "apps" / "parotid" / "model" / input_check.REFERENCE_FILE, tmp_path / input_check.REFERENCE_FILE)
    ref = {"T2": {"mean": [0.0], "precision": [[1.0]], "threshold": 1.0}}
    barrier = threading.Barrier(8)

    def add(i):
        barrier.wait()
        input_check.set_site(str(tmp_path), f"site{i}", ref, {"n_studies": i})

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sites = json.load(open(tmp_path / input_check.REFERENCE_FILE))["sites"]
    assert sorted(sites) == [f"site{i}" for i in range(8)]
    assert json.load(open(ROOT / "apps" / "parotid" / "model" / input_check.REFERENCE_FILE)).get("sites") is None
