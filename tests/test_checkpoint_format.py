"""The checkpoint formats have one reader each (parotid.classification.checkpoint,
parotid.segmentation.checkpoint): the shipped checkpoints and older layouts read, and the inference path
imports no training code."""

from __future__ import annotations

import subprocess
import sys

import torch

from conftest import APP, ROOT
from parotid.classification.checkpoint import INPUT_CHECK, load_checkpoint, read_config, read_raw
from parotid.segmentation.checkpoint import load_segmentation
from parotid.segmentation.networks import SEGMENTATION, SPECS

TRAINING = ("parotid.classification.train", "parotid.classification.liu", "parotid.classification.task_model",
            "parotid.classification.baselines", "parotid.segmentation.train")


def test_inference_path_imports_no_training_code():
    code = ("import sys; sys.path.insert(0, 'apps/parotid'); import lib.infers.classify, lib.infers.segmentation; "
            f"print([m for m in {TRAINING!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_shipped_classifier_checkpoints_read():
    for path in sorted((APP / "model").glob("classify_*.pt")):
        model, cfg = load_checkpoint(str(path))
        assert read_config(str(path)) == cfg
        assert model.input_check is not None and not model.training
        assert len(cfg["classes"]) == model.head[-1].out_features


def test_classifier_checkpoint_from_before_the_input_check_reads(tmp_path):
    src = next(iter(sorted((APP / "model").glob("classify_*.pt"))))
    ck = read_raw(str(src))
    del ck[INPUT_CHECK]
    ck["config"].pop("n_clinical", None)
    torch.save(ck, tmp_path / "old.pt")
    model, _ = load_checkpoint(str(tmp_path / "old.pt"))
    new, _ = load_checkpoint(str(src))
    assert model.input_check is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), new.state_dict().values()))


def test_shipped_segmentation_checkpoints_read(tmp_path):
    for name, spec in SPECS.items():
        ck = load_segmentation(str(APP / "model" / f"{name}.pt"))
        assert ck.spec == spec and ck.spacing is not None and not ck.net.training
    # the oldest layout: a bare state dict (no spec, no spacing) is a whole-study model in voxel space
    bare = load_segmentation(str(APP / "model" / "segmentation.pt")).net.state_dict()
    torch.save(bare, tmp_path / "bare.pt")
    old = load_segmentation(str(tmp_path / "bare.pt"))
    assert old.spec == SEGMENTATION and old.spacing is None
