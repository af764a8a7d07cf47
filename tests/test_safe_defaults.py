"""Safe defaults and small fixes (issue 9, item 6), over REAL servers on loopback:

- `./scripts/serve.sh` serves a runtime copy of the sample studies and checkpoints: a run that uploads,
  labels and replaces a checkpoint leaves every file under sample-data/ and apps/parotid/model as it was;
  it listens on 127.0.0.1 only;
- CORS: a cross-origin preflight from an arbitrary origin gets no Access-Control-Allow-Origin, the
  server's own loopback origin (default) or an admin-configured origin (PAROTID_CORS_ORIGINS) does;
- every /activelearning/* strategy answers 200 JSON or 4xx JSON, never a 500 (random twice within a
  second; nothing left; odd image info; malformed params);
- a study no model can process (T1 + ADC only) is flagged on upload and skipped, not fatal, in batch
  inference; its good twin (all sequences) is not flagged and is inferred.

Data are SYNTHETIC (the bundled sample cohort).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import requests

from conftest import APP, BIN, ROOT, SAMPLE, free_port, private_server
from parotid.study import read_study, study_from_array, write_study

EVIL = "http://evil.example"
TRACKED = (ROOT / "sample-data", APP / "model")


def _fingerprint() -> dict[str, str]:
    """sha256 of every file (tracked or not) under sample-data/ and apps/parotid/model."""
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in TRACKED for p in sorted(d.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _git_status() -> str | None:
    try:
        return subprocess.run(["git", "status", "--porcelain", "--", *map(str, TRACKED)], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (e.g. an unpacked release): the fingerprint still checks


def _preflight(url: str, origin: str) -> requests.Response:
    return requests.options(f"{url}/info/", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "GET"})


def _detail(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


# ----------------------------------------------------------------------------------- scripts/serve.sh
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """scripts/serve.sh as the README runs it (setup skipped: this venv is installed), on a free port,
    with its runtime folder in a temp dir and one admin-configured CORS origin (PAROTID_CORS_ORIGINS)."""
    runtime = tmp_path_factory.mktemp("runtime") / "parotid"
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PORT": str(port),
           "PAROTID_RUNTIME": str(runtime), "PAROTID_SKIP_SETUP": "1", "PAROTID_SKIP_APT": "1",
           "PAROTID_CORS_ORIGINS": "http://viewer.example:3000"}
    env.pop("HOST", None)
    before = (_fingerprint(), _git_status())
    log = open(runtime.parent / "serve.log", "wb")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "serve.sh")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url, ready = f"http://127.0.0.1:{port}", False
    deadline = time.time() + 180
    while not ready and time.time() < deadline and proc.poll() is None:
        try:
            ready = requests.get(url + "/info/", timeout=5).ok
        except requests.ConnectionError:
            time.sleep(1)
    try:
        assert ready, (runtime.parent / "serve.log").read_text()[-3000:]
        yield url, proc, runtime, before
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()


def test_serve_sh_listens_on_loopback_and_restricts_cors(served):
    url, proc, _, _ = served
    listening = {c.laddr.ip for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                 for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == int(url.rsplit(":", 1)[1])}
    assert listening == {"127.0.0.1"}, listening
    assert "access-control-allow-origin" not in _preflight(url, EVIL).headers
    assert "access-control-allow-origin" not in requests.get(f"{url}/info/", headers={"Origin": EVIL}, timeout=30).headers
    # the admin's origin
    ok = _preflight(url, "http://viewer.example:3000")
    assert ok.status_code == 200 and ok.headers.get("access-control-allow-origin") == "http://viewer.example:3000"


def test_serve_sh_never_changes_tracked_files(served, tmp_path):
    url, proc, runtime, (files_before, git_before) = served
    sid = "serve_sh_upload"
    with open(SAMPLE / "syn7_0002.nii.gz", "rb") as f:
        r = requests.put(f"{url}/datastore/image", params={"image": sid}, files={"file": (f"{sid}.nii.gz", f)}, timeout=60)
    assert r.status_code == 200, r.text
    with open(SAMPLE / "labels" / "final" / "syn7_0002.nii.gz", "rb") as f:
        r = requests.put(f"{url}/datastore/label", params={"image": sid, "tag": "final"},
                         data={"params": json.dumps({"tumor_class": "warthin"})}, files={"label": ("l.nii.gz", f)},
                         timeout=60)
    assert r.status_code == 200, r.text
    ckpt = (APP / "model" / "contour_box.pt").read_bytes()
    r = requests.put(f"{url}/model/contour_box", files={"file": ("m.pt", ckpt)}, timeout=60)
    assert r.status_code == 200, r.text
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)
    # the work landed in the runtime copy ...
    assert (runtime / "studies" / f"{sid}.nii.gz").exists()
    assert (runtime / "studies" / "labels" / "final" / f"{sid}.nii.gz").exists()
    assert sid in json.loads((runtime / "studies" / "datastore_v2.json").read_text())["objects"]
    assert (runtime / "model" / "contour_box.pt").read_bytes() == ckpt
    # ... and nothing under sample-data/ or apps/parotid/model changed
    assert _fingerprint() == files_before
    assert _git_status() == git_before


# ----------------------------------------------------------------------------------- private server
@pytest.fixture(scope="module")
def private(tmp_path_factory):
    srv = private_server(tmp_path_factory.mktemp("safe"))
    yield srv
    srv.stop()


def test_default_cors_allows_only_the_servers_own_origin(private):
    url = private.url
    assert "access-control-allow-origin" not in _preflight(url, EVIL).headers
    assert "access-control-allow-origin" not in _preflight(url, "null").headers
    for origin in (url, f"http://localhost:{private.port}"):
        r = _preflight(url, origin)
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == origin, (origin, r.headers)


def _strategies(url: str) -> list[str]:
    return sorted(requests.get(f"{url}/info/", timeout=30).json()["strategies"])


def test_strategies_with_nothing_left_answer_empty_json(private):
    """All shipped studies carry a final label: nothing to propose is {} (the Slicer client's 'none left')."""
    for strategy in _strategies(private.url):
        r = requests.post(f"{private.url}/activelearning/{strategy}", json={}, timeout=30)
        assert r.status_code == 200 and r.json() == {}, (strategy, r.status_code, r.text[:200])


def test_every_strategy_twice_within_a_second_never_500(private):
    url = private.url
    with open(SAMPLE / "syn7_0004.nii.gz", "rb") as f:
        assert requests.put(f"{url}/datastore/image", params={"image": "al_one"},
                            files={"file": ("al_one.nii.gz", f)}, timeout=60).status_code == 200
    for strategy in _strategies(url):
        for _ in range(3):  # MONAI Label's Random weighted by seconds since served: all 0 -> HTTP 500
            r = requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=30)
            assert r.status_code == 200 and r.json()["id"] == "al_one", (strategy, r.status_code, r.text[:200])


def test_strategies_survive_odd_image_info_and_params(private):
    url = private.url
    info_url = f"{url}/datastore/image/info"
    # the served-time record is the server's: a client cannot break it
    r = requests.put(info_url, params={"image": "al_one"}, data={"info": json.dumps({"strategy": "x"})}, timeout=30)
    assert "strategy" in _detail(r, 422)
    # a score that is not a number ranks as unscored (0), next to a study with a numeric score
    with open(SAMPLE / "syn7_0006.nii.gz", "rb") as f:
        assert requests.put(f"{url}/datastore/image", params={"image": "al_two"},
                            files={"file": ("al_two.nii.gz", f)}, timeout=60).status_code == 200
    for sid, info in (("al_one", {"seg_tta_variance": "high", "cls_entropy": None}),
                      ("al_two", {"seg_tta_variance": 0.5, "cls_entropy": 0.1})):
        r = requests.put(info_url, params={"image": sid}, data={"info": json.dumps(info)}, timeout=30)
        assert r.status_code == 200, r.text
    r = requests.post(f"{url}/activelearning/seg_uncertainty", json={}, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "al_two", r.text[:300]  # al_one was served a moment ago
    for strategy in _strategies(url):
        r = requests.post(f"{url}/activelearning/{strategy}", json={}, timeout=30)
        assert r.status_code == 200 and r.json()["id"] in ("al_one", "al_two"), (strategy, r.status_code, r.text[:200])
    assert requests.delete(f"{url}/datastore/image", params={"id": "al_two"}, timeout=30).status_code == 200
    for params in ({"strategy": []}, {"strategy": {"a": 1}}):
        assert "strategy" in _detail(requests.post(f"{url}/activelearning/first", json=params, timeout=30), 422)
    r = requests.post(f"{url}/activelearning/first", json={"strategy": "random"}, timeout=30)  # good twin
    assert r.status_code == 200 and r.json()["id"] == "al_one"


def test_unprocessable_study_is_flagged_on_upload_and_skipped_in_batch(private, tmp_path):
    url = private.url
    models = requests.get(f"{url}/info/", timeout=30).json()["models"]
    full = read_study(str(SAMPLE / "syn7_0005.nii.gz"))
    keep = ["T1", "ADC"]
    write_study(study_from_array(full.array(keep), keep, full.reference), str(tmp_path / "t1adc.nii.gz"))
    answers = {}
    for sid, path in (("t1_adc_only", tmp_path / "t1adc.nii.gz"), ("full_twin", SAMPLE / "syn7_0005.nii.gz")):
        with open(path, "rb") as f:
            r = requests.put(f"{url}/datastore/image", params={"image": sid}, files={"file": (f"{sid}.nii.gz", f)},
                             timeout=60)
        assert r.status_code == 200, r.text
        answers[sid] = r.json()
    bad, good = answers["t1_adc_only"], answers["full_twin"]
    expected = {m: [s for s in v["required_sequences"] if s not in keep] for m, v in models.items()
                if "required_sequences" in v and not set(v["required_sequences"]) <= set(keep)}
    assert expected and bad["models_unavailable"] == expected, bad
    assert any("no model" in w for w in bad["warnings"]) and any("T2" in w for w in bad["warnings"]), bad
    assert good["models_unavailable"] == {} and good["warnings"] == [], good
    objects = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    assert objects["t1_adc_only"]["image"]["info"]["models_unavailable"] == expected
    assert objects["full_twin"]["image"]["info"]["warnings"] == []
    # batch inference over the unlabeled studies: the bad one is reported and skipped, the rest inferred
    r = requests.post(f"{url}/batch/infer/segmentation", params={"run_sync": "true", "images": "unlabeled"},
                      json={}, timeout=600)
    assert r.status_code == 200, r.text[:500]
    res = r.json()
    assert res["t1_adc_only"]["skipped"] is True and res["t1_adc_only"]["status"] == 422, res
    assert "T2" in res["t1_adc_only"]["detail"] and "/tmp" not in res["t1_adc_only"]["detail"]
    assert res["full_twin"]["tag"] == "original", res
    assert all(v.get("tag") == "original" for k, v in res.items() if k != "t1_adc_only"), res
    assert requests.get(f"{url}/datastore/label", params={"label": "full_twin", "tag": "original"},
                        timeout=30).status_code == 200
    assert requests.get(f"{url}/datastore/label", params={"label": "t1_adc_only", "tag": "original"},
                        timeout=30).status_code == 404
    assert private.alive()
