"""Bad requests that MONAI Label 0.8.5's own endpoints answered with HTTP 500 (found by the schemathesis
fuzz, tests/test_fuzz_openapi.py) get a 4xx JSON message here, one named case each, over the REAL
server; plus the checkpoint upload check, sessions and batch inference on a CPU-only server.
Data are SYNTHETIC (the bundled sample cohort)."""

from __future__ import annotations

import json

import pytest
import requests

from conftest import APP, SAMPLE, private_server


def _detail(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body["detail"]


@pytest.mark.parametrize("method, path, kwargs, status, words", [
    ("POST", "/infer/segmentation", {}, 422, "study id"),
    ("POST", "/infer/segmentation?image={sid}", {"data": {"params": "not json"}}, 422, "not valid JSON"),
    ("POST", "/infer/segmentation?image={sid}", {"data": {"params": "1.5"}}, 422, "malformed request"),
    ("POST", "/infer/segmentation?image={sid}", {"data": {"params": "[1, 2]"}}, 422, "malformed request"),
    ("PUT", "/datastore/image/info?image={sid}", {"data": {"info": "{"}}, 422, "not valid JSON"),
    ("PUT", "/datastore/image/info?image={sid}", {"data": {"info": "[1]"}}, 422, "malformed request"),
    ("PUT", "/datastore/image/info?image={sid}", {"data": {"info": '{"sequences": ["T1"]}'}}, 422, "set by the server"),
    ("PUT", "/datastore/label/info?label={sid}&tag=final", {"data": {"info": '{"tumor_class": "lipoma"}'}}, 422, "tumor_class"),
    ("PUT", "/datastore/label/info?label={sid}&tag=final", {"data": {"info": '{"roi": [5, 1, 0, 9, 0, 9]}'}}, 422, "roi"),
    ("PUT", "/datastore/label/info?label={sid}&tag=nosuchtag", {"data": {"info": "{}"}}, 404, "no label"),
    ("POST", "/activelearning/no_such_strategy", {}, 404, "no_such_strategy"),
    ("POST", "/scoring/no_such_method", {}, 404, "no_such_method"),
    ("POST", "/infer/wsi_v2/segmentation?image={sid}", {"data": {"wsi": "{}"}}, 404, "whole-slide"),
    ("POST", "/batch/infer/no_such_model", {"json": {}}, 404, "no_such_model"),
    ("POST", "/batch/infer/segmentation?run_sync=true", {"json": {"label_tag": "final"}}, 422, "final"),
    ("POST", "/batch/infer/segmentation", {"json": {"label_tag": "final"}}, 422, "final"),  # async: refused up front
    ("POST", "/train/no_such_model", {"json": {}}, 404, "no_such_model"),
    ("POST", "/infer/segmentation?image={sid}", {"data": {"params": '{"save_label": true, "label_tag": "final"}'}},
     422, "final"),
    ("GET", "/logs/gpu", {}, 404, "GPU"),
    ("HEAD", "/datastore/image?image={sid}&check_sum=NOPE:00", {}, 422, ""),
    ("PUT", "/session/?uncompress=true", {"files": {"files": ("x.zip", b"not a zip")}}, 422, "one study file"),
    ("PUT", "/session/", {"files": {"files": ("x.nii.gz", b"\x1f\x8b garbage")}}, 422, ""),
])
def test_client_mistakes_are_4xx_json(server, sample_ids, method, path, kwargs, status, words):
    r = requests.request(method, server.url + path.format(sid=sample_ids[0]), timeout=120, **kwargs)
    if method == "HEAD":  # no body
        assert r.status_code == status, r.status_code
    else:
        assert words in _detail(r, status)
    assert server.alive()


def test_label_info_update_keeps_the_label_valid(server, sample_ids):
    sid = sample_ids[1]
    url = f"{server.url}/datastore/label/info"
    ok = requests.put(url, params={"label": sid, "tag": "final"}, data={"info": json.dumps({"reviewed_by": "r1"})},
                      timeout=30)
    assert ok.status_code == 200, ok.text
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": sid, "tag": "final"}, timeout=30).json()
    assert info["reviewed_by"] == "r1" and info["tumor_class"] in {"pleomorphic_adenoma", "warthin",
                                                                   "basal_cell_adenoma", "malignant"}


def test_batch_inference_runs_on_a_cpu_only_server(server, sample_ids):
    """MONAI Label's batch inference divided by the CUDA device count (0 here): now it runs on the CPU
    and writes `original` labels, never `final` ones."""
    finals = {s: requests.get(f"{server.url}/datastore/label", params={"label": s, "tag": "final"}, timeout=30).content
              for s in sample_ids[:2]}
    r = requests.post(f"{server.url}/batch/infer/segmentation", params={"run_sync": "true", "images": "all"},
                      json={"max_batch_size": 2}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res) == 2 and all(v["tag"] == "original" for v in res.values()), res
    for s, before in finals.items():
        assert requests.get(f"{server.url}/datastore/label", params={"label": s, "tag": "final"}, timeout=30).content == before


def test_session_holds_one_study_and_serves_inference(server, sample_ids):
    with open(SAMPLE / f"{sample_ids[0]}.nii.gz", "rb") as f:
        r = requests.put(f"{server.url}/session/", files={"files": (f"{sample_ids[0]}.nii.gz", f)}, timeout=60)
    assert r.status_code == 200, r.text
    session = r.json()["session_id"]
    r = requests.post(f"{server.url}/infer/segmentation", params={"session_id": session, "output": "json"}, timeout=120)
    assert r.status_code == 200 and r.json()["volumes_ml"]["parotid_gland"] > 1, r.text
    assert requests.get(f"{server.url}/session/{session}", params={"image": "true"}, timeout=30).status_code == 200
    assert requests.delete(f"{server.url}/session/{session}", timeout=30).status_code == 200


# ----------------------------------------------------------------- checkpoints (private server: they change)
@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    srv = private_server(tmp_path_factory.mktemp("ckpt"))
    yield srv
    srv.stop()


def test_checkpoint_upload_is_checked_before_it_is_served(own_server, sample_ids, tmp_path):
    url, model_dir = own_server.url, APP / "model"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04 definitely not weights" * 10)
    cases = [("contour_box", garbage, "PyTorch weights"),
             ("classify_subtype", garbage, "PyTorch weights"),
             ("segmentation", model_dir / "contour_box.pt", "size mismatch"),  # another model's weights
             ("classify_subtype", model_dir / "classify_malignancy.pt", "label set")]
    for model, path, words in cases:
        with open(path, "rb") as f:
            r = requests.put(f"{url}/model/{model}", files={"file": ("m.pt", f)}, timeout=60)
        assert words in _detail(r, 422), (model, r.text)
    with open(garbage, "rb") as f:
        assert "unknown model" in _detail(requests.put(f"{url}/model/nope", files={"file": ("m.pt", f)}, timeout=30), 404)
    roi = json.dumps({"roi": [80, 100, 30, 50, 6, 16]})
    for model in ("contour_box", "classify_subtype", "segmentation"):  # still served, untouched
        r = requests.post(f"{url}/infer/{model}", params={"image": sample_ids[0], "output": "json"},
                          data={"params": roi}, timeout=120)
        assert r.status_code == 200, (model, r.text)
    with open(model_dir / "contour_box.pt", "rb") as f:  # a valid checkpoint is accepted
        r = requests.put(f"{url}/model/contour_box", files={"file": ("m.pt", f)}, timeout=60)
    assert r.status_code == 200 and r.json()["checksum"].startswith("SHA256:"), r.text


def test_inference_without_checkpoint_is_409_not_an_untrained_network(own_server, sample_ids):
    url = own_server.url
    assert requests.delete(f"{url}/model/contour_box", timeout=30).status_code == 200
    r = requests.post(f"{url}/infer/contour_box", params={"image": sample_ids[0], "output": "json"},
                      data={"params": json.dumps({"roi": [80, 100, 30, 50, 6, 16]})}, timeout=120)
    assert "no checkpoint" in _detail(r, 409)
    with open(APP / "model" / "contour_box.pt", "rb") as f:
        assert requests.put(f"{url}/model/contour_box", files={"file": ("m.pt", f)}, timeout=60).status_code == 200
    r = requests.post(f"{url}/infer/contour_box", params={"image": sample_ids[0], "output": "json"},
                      data={"params": json.dumps({"roi": [80, 100, 30, 50, 6, 16]})}, timeout=120)
    assert r.status_code == 200, r.text
