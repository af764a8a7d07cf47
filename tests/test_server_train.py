"""Training over the real server: /train runs in MONAI Label's subprocess, stats reach /info,
the checkpoint is replaced atomically and hot-reloaded by inference, a second request gets 429."""

from __future__ import annotations

import time

import requests

from parotid.segmentation.train import recorded_shapes


def wait_for_training(server, timeout=600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = requests.get(server.url + "/train/", timeout=30)
        if r.status_code == 200 and r.json().get("status") in ("DONE", "ERROR"):
            return r.json()
        time.sleep(2)
    raise TimeoutError("training did not finish")


def test_train_segmentation_updates_stats_and_hot_reloads(server, app_copy, sample_ids):
    ckpt = app_copy / "model" / "segmentation.pt"
    before_mtime = ckpt.stat().st_mtime
    shapes_before = recorded_shapes(str(ckpt))  # shipped: full-resolution complete part, half-resolution incomplete
    before = requests.get(server.url + "/info/", timeout=30).json()["train_stats"]["segmentation"]
    loaded = f"loaded segmentation checkpoint {ckpt} "  # parotid.segmentation.checkpoint.HotCheckpoint
    assert requests.post(f"{server.url}/infer/segmentation", params={"image": sample_ids[0], "output": "json"},
                         timeout=120).status_code == 200
    loads_before = server.log_tail(10**9).count(loaded)
    assert loads_before >= 1
    objects = requests.get(server.url + "/datastore/?output=all", timeout=30).json()["objects"]
    labelled = [k for k, v in objects.items() if "final" in v.get("labels", {})]
    r = requests.post(server.url + "/train/segmentation", json={"iterations": 30, "batch_size": 2, "force": True},
                      timeout=30)  # forced past the promotion gate (tests/test_registry_server.py tests the gate)
    assert r.status_code == 200, r.text
    # MONAI Label counts a training as running once its subprocess exists: wait for that, then ask again
    deadline = time.time() + 60
    while requests.get(server.url + "/train/", params={"check_if_running": "true"}, timeout=30).status_code != 200:
        assert time.time() < deadline, "training subprocess did not start"
        time.sleep(0.2)
    busy = requests.post(server.url + "/train/contour_box", json={"iterations": 3}, timeout=30)
    assert busy.status_code == 429, busy.text  # one training at a time (MONAI Label's rule)
    # inference keeps answering while the training subprocess runs
    assert requests.post(f"{server.url}/infer/segmentation", params={"image": sample_ids[0], "output": "json"},
                         timeout=120).status_code == 200
    task = wait_for_training(server)
    assert task["status"] == "DONE", task.get("details")
    after = requests.get(server.url + "/info/", timeout=30).json()["train_stats"]["segmentation"]
    assert after["iterations"] == 30 and after["version"] > before["version"]
    # every study with a final label: trained on, validated on, or held out for the promotion gate
    assert after["train_studies"] + after["val_studies"] + after["n_holdout"] == len(labelled)
    assert ckpt.stat().st_mtime > before_mtime
    r = requests.post(f"{server.url}/infer/segmentation", params={"image": sample_ids[0], "output": "json"}, timeout=120)
    assert r.status_code == 200
    # the served task noticed the new checkpoint file and loaded it (once more than before the training)
    assert server.log_tail(10**9).count(loaded) > loads_before
