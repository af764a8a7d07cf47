"""Two server replicas behind REAL nginx (deploy/nginx/start.sh) over one shared study folder and one model
folder, on loopback (issue 11 item 4b):
- labels saved through nginx land on either replica and both replicas answer with all of them;
- load through nginx while one replica is killed with SIGKILL: zero failed requests (nginx sends the
  failed ones to the other replica: GET always, POST /infer because it is idempotent, see the config).
Bounded loops only. Data are SYNTHETIC (the bundled sample cohort)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import APP, BIN, ROOT, SAMPLE, copy_studies, free_port, infer
from test_workers import _label

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx not installed (deploy/nginx/install.sh)")


class Deployment:
    def __init__(self, root: Path, models: str = "classify_subtype"):
        self.run = root / "run"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = root / "model"
        shutil.copytree(APP / "model", model)
        self.studies = copy_studies(SAMPLE, root / "studies")
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
               "STUDIES": str(self.studies), "MODEL_DIR": str(model), "MODELS": models,
               "REPLICAS": "2", "PORT": str(self.port), "BASE_PORT": str(free_port())}
        subprocess.run(["bash", str(ROOT / "deploy/nginx/start.sh"), str(self.run)], env=env, check=True, timeout=900)
        self.replicas = [f"http://127.0.0.1:{(self.run / f'replica-{k}.port').read_text().strip()}" for k in (1, 2)]

    def kill_replica(self, k: int) -> None:
        os.killpg(int((self.run / f"replica-{k}.pid").read_text()), signal.SIGKILL)

    def stop(self) -> None:
        subprocess.run(["bash", str(ROOT / "deploy/nginx/stop.sh"), str(self.run)], timeout=120)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("replicas"))
    yield d
    d.stop()


def test_labels_saved_through_either_replica_are_seen_by_both(deployment, tmp_path):
    ids = sorted(json.loads((SAMPLE / "datastore_v2.json").read_text())["objects"])[:8]
    served = set()
    for sid in ids:
        info = {"tumor_class": "warthin", "roi": [10, 16, 10, 16, 4, 8], "annotator": f"r-{sid}"}
        r = requests.put(f"{deployment.url}/datastore/label", params={"image": sid, "tag": "replicas"},
                         files={"label": (f"{sid}.nii.gz", _label(SAMPLE / f"{sid}.nii.gz", tmp_path, sid))},
                         data={"params": json.dumps(info)}, timeout=120)
        assert r.status_code == 200, r.text
        served.add(r.headers["x-served-by"])
    assert len(served) == 2  # nginx spread the saves over both replicas
    for replica in deployment.replicas:  # each replica, asked directly, has every label and its info
        deadline = time.time() + 60
        while True:
            got = {sid: requests.get(f"{replica}/datastore/label/info", params={"label": sid, "tag": "replicas"},
                                     timeout=60) for sid in ids}
            missing = [sid for sid, r in got.items() if r.status_code != 200 or r.json().get("annotator") != f"r-{sid}"]
            if not missing:
                break
            assert time.time() < deadline, f"{replica} misses labels {missing}"
            time.sleep(0.5)


def test_load_through_nginx_survives_a_replica_killed(deployment):
    objects = requests.get(f"{deployment.url}/datastore/", params={"output": "all"}, timeout=60).json()["objects"]
    sid, roi = next((k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items())
                    if "roi" in v["labels"].get("final", {}).get("info", {}))
    stop, killed_at = threading.Event(), []
    results: list[tuple[float, str, int, str]] = []

    def client(n: int) -> None:
        k = 0
        while not stop.is_set() and k < 400:  # bounded
            k += 1
            kind = ("infer", "info", "datastore")[(n + k) % 3]
            try:
                if kind == "infer":
                    r = infer(deployment, "classify_subtype", sid, {"roi": roi})
                elif kind == "info":
                    r = requests.get(f"{deployment.url}/info/", timeout=120)
                else:
                    r = requests.get(f"{deployment.url}/datastore/", params={"output": "all"}, timeout=120)
                results.append((time.time(), kind, r.status_code, r.headers.get("x-served-by", "")))
            except requests.RequestException as e:
                results.append((time.time(), kind, -1, repr(e)))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, n) for n in range(4)]
        time.sleep(8)
        deployment.kill_replica(1)
        killed_at.append(time.time())
        time.sleep(12)
        stop.set()
        for f in futures:
            f.result()
    failed = [r for r in results if r[2] != 200]
    after = [r for r in results if r[0] > killed_at[0] + 1]
    assert len(results) > 20 and len(after) > 5, len(results)
    assert failed == [], failed[:5]
    assert len({r[3] for r in after}) == 1  # only the surviving replica answers
    upstreams = [line.split("upstream=")[1].split(" ")[0] for line in (deployment.run / "access.log").read_text().splitlines()]
    print(f"{len(results)} requests, {len(after)} after the kill, {sum(',' in u for u in upstreams)} sent again by nginx")
