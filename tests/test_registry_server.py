"""Gated promotion over the real server (issue 12): a deliberately bad retrain (1 + 2 epochs) is rejected
and the served checksum stays; a forced one is promoted and the version increments; rollback restores
the old checksum and /info + /model/info describe it; an uploaded checkpoint becomes a version; the
repository's tracked checkpoints are unchanged after it all."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import requests

from conftest import APP, SAMPLE, infer, private_server
from parotid.cohort import load_cohort, split_holdout

MODEL = "classify_subtype"


def tracked_model_files() -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((APP / "model").iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def tracked_before():
    return tracked_model_files()


@pytest.fixture(scope="module")
def srv(tracked_before, tmp_path_factory):
    s = private_server(tmp_path_factory.mktemp("registry"), models=MODEL)
    yield s
    s.stop()


def get(srv, path, **kw):
    r = requests.get(srv.url + path, timeout=60, **kw)
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    return r.json()


def train(srv, body: dict, timeout=900) -> dict:
    r = requests.post(f"{srv.url}/train/{MODEL}", json=body, timeout=30)
    assert r.status_code == 200, r.text[:300]
    deadline = time.time() + timeout
    while time.time() < deadline:
        t = requests.get(srv.url + "/train/", timeout=30).json()
        if t.get("status") in ("DONE", "ERROR"):
            assert t["status"] == "DONE", list(t.get("details", []))[-5:]
            return t
        time.sleep(2)
    raise TimeoutError("training did not finish")


def served(srv) -> dict:
    """What the server says about the served checkpoint, every way it says it."""
    info = get(srv, "/info/")
    minfo = get(srv, f"/model/info/{MODEL}")
    sid = "syn7_0000"
    roi = json.loads((SAMPLE / "datastore_v2.json").read_text())[
        "objects"][sid]["labels"]["final"]["info"]["roi"]
    res = infer(srv, MODEL, sid, {"roi": roi, "no_heatmap": True})
    assert res.status_code == 200, res.text[:300]
    res = res.json()
    return {"version": minfo["version"], "checksum": minfo["checksum"], "info_version": info["models"][MODEL]["version"],
            "stats": info["train_stats"][MODEL], "result_version": res["version"],
            "result_checksum": res["checkpoint"]["checksum"], "trained_at": res["trained_at"]}


def test_gate_rejects_promotes_rolls_back(srv, tmp_path):
    v1 = served(srv)
    assert v1["version"] == v1["info_version"] == v1["result_version"] == v1["stats"]["version"] == 1
    assert v1["result_checksum"] == v1["checksum"]
    versions = get(srv, f"/model/versions/{MODEL}")
    assert versions["served_version"] == 1 and [v["source"] for v in versions["versions"]] == ["shipped"]

    # a deliberately bad retrain: rejected, the served checkpoint untouched, said in plain words
    task = train(srv, {"epochs1": 1, "epochs2": 2})
    assert task["candidate"]["status"] == "rejected" and task["candidate"]["version"] == 2, task.get("candidate")
    assert task["candidate"]["reason"].startswith("rejected: macro-AUC"), task["candidate"]
    assert "held-out studies" in task["candidate"]["reason"]
    after_bad = served(srv)
    assert after_bad["checksum"] == v1["checksum"] and after_bad["version"] == after_bad["result_version"] == 1
    last = after_bad["stats"]["last_candidate"]
    assert last["status"] == "rejected" and last["summary"].startswith("version 2 (") and "rejected:" in last["summary"]

    # forced by the admin: promoted, the version increments, inference hot-reloads it
    task = train(srv, {"epochs1": 1, "epochs2": 2, "force": True})
    assert task["candidate"]["status"] == "promoted" and "forced" in task["candidate"]["reason"]
    v3 = served(srv)
    assert v3["version"] == v3["info_version"] == v3["result_version"] == v3["stats"]["version"] == 3
    assert v3["checksum"] != v1["checksum"] and v3["result_checksum"] == v3["checksum"]
    assert v3["stats"]["date"] == v3["trained_at"] != v1["trained_at"]  # /info describes the served checkpoint
    assert v3["stats"]["n_holdout"] == 3 and v3["stats"]["n_train"] + v3["stats"]["n_val"] == 17
    meta = {v["version"]: v for v in get(srv, f"/model/versions/{MODEL}")["versions"]}
    assert meta[3]["parent"] == 1 and meta[3]["metrics"]["candidate"]["n"] == meta[3]["metrics"]["served"]["n"] == 3
    assert meta[2]["status"] == "rejected" and meta[1]["status"] == "superseded" and meta[3]["served"]
    data = meta[3]["data"]  # trained only outside the fixed held-out part, which both were scored on
    held = sorted(it.study_id for it in split_holdout(load_cohort(str(SAMPLE)))[1])
    assert sorted(data["holdout_study_ids"]) == sorted(meta[3]["metrics"]["candidate"]["study_ids"]) == held
    assert data["n_train"] == 17 and not set(data["train_study_ids"]) & set(held)

    # rollback to the shipped version: old checksum, /info and /model/info describe it
    r = requests.post(f"{srv.url}/model/rollback/{MODEL}", params={"version": 1}, timeout=60)
    assert r.status_code == 200 and r.json()["served_version"] == 1, r.text
    back = served(srv)
    assert back["checksum"] == v1["checksum"] and back["version"] == back["result_version"] == 1
    assert back["stats"]["date"] == v1["stats"]["date"] and back["trained_at"] == v1["trained_at"]
    assert {v["version"]: v["status"] for v in get(srv, f"/model/versions/{MODEL}")["versions"]}[3] == "rolled_back"

    # an uploaded checkpoint (here: version 3's file) is registered as a new version and described
    with open(f"{srv.app}/model/registry/{MODEL}/v3/{MODEL}.pt", "rb") as f:
        up = requests.put(f"{srv.url}/model/{MODEL}", files={"file": ("m.pt", f)}, timeout=60)
    assert up.status_code == 200 and up.json()["version"] == 4, up.text
    v4 = served(srv)
    assert v4["version"] == v4["result_version"] == 4 and v4["checksum"] == v3["checksum"]
    assert v4["stats"]["date"] == v3["stats"]["date"]
    assert {v["version"]: v["source"] for v in get(srv, f"/model/versions/{MODEL}")["versions"]}[4] == "upload"


@pytest.mark.parametrize("path, params, status, words", [
    (f"/model/rollback/{MODEL}", {"version": 99}, 404, "no version 99"),
    (f"/model/rollback/{MODEL}", {"version": 2}, 409, "rejected"),
    (f"/model/rollback/{MODEL}", {"version": "x"}, 422, ""),
    (f"/model/rollback/{MODEL}", {}, 422, ""),
    ("/model/rollback/nope", {"version": 1}, 404, "unknown model"),
])
def test_rollback_errors_are_json_4xx(srv, path, params, status, words):
    r = requests.post(srv.url + path, params=params, timeout=30)
    assert r.status_code == status and words in json.dumps(r.json()["detail"]), r.text[:300]


def test_versions_of_unknown_model_is_404(srv):
    r = requests.get(srv.url + "/model/versions/nope", timeout=30)
    assert r.status_code == 404 and "unknown model" in r.json()["detail"]


def test_force_must_be_a_boolean(srv):
    r = requests.post(f"{srv.url}/train/{MODEL}", json={"force": "yes"}, timeout=30)
    assert r.status_code == 422 and "force must be true or false" in r.json()["detail"], r.text[:300]


def test_tracked_checkpoints_are_unchanged(srv, tracked_before):
    """Runs last in this module: after trainings, rollback and upload, apps/parotid/model is as committed."""
    assert tracked_model_files() == tracked_before
    assert not (APP / "model" / "registry").exists()
    assert not (APP / "model" / ".training.lock").exists()  # refused before any file is written there


def test_a_server_on_the_repository_model_dir_never_changes_it(tracked_before, tmp_path):
    """Started on the tracked app itself (no --conf model_dir): inference works, version 1; uploads,
    deletions, rollbacks and trainings are refused with 409 and the tracked files stay as committed."""
    from conftest import Server, copy_studies

    s = Server(copy_studies(SAMPLE, tmp_path / "studies"), tmp_path / "server.log", models="contour_box").start()
    try:
        assert get(s, "/model/info/contour_box")["version"] == 1
        assert get(s, "/info/")["train_stats"]["contour_box"]["version"] == 1
        with open(APP / "model" / "contour_box.pt", "rb") as f:
            r = requests.put(f"{s.url}/model/contour_box", files={"file": ("m.pt", f)}, timeout=60)
        assert r.status_code == 409 and "git checkout" in r.json()["detail"], r.text[:300]
        r = requests.delete(f"{s.url}/model/contour_box", timeout=30)
        assert r.status_code == 409 and "git checkout" in r.json()["detail"], r.text[:300]
        r = requests.post(f"{s.url}/model/rollback/contour_box", params={"version": 1}, timeout=30)
        assert r.status_code == 409, r.text[:300]
        r = requests.post(f"{s.url}/train/contour_box", params={"run_sync": "true"}, json={"iterations": 1}, timeout=300)
        assert r.status_code >= 400 and "git checkout" in r.text, r.text[:300]
    finally:
        s.stop()
    assert tracked_model_files() == tracked_before
    assert not (APP / "model" / "registry").exists()
