"""One server, several worker processes (`parotid.serve start_server --workers 2`, issue 11 item 4a), over
the REAL server on loopback:
- label saves and image-info updates sent concurrently to both workers are all in the index, each with
  its own info, and both workers list them;
- one training at a time across workers: while one runs, POST /train on every worker is a 429 naming it;
- a checkpoint replaced through one worker (PUT /model) is served by every worker (result checksum).
Each answer names its process (`X-Served-By`). Data are SYNTHETIC (the bundled sample cohort)."""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch

from conftest import SAMPLE, Server, copy_app, copy_studies, infer
from parotid.study import read_study

WORKERS = 2


def served_by(url: str, n: int, timeout: float = 240) -> set[str]:
    """Wait until `n` distinct processes have answered GET /info/ (each request on a new connection)."""
    seen: set[str] = set()
    deadline = time.time() + timeout
    while len(seen) < n and time.time() < deadline:
        with ThreadPoolExecutor(4) as pool:
            for r in pool.map(lambda _: requests.get(url + "/info/", timeout=60), range(4)):
                if r.ok:
                    seen.add(r.headers["x-served-by"])
        time.sleep(0.5)
    assert len(seen) >= n, f"only {seen} answered"
    return seen


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    srv = Server(copy_studies(SAMPLE, root / "studies"), root / "server.log", app=copy_app(root / "app"),
                 workers=WORKERS).start(timeout=300)
    srv.app_dir = root / "app"
    served_by(srv.url, WORKERS)
    yield srv
    srv.stop()


def _label(path, tmp_path, sid) -> bytes:
    study = read_study(str(path), sid)
    arr = np.zeros(study.shape, np.uint8)
    arr[10:16, 10:16, 4:8] = 2
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.CopyInformation(study.reference)
    p = tmp_path / f"{sid}.nii.gz"
    sitk.WriteImage(img, str(p), useCompression=True)
    return p.read_bytes()


def _objects(url: str) -> tuple[str, dict]:
    r = requests.get(url + "/datastore/", params={"output": "all"}, timeout=60)
    return r.headers["x-served-by"], r.json()["objects"]


def test_concurrent_label_saves_on_two_workers_lose_nothing(workers, tmp_path):
    ids = sorted(json.loads((SAMPLE / "datastore_v2.json").read_text())["objects"])
    labels = {sid: _label(SAMPLE / f"{sid}.nii.gz", tmp_path, sid) for sid in ids}

    def save(job):
        kind, sid, tag = job
        if kind == "label":
            info = {"tumor_class": "warthin", "roi": [10, 16, 10, 16, 4, 8], "annotator": f"{tag}-{sid}"}
            r = requests.put(f"{workers.url}/datastore/label", params={"image": sid, "tag": tag},
                             files={"label": (f"{sid}.nii.gz", labels[sid])}, data={"params": json.dumps(info)},
                             timeout=120)
        else:
            r = requests.put(f"{workers.url}/datastore/image/info", params={"image": sid},
                             data={"info": json.dumps({f"reviewed_{tag}": sid})}, timeout=120)
        return r.status_code, r.text[:200], r.headers.get("x-served-by")

    jobs = [(kind, sid, tag) for tag in ("wa", "wb") for sid in ids for kind in ("label", "info")]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(save, jobs))
    assert [r for r in results if r[0] != 200] == []
    assert len({r[2] for r in results}) == WORKERS  # both workers wrote

    def complete(objects: dict) -> list[str]:
        missing = []
        for sid in ids:
            obj = objects[sid]
            for tag in ("wa", "wb"):
                if obj["labels"].get(tag, {}).get("info", {}).get("annotator") != f"{tag}-{sid}":
                    missing.append(f"{sid} label {tag}")
                if obj["image"]["info"].get(f"reviewed_{tag}") != sid:
                    missing.append(f"{sid} image info {tag}")
        return missing

    on_disk = json.loads((Path(workers.studies) / "datastore_v2.json").read_text())["objects"]
    assert complete(on_disk) == []
    # every worker's own view converges on the index (its file watcher reloads it)
    seen: dict[str, list[str]] = {}
    deadline = time.time() + 60
    while (len(seen) < WORKERS or any(seen.values())) and time.time() < deadline:
        who, objects = _objects(workers.url)
        seen[who] = complete(objects)
        time.sleep(0.2)
    assert len(seen) == WORKERS and not any(seen.values()), seen


def test_one_training_across_workers(workers):
    lock_file = workers.app_dir / "model" / ".training.lock"
    r = requests.post(f"{workers.url}/train/contour_box", json={"iterations": 3, "batch_size": 2}, timeout=60)
    assert r.status_code == 200, r.text
    owner = r.headers["x-served-by"]
    refused: dict[str, str] = {}
    deadline = time.time() + 120
    while len(refused) < WORKERS and time.time() < deadline:
        busy = requests.post(f"{workers.url}/train/segmentation", json={"iterations": 3}, timeout=60)
        assert busy.status_code == 429, busy.text  # on the owner and on the other worker alike
        refused[busy.headers["x-served-by"]] = busy.json()["detail"]
    assert len(refused) == WORKERS and owner in refused
    for detail in refused.values():
        assert "contour_box" in detail and "already running" in detail
    # the lock is released when the training has ended (polled from here: flock is cross-process)
    deadline = time.time() + 600
    while True:
        with open(lock_file, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "training lock never released"
        time.sleep(2)


def test_every_worker_serves_a_replaced_checkpoint(workers, tmp_path):
    objects = _objects(workers.url)[1]
    sid, info = next((k, v["labels"]["final"]["info"]) for k, v in sorted(objects.items())
                     if "roi" in v["labels"].get("final", {}).get("info", {}))

    def checksums() -> dict[str, set[tuple]]:
        """(checkpoint.checksum, scores) answered by each worker (until every worker answered)."""
        got: dict[str, set[tuple]] = {}
        deadline = time.time() + 240
        while len(got) < WORKERS and time.time() < deadline:
            with ThreadPoolExecutor(4) as pool:
                rs = list(pool.map(lambda _: infer(workers, "classify_subtype", sid, {"roi": info["roi"]}), range(4)))
            for r in rs:
                assert r.status_code == 200, r.text[:300]
                scores = tuple(round(p["score"], 6) for p in r.json()["prediction"])
                got.setdefault(r.headers["x-served-by"], set()).add((r.json()["checkpoint"]["checksum"], scores))
        assert len(got) == WORKERS, got
        return got

    before = checksums()  # every worker has loaded (and cached) the shipped checkpoint
    ck = torch.load(workers.app_dir / "model" / "classify_subtype.pt", map_location="cpu", weights_only=True)
    state = ck["state_dict"]
    name = next(k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point())
    state[name] = state[name] * 1.5  # other weights, same architecture and label set
    new = tmp_path / "classify_subtype.pt"
    torch.save(ck, new)
    r = requests.put(f"{workers.url}/model/classify_subtype", files={"file": ("c.pt", new.read_bytes())}, timeout=120)
    assert r.status_code == 200, r.text
    new_sum = r.json()["checksum"]
    old_scores = {scores for answers in before.values() for _, scores in answers}
    assert len(old_scores) == 1 and all(new_sum != c for answers in before.values() for c, _ in answers)
    after = checksums()
    # every worker names the new checkpoint and answers with its weights (other scores than before)
    assert all({c for c, _ in answers} == {new_sum} for answers in after.values()), after
    assert all(not ({s for _, s in answers} & old_scores) for answers in after.values()), (before, after)


def test_index_writes_in_one_clock_tick_are_not_lost(tmp_path):
    """Two processes writing the index within one tick of the kernel's file clock leave it with the
    same mtime; LocalDatastore took an unchanged mtime for an unchanged file, so the first process kept
    its stale copy and its next write dropped the other's change. Two StudyDatastore instances stand for
    two workers; the tick is made the same by restoring the mtime (os.utime), as a fast machine does."""
    import os
    import sys
    sys.path.insert(0, str(SAMPLE.parents[1] / "apps" / "parotid"))
    from lib.datastore import StudyDatastore

    studies = copy_studies(SAMPLE, tmp_path / "studies")
    index = studies / "datastore_v2.json"
    one = StudyDatastore(str(studies), auto_reload=False)
    two = StudyDatastore(str(studies), auto_reload=False)
    sid = sorted(one.list_images())[0]
    one.update_image_info(sid, {"by_one": 1})
    tick = index.stat().st_mtime_ns
    two.update_image_info(sid, {"by_two": 2})
    os.utime(index, ns=(tick, tick))  # written in the same clock tick as worker one's write
    one.update_image_info(sid, {"by_one_again": 3})
    info = json.loads(index.read_text())["objects"][sid]["image"]["info"]
    assert (info.get("by_one"), info.get("by_two"), info.get("by_one_again")) == (1, 2, 3)
