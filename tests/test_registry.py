"""Model registry and promotion gate (issue 12), without a server: the gate's decisions, the registry's
versions / promotion / rollback on files, and the gate on REAL scores of the shipped checkpoint against
a deliberately miscalibrated copy on the sample studies' held-out part. The server-level tests are in
tests/test_registry_server.py."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import APP, SAMPLE
from parotid.registry import GATES, ModelRegistry, RegistryError, decide, gated_training, sha256_of

CLS, SEG = GATES["classification"], GATES["segmentation"]


# ----------------------------------------------------------------------------- decide
def test_gate_rejects_a_worse_candidate_and_says_why():
    d = decide(CLS, {"auc": 0.61, "log_loss": 0.4, "n": 5}, {"auc": 0.93, "log_loss": 0.3, "n": 5})
    assert not d.promote
    assert d.reason == "rejected: macro-AUC 0.610 < served 0.930 - 0.02, log-loss 0.400 <= served 0.300 + 0.1 on 5 held-out studies"


def test_gate_tolerance_and_calibration_check():
    served = {"auc": 0.90, "log_loss": 0.30, "n": 4}
    assert decide(CLS, {"auc": 0.885, "log_loss": 0.35, "n": 4}, served).promote  # within both tolerances
    assert not decide(CLS, {"auc": 0.95, "log_loss": 1.39, "n": 4}, served).promote  # ranks well, probabilities ~uniform
    assert not decide(CLS, {"auc": 0.87, "log_loss": 0.2, "n": 4}, served).promote
    # AUC undefined (one class among the held-out studies): log-loss decides alone
    assert decide(CLS, {"auc": None, "log_loss": 0.3, "n": 2}, {"auc": None, "log_loss": 0.31}).promote
    assert not decide(CLS, {"auc": None, "log_loss": None, "n": 0}, {"auc": None, "log_loss": None}).promote
    assert decide(SEG, {"dice_tumor": 0.80, "n": 3}, {"dice_tumor": 0.81}).promote
    assert not decide(SEG, {"dice_tumor": 0.64, "n": 3}, {"dice_tumor": 0.82}).promote


def test_force_and_first_model():
    d = decide(SEG, {"dice_tumor": 0.1, "n": 3}, {"dice_tumor": 0.8}, force=True)
    assert d.promote and "forced" in d.reason and "would have rejected" in d.reason
    assert decide(SEG, {"dice_tumor": 0.1, "n": 3}, None).promote


# ----------------------------------------------------------------------------- registry on files
def _score_by_content(path):  # fake scores: the checkpoint's bytes say how good it is
    return {"dice_tumor": float(open(path, "rb").read().split(b":")[1]), "n": 3}


def _trainer(quality):
    def train(path):
        with open(path, "wb") as f:
            f.write(f"weights:{quality}".encode())
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump({"quality": quality}, f)
        return {"iterations": 1}
    return train


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "seg.pt").write_bytes(b"weights:0.80")
    (d / "seg.json").write_text('{"shipped": true}')
    return d


def test_registry_gate_promotion_and_rollback(model_dir):
    reg = ModelRegistry(str(model_dir), "seg")
    shipped = sha256_of(str(model_dir / "seg.pt"))
    assert reg.sync_served() == 1 and reg.sync_served() == 1  # the shipped checkpoint is version 1, once
    assert reg.meta(1)["source"] == "shipped" and reg.meta(1)["sha256"] == shipped
    assert (model_dir / "seg.pt").read_bytes() == b"weights:0.80"  # not rewritten

    bad = gated_training(reg, SEG, _trainer(0.5), _score_by_content, data={"n_train": 5})
    assert bad["status"] == "rejected" and bad["version"] == 2 and bad["parent"] == 1
    assert bad["reason"].startswith("rejected: tumour Dice 0.500 < served 0.800 - 0.02 on 3 held-out studies")
    assert sha256_of(str(model_dir / "seg.pt")) == shipped and reg.served_version() == 1
    assert reg.last_candidate()["version"] == 2

    good = gated_training(reg, SEG, _trainer(0.79), _score_by_content)
    assert good["status"] == "promoted" and good["version"] == 3 and good["parent"] == 1
    assert (model_dir / "seg.pt").read_bytes() == b"weights:0.79" and reg.served_version() == 3
    assert json.loads((model_dir / "seg.json").read_text()) == {"quality": 0.79}
    assert reg.meta(1)["status"] == "superseded"

    forced = gated_training(reg, SEG, _trainer(0.2), _score_by_content, force=True)
    assert forced["status"] == "promoted" and forced["forced"] and reg.served_version() == 4

    reg.rollback(1)
    assert sha256_of(str(model_dir / "seg.pt")) == shipped and reg.served_version() == 1
    assert json.loads((model_dir / "seg.json").read_text()) == {"shipped": True}
    assert reg.meta(4)["status"] == "rolled_back"
    assert [v["version"] for v in reg.versions() if v["served"]] == [1]
    with pytest.raises(RegistryError) as e:
        reg.rollback(2)  # rejected: never served
    assert e.value.status == 409
    with pytest.raises(RegistryError) as e:
        reg.rollback(9)
    assert e.value.status == 404


def test_failed_training_leaves_no_version(model_dir):
    reg = ModelRegistry(str(model_dir), "seg")
    reg.sync_served()

    def boom(path):
        raise ValueError("too few studies")
    with pytest.raises(ValueError):
        gated_training(reg, SEG, boom, _score_by_content)
    assert [v["version"] for v in reg.versions()] == [1]


def test_a_file_replaced_behind_the_registry_is_registered_on_start(model_dir):
    reg = ModelRegistry(str(model_dir), "seg")
    reg.sync_served()
    (model_dir / "seg.pt").write_bytes(b"weights:0.70")  # e.g. copied in by hand
    assert reg.served_version() is None
    assert reg.sync_served() == 2 and reg.meta(2)["source"] == "found on start"


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_model_dir_in_a_git_checkout_is_never_written(tmp_path):
    _git("init", "-q", cwd=tmp_path)
    d = tmp_path / "apps" / "model"
    d.mkdir(parents=True)
    (d / "seg.pt").write_bytes(b"weights:0.80")
    _git("add", "apps/model/seg.pt", cwd=tmp_path)  # tracked checkpoints
    reg = ModelRegistry(str(d), "seg")
    assert reg.read_only and reg.sync_served() == 1 and reg.served_version() == 1
    with pytest.raises(RegistryError) as e:
        gated_training(reg, SEG, _trainer(0.9), _score_by_content)
    assert e.value.status == 409 and "git checkout" in str(e.value)
    assert sorted(os.listdir(d)) == ["seg.pt"]  # no registry folder either


def test_the_repository_model_dir_is_read_only():
    assert ModelRegistry(str(APP / "model"), "segmentation").read_only


def test_an_untracked_model_dir_inside_a_git_work_tree_is_writable(tmp_path):
    """Only tracked checkpoints are read-only: a copy that merely lies in some work tree (a home directory
    under version control, a runtime folder inside a checkout) is trained and versioned as any other."""
    _git("init", "-q", cwd=tmp_path)
    (tmp_path / "README").write_text("x")
    _git("add", "README", cwd=tmp_path)
    d = tmp_path / "runtime" / "model"
    d.mkdir(parents=True)
    (d / "seg.pt").write_bytes(b"weights:0.80")
    reg = ModelRegistry(str(d), "seg")
    assert not reg.read_only and reg.sync_served() == 1
    assert gated_training(reg, SEG, _trainer(0.9), _score_by_content)["status"] == "promoted"
    assert reg.served_version() == 2 and (d / "seg.pt").read_bytes() == b"weights:0.9"


def test_served_version_reads_the_registry_only_when_a_file_changed(model_dir, monkeypatch):
    """/info and every result ask for the served version: answered from memory while neither the served
    checkpoint nor served.json changed, re-read after a promotion or a rollback."""
    import parotid.registry as registry

    reg = ModelRegistry(str(model_dir), "seg")
    reg.sync_served()
    reads = []
    real = registry.cached_sha256
    monkeypatch.setattr(registry, "cached_sha256", lambda path: reads.append(path) or real(path))
    assert [reg.served_version() for _ in range(5)] == [1] * 5
    assert ModelRegistry(str(model_dir), "seg").served_version() == 1 and len(reads) <= 1
    gated_training(reg, SEG, _trainer(0.9), _score_by_content)
    assert reg.served_version() == 2
    reg.rollback(1, reason="test")
    assert reg.served_version() == 1 and ModelRegistry(str(model_dir), "seg").served_version() == 1


# ----------------------------------------------------------------------------- the gate on real scores
def test_gate_rejects_a_miscalibrated_classifier_on_real_held_out_studies(tmp_path):
    """The shipped classify_subtype against a copy with temperature 20 (what a 1+2-epoch retrain served
    in issue 12: every class ~0.25), both scored as the server would on the sample studies' held-out part."""
    from parotid.cohort import load_cohort, split_holdout
    from parotid.holdout_scores import classifier_scores

    torch.set_num_threads(1)
    held = split_holdout(load_cohort(str(SAMPLE)))[1]
    ck = torch.load(APP / "model" / "classify_subtype.pt", map_location="cpu", weights_only=True)
    ck["config"]["temperature"] = 20.0
    torch.save(ck, tmp_path / "hot.pt")
    served = classifier_scores(str(APP / "model" / "classify_subtype.pt"), held)
    cand = classifier_scores(str(tmp_path / "hot.pt"), held)
    assert served["n"] == cand["n"] == len(held) >= 2 and served["study_ids"] == cand["study_ids"]
    assert cand["auc"] == pytest.approx(served["auc"])  # same ranking: the temperature does not change it
    d = decide(CLS, cand, served)
    assert not d.promote and "log-loss" in d.reason and "> served" in d.reason, d.reason


def test_gate_rejects_an_untrained_segmentation_on_real_held_out_studies(tmp_path):
    """The shipped segmentation model against the same network untrained (random weights), scored on the
    sample studies' held-out part: tumour Dice decides."""
    from parotid.cohort import load_cohort, split_holdout
    from parotid.holdout_scores import segmentation_scores
    from parotid.segmentation.networks import SPECS, build_network

    torch.set_num_threads(1)
    torch.manual_seed(0)
    held = split_holdout(load_cohort(str(SAMPLE)))[1]
    spec = SPECS["segmentation"]
    ck = torch.load(APP / "model" / "segmentation.pt", map_location="cpu", weights_only=True)
    ck["model"] = build_network(spec).state_dict()
    torch.save(ck, tmp_path / "untrained.pt")
    served = segmentation_scores(str(APP / "model" / "segmentation.pt"), spec, held)
    cand = segmentation_scores(str(tmp_path / "untrained.pt"), spec, held)
    assert served["n"] == cand["n"] == len(held) and served["dice_tumor"] > 0.5 > cand["dice_tumor"]
    d = decide(SEG, cand, served)
    assert not d.promote and d.reason.startswith("rejected: tumour Dice"), d.reason
    assert decide(SEG, served, served).promote  # the same checkpoint passes its own gate
