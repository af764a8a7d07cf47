"""Classification composes the SERVED segmentation task (segmentation -> box -> classification): when the
served segmentation checkpoint changes (PUT /model, registry rollback), the classifiers' automatic box is
the new checkpoint's tumour box, the one /infer/segmentation answers. A runtime copy of the app; the
repository's checkpoints are never written."""

from __future__ import annotations

import io
import os

import pytest
import requests
import torch

from conftest import APP, infer, private_server
from parotid.study import read_study

SID = "syn7_0000"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = private_server(tmp_path_factory.mktemp("pipeline"), models="segmentation,classify_subtype")
    yield s
    s.stop()


def tumour_everywhere() -> bytes:
    """The shipped segmentation checkpoint with its output layer's weights zeroed and the tumour bias 1: every
    voxel's logits are (0, 0, 1), so it labels every voxel tumour whatever the logits were (the full-resolution
    network's class logits differ by up to ~500, so raising the tumour bias by a constant is not enough)."""
    ck = torch.load(APP / "model" / "segmentation.pt", map_location="cpu", weights_only=True)
    ck["model"]["model.2.conv.weight"] = torch.zeros_like(ck["model"]["model.2.conv.weight"])
    ck["model"]["model.2.conv.bias"] = torch.tensor([0.0, 0.0, 1.0])
    buf = io.BytesIO()
    torch.save(ck, buf)
    return buf.getvalue()


def boxes(srv) -> tuple[list[int], list[int]]:
    """(the served segmentation's tumour box, the automatic box classify_subtype used)."""
    seg = infer(srv, "segmentation", SID)
    assert seg.status_code == 200, seg.text[:300]
    cls = infer(srv, "classify_subtype", SID, {"no_heatmap": True})
    assert cls.status_code == 200, cls.text[:300]
    assert cls.json()["roi_source"] == "segmentation"
    return seg.json()["tumor_roi"], cls.json()["roi"]


def test_automatic_box_follows_the_served_segmentation_checkpoint(srv):
    seg0, auto0 = boxes(srv)
    assert auto0 == seg0

    up = requests.put(f"{srv.url}/model/segmentation", files={"file": ("seg.pt", tumour_everywhere())}, timeout=120)
    assert up.status_code == 200, up.text[:300]
    seg1, auto1 = boxes(srv)
    shape = read_study(os.path.join(srv.studies, f"{SID}.nii.gz")).shape
    assert seg1 != seg0 and seg1 == [0, shape[0], 0, shape[1], 0, shape[2]]  # tumour everywhere: the whole image
    assert auto1 == seg1, "the automatic box must come from the served (uploaded) segmentation checkpoint"

    versions = requests.get(f"{srv.url}/model/versions/segmentation", timeout=30).json()
    first = min(v["version"] for v in versions["versions"])
    rb = requests.post(f"{srv.url}/model/rollback/segmentation", params={"version": first}, timeout=120)
    assert rb.status_code == 200, rb.text[:300]
    seg2, auto2 = boxes(srv)
    assert seg2 == seg0 and auto2 == seg0, "after the rollback the automatic box is the first checkpoint's again"
