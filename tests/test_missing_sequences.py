"""Every study with a T2 gets an answer (issue 15): studies without CE-T1, without DWI/ADC and with T2
only get a contour and a classification naming the sequences used, missing, and the performance
validated for that subset; a study without T2 gets a 422 naming it. Over the real server (conftest),
studies built from sample-data/studies with SimpleITK (components taken out of the vector image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from conftest import SAMPLE, infer, private_server
from parotid import subsets
from parotid.study import read_study, write_study

SID = "syn7_0005"
CLASSIFY = "classify_malignancy"
SEG_SEQS = ["T1", "T2", "CET1", "DWI_B0", "DWI_B1000", "ADC"]  # segmentation / contour_box inputs
CLS_SEQS = ["T2", "CET1", "DWI_B1000", "ADC"]  # the shipped classifiers' inputs
VARIANTS = {  # name -> sequences removed from the study; "full" is the good twin
    "full": (),
    "no_CET1": ("CET1",),
    "no_DWI_ADC": ("DWI_B0", "DWI_B1000", "ADC"),
    "T2_only": ("T1", "CET1", "DWI_B0", "DWI_B1000", "ADC"),
}


@pytest.fixture(scope="module")
def roi() -> list[int]:
    with open(SAMPLE / "datastore_v2.json") as f:
        return json.load(f)["objects"][SID]["labels"]["final"]["info"]["roi"]


@pytest.fixture(scope="module")
def study_bytes(tmp_path_factory) -> dict[str, bytes]:
    full = read_study(str(SAMPLE / f"{SID}.nii.gz"))
    assert list(full.sequences) == SEG_SEQS
    out = {}
    for name, removed in {**VARIANTS, "no_T2": ("T2",)}.items():
        sub = subsets.subset_study(full, [s for s in full.sequences if s not in removed])
        assert np.array_equal(sub.array(), full.array(list(sub.sequences)))  # same voxels, same grid
        path = tmp_path_factory.mktemp(name) / f"{name}.nii.gz"
        write_study(sub, str(path))
        out[name] = path.read_bytes()
    return out


def _post(server, model, data: bytes, name: str, params=None):
    return infer(server, model, params=params, files={"file": (f"{name}.nii.gz", data)}, output="json")


def _check_report(body: dict, model_seqs: list[str], removed) -> dict:
    assert body["sequences_used"] == [s for s in model_seqs if s not in removed], body
    assert body["sequences_missing"] == [s for s in model_seqs if s in removed], body
    perf = body["expected_performance"]
    if perf["validated"]:  # measured on a subset that uses nothing the study lacks
        assert set(perf["measured_with"]) <= set(body["sequences_used"]) and perf["synthetic"] is True
        assert perf["exact_subset"] is True  # the four evaluated subsets are exactly these studies'
    else:
        assert perf["reason"]
    return perf


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_contour_and_classification_name_the_sequences_used(server, study_bytes, roi, variant):
    removed = VARIANTS[variant]
    r = _post(server, "contour_box", study_bytes[variant], variant, {"roi": roi})
    assert r.status_code == 200, r.text[:400]
    body = r.json()
    _check_report(body, SEG_SEQS, removed)
    assert body["tumor_found"] is True or body["message"]
    intensity = body["input_check"]["components"]["intensity"]
    # the intensity check judges the sequences present only: nothing about a missing one
    assert not [k for k in intensity["distances"] for m in removed if m in k]
    assert not [x for x in body["input_check"]["reasons"] for m in removed if m in x]
    r = _post(server, CLASSIFY, study_bytes[variant], variant, {"roi": roi})
    assert r.status_code == 200, r.text[:400]
    c = r.json()
    perf = _check_report(c, CLS_SEQS, removed)
    assert abs(sum(p["score"] for p in c["prediction"]) - 1) < 1e-4
    subset_reasons = [x for x in c["undetermined_reasons"] if "missing" in x]
    if not c["sequences_missing"]:
        assert subset_reasons == []  # good twin: a complete study is never undetermined for its sequences
    else:
        auc = perf["metrics"]["roc_auc"][0] if perf["validated"] else None
        weak = auc is None or auc < subsets.CLASSIFICATION_FLOOR
        assert bool(subset_reasons) == weak, (perf, c["undetermined_reasons"])
        if weak:
            assert c["undetermined"] is True
            assert all(m in subset_reasons[0] for m in c["sequences_missing"])


def test_t2_only_whole_study_segmentation(server, study_bytes):
    r = _post(server, "segmentation", study_bytes["T2_only"], "T2_only")
    assert r.status_code == 200, r.text[:400]
    body = r.json()
    _check_report(body, SEG_SEQS, VARIANTS["T2_only"])
    assert set(body["volumes_ml"]) == {"parotid_gland", "tumor"}


@pytest.mark.parametrize("model", ["segmentation", "contour_box", CLASSIFY, "classify_subtype"])
def test_study_without_t2_is_a_422_naming_it(server, study_bytes, roi, model):
    r = _post(server, model, study_bytes["no_T2"], "no_T2", {"roi": roi})
    assert r.status_code == 422, r.text[:300]
    detail = r.json()["detail"]
    assert "lacks sequence(s) ['T2']" in detail and "minimum: ['T2']" in detail, detail


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """A server on a fresh copy of the app: the session server's checkpoints may have been retrained by
    earlier tests, and then (rightly) their shipped tables no longer apply."""
    srv = private_server(tmp_path_factory.mktemp("shipped"), models=f"segmentation,contour_box,{CLASSIFY},classify_subtype")
    yield srv
    srv.stop()


def test_info_states_minimum_and_subsets_per_model(shipped_server):
    models = requests.get(shipped_server.url + "/info/", timeout=30).json()["models"]
    for name in ("segmentation", "contour_box", CLASSIFY, "classify_subtype"):
        m = models[name]
        assert m["required_sequences"] == ["T2"] and "T2" in m["sequences"], m
        # one description: no key repeats the inputs or the minimum
        assert not {"minimum_sequences", "sequences_used", "sequences_required"} & set(m), sorted(m)
        names = [s["name"] for s in m["subsets"]]
        assert names == ["all", "no_CET1", "no_DWI_ADC", "T2_only"], names
        assert m["subsets"][-1]["sequences_used"] == ["T2"]
        assert m["subsets_validated"] is True, m.get("subsets_note")
        for s in m["subsets"]:
            assert s["expected_performance"]["synthetic"] is True and s["expected_performance"]["n"] > 0
        if m["type"] == "classification":
            assert m["subset_floor"] == {"metric": "roc_auc", "value": subsets.CLASSIFICATION_FLOOR}
            assert m["subsets"][0]["answered"] == "determined"


def test_incomplete_studies_get_the_incomplete_study_weights_and_a_usable_contour(shipped_server, study_bytes, tmp_path):
    """The shipped segmentation file holds weights for complete and for incomplete studies
    (parotid.segmentation.subset_models): a T2-only study is segmented by the sequence-dropout weights and
    its gland is found (the complete-study weights alone: gland Dice 0.00 on this study, tumour 0.57;
    the incomplete-study weights: 0.73 / 0.90, measured with the library)."""
    import SimpleITK as sitk

    from parotid.labels import GLAND, TUMOR
    from parotid.segmentation.inference import dice
    from parotid.study import read_label_map

    for variant in VARIANTS:
        body = _post(shipped_server, "segmentation", study_bytes[variant], variant).json()
        assert body["weights"] == ("complete" if variant == "full" else "incomplete"), (variant, body.get("weights"))
    r = infer(shipped_server, "segmentation", files={"file": ("T2_only.nii.gz", study_bytes["T2_only"])}, output="image")
    assert r.status_code == 200, r.text[:300]
    path = tmp_path / "t2_only_label.nii.gz"
    path.write_bytes(r.content)
    pred = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))
    truth = read_label_map(str(SAMPLE / "labels" / "final" / f"{SID}.nii.gz"))
    assert dice(pred == GLAND, truth == GLAND) >= 0.6 and dice(pred == TUMOR, truth == TUMOR) >= 0.6


def test_shipped_tables_match_the_shipped_checkpoints():
    """A table measured for another checkpoint is not used: after retraining, rerun
    ``parotid-eval subsets --write-tables`` (docs/missing-sequences.md)."""
    model_dir = SAMPLE.parents[1] / "apps" / "parotid" / "model"
    for task in ("segmentation", "contour_box", CLASSIFY, "classify_subtype"):
        table, why = subsets.validated_table(str(model_dir), task, str(model_dir / f"{task}.pt"))
        assert table is not None, why
        assert table["synthetic"] is True and [r["name"] for r in table["subsets"]] == list(subsets.NAMED_SUBSETS)


# ------------------------------------------------------------------------------- no server
def _table(tmp_path, task, rows, ckpt_bytes=b"weights"):
    ck = tmp_path / f"{task}.pt"
    ck.write_bytes(ckpt_bytes)
    subsets.write_table(subsets.table_path(str(tmp_path), task),
                        {"task": task, "synthetic": True, "checkpoint_sha256": subsets.file_sha256(str(ck)),
                         "subsets": rows})
    return str(ck)


ROWS = [{"name": n, "sequences_used": u, "n": 50, "metrics": {"roc_auc": [auc, auc - 0.1, auc + 0.05]}}
        for n, u, auc in (("all", CLS_SEQS, 0.95), ("no_CET1", ["T2", "DWI_B1000", "ADC"], 0.70),
                          ("no_DWI_ADC", ["T2", "CET1"], 0.90), ("T2_only", ["T2"], 0.60))]


def test_expected_performance_picks_the_subset_without_more_information(tmp_path):
    ck = _table(tmp_path, "clf", ROWS)
    perf = subsets.expected_performance("clf", CLS_SEQS, ["T2", "CET1", "DWI_B1000"], str(tmp_path), ck)
    assert perf["validated"] and perf["subset"] == "no_DWI_ADC" and perf["exact_subset"] is False
    perf = subsets.expected_performance("clf", CLS_SEQS, ["T2", "ADC"], str(tmp_path), ck)
    assert perf["subset"] == "T2_only"
    perf = subsets.expected_performance("clf", CLS_SEQS, ["T1", "T2", "CET1", "DWI_B1000", "ADC"], str(tmp_path), ck)
    assert perf["subset"] == "all" and perf["exact_subset"] is True


def test_a_table_of_another_checkpoint_is_not_used(tmp_path):
    ck = _table(tmp_path, "clf", ROWS)
    with open(ck, "ab") as f:
        f.write(b"retrained")
    perf = subsets.expected_performance("clf", CLS_SEQS, ["T2"], str(tmp_path), ck)
    assert perf["validated"] is False and "another checkpoint" in perf["reason"]
    res = subsets.mark_subset({"undetermined": False, "undetermined_reasons": []}, ["CET1"], perf)
    assert res["undetermined"] is True and "another checkpoint" in res["undetermined_reasons"][0]


def test_floor_makes_a_weak_subset_undetermined(tmp_path):
    ck = _table(tmp_path, "clf", ROWS)
    for study, missing, undetermined in ((CLS_SEQS, [], False), (["T2", "CET1"], ["DWI_B1000", "ADC"], False),
                                         (["T2", "DWI_B1000", "ADC"], ["CET1"], True), (["T2"], ["CET1", "DWI_B1000", "ADC"], True)):
        perf = subsets.expected_performance("clf", CLS_SEQS, study, str(tmp_path), ck)
        res = subsets.mark_subset({"undetermined": False, "undetermined_reasons": []}, missing, perf)
        assert res["undetermined"] is undetermined, (study, res)
        if undetermined:
            assert "below the floor" in res["undetermined_reasons"][0]
    # no table at all: a complete study is answered, an incomplete one is undetermined
    perf = subsets.expected_performance("other", CLS_SEQS, ["T2"], str(tmp_path), ck)
    assert perf["validated"] is False
    assert subsets.mark_subset({"undetermined": False}, [], perf)["undetermined"] is False
    assert subsets.mark_subset({"undetermined": False}, ["CET1"], perf)["undetermined"] is True


def test_parotid_eval_subsets_writes_the_tables_the_server_reads(tmp_path):
    """`parotid-eval subsets --write-tables` on a tiny cohort: one row per named subset, stamped with the
    checkpoint's SHA-256 (so validated_table accepts it); `--before` runs other checkpoints on the same studies."""
    import shutil

    from parotid.evaluation.cli import main

    src = SAMPLE.parents[1] / "apps" / "parotid" / "model"
    models = tmp_path / "model"
    models.mkdir()
    for task in (CLASSIFY, "contour_box"):
        shutil.copy(src / f"{task}.pt", models / f"{task}.pt")
    main(["subsets", "--cohort", str(SAMPLE), "--models", str(models), "--before", str(src), "--tasks", CLASSIFY,
          "contour_box", "--limit", "8", "--seg-limit", "1", "--n-boot", "20", "--write-tables", "--out",
          str(tmp_path / "out")])
    for task in (CLASSIFY, "contour_box"):
        table, why = subsets.validated_table(str(models), task, str(models / f"{task}.pt"))
        assert table is not None, why
        assert [r["name"] for r in table["subsets"]] == list(subsets.NAMED_SUBSETS) and table["synthetic"] is True
        assert table["subsets"][-1]["sequences_used"] == ["T2"]
    report = json.loads((tmp_path / "out" / "subsets.json").read_text())
    assert report["before"][CLASSIFY]["subsets"] == report["results"][CLASSIFY]["subsets"]  # same weights, same figures
    assert "BEFORE" in (tmp_path / "out" / "subsets.md").read_text()


def test_info_sequences_follow_the_served_checkpoint(tmp_path):
    """/info's `sequences` / `required_sequences` of a classifier are read from the checkpoint when asked,
    as the 422 for a lacking study is: a checkpoint with other inputs (retrained, uploaded) shows without
    a restart (no server: the infer task itself)."""
    import os
    import sys
    import time

    from conftest import APP
    from parotid.classification.models import SequenceModel
    from parotid.classification.checkpoint import save_checkpoint

    sys.path.insert(0, str(APP))
    try:
        from lib.infers.classify import ClassifyStudy
    finally:
        sys.path.remove(str(APP))

    def checkpoint(seqs):
        model = SequenceModel([[i] for i in range(len(seqs))], 2, 4, "spl")
        save_checkpoint(str(tmp_path / "classify_x.pt"), model, {
            "label_set": "benign_malignant", "classes": ["benign", "malignant"], "sequences": list(seqs),
            "groups": [[s] for s in seqs], "fusion": "spl", "n_slices": 4, "required": ["T2"]})

    checkpoint(("T2", "CET1", "ADC"))
    task = ClassifyStudy("classify_x", str(tmp_path / "classify_x.pt"), "benign_malignant", str(tmp_path / "none.pt"))
    info = task.info()
    assert (info["sequences"], info["required_sequences"]) == (["T2", "CET1", "ADC"], ["T2"])
    time.sleep(0.01)
    checkpoint(("CET1", "ADC"))  # e.g. uploaded: no T2 among its inputs, its minimum is another sequence
    os.utime(tmp_path / "classify_x.pt", (time.time() + 5, time.time() + 5))
    info = task.info()
    assert info["sequences"] == ["CET1", "ADC"] and info["required_sequences"] == ["CET1", "ADC"]
    assert task.required == tuple(info["required_sequences"])
