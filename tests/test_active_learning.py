"""Active learning over the real server: unlabeled studies are scored, strategies pick the most
uncertain study, and scores are stored per study (not per sequence)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests

from parotid.cohort import load_cohort

BIN = Path(sys.executable).parent
KEYS = {"seg_uncertainty": "seg_tta_variance", "seg_tumour_uncertainty": "seg_tumour_tta_variance",
        "cls_entropy": "cls_entropy", "cls_margin": "cls_margin",
        "cls_mc_dropout": "cls_mc_std"}


def _upload_new_studies(server, tmp_path, n=3):
    out = tmp_path / "new"
    subprocess.run([str(BIN / "parotid-synth"), "--out", str(out), "--n", str(n), "--seed", "9090", "--no-raw",
                    "--keep", "CET1,T2", "--quiet"], check=True)
    ids = []
    for it in load_cohort(str(out)):
        r = requests.put(f"{server.url}/datastore/", params={"image": it.study_id},
                         files={"file": (f"{it.study_id}.nii.gz", open(it.image, "rb").read())}, timeout=60)
        assert r.status_code == 200, r.text
        ids.append(it.study_id)
    return ids


def _wait_scoring_idle(server, timeout: float = 300) -> None:
    """Label saves by earlier tests start MONAI Label's background scoring (auto update); a second
    scoring job is refused with 429 while it runs, so wait (bounded) until none is running."""
    deadline = time.time() + timeout
    while requests.get(server.url + "/scoring/", params={"check_if_running": "true"}, timeout=30).status_code == 200:
        assert time.time() < deadline, "a background scoring job did not finish in time"
        time.sleep(1)


def test_uncertainty_scores_drive_next_sample(server, tmp_path):
    ids = _upload_new_studies(server, tmp_path)
    _wait_scoring_idle(server)
    r = requests.post(f"{server.url}/scoring/study_uncertainty", params={"run_sync": "true"}, json={}, timeout=600)
    assert r.status_code == 200, r.text
    deadline = time.time() + 60
    while time.time() < deadline:  # the server's datastore reloads the index written by the scorer
        objects = requests.get(server.url + "/datastore/?output=all", timeout=30).json()["objects"]
        if all("seg_tumour_tta_variance" in objects[i]["image"]["info"] for i in ids):
            break
        time.sleep(1)
    unlabeled = {k: v["image"]["info"] for k, v in objects.items() if "final" not in v.get("labels", {})}
    for i in ids:
        info = unlabeled[i]
        assert info["seg_tta_variance"] >= 0
        assert 0 <= info["seg_tumour_tta_variance"] <= 1  # 1: no tumour predicted
        assert 0 <= info["cls_entropy"] <= 1.39 + 1e-6  # <= ln(4)
        assert 0 <= info["cls_margin"] <= 1
    for strategy, key in KEYS.items():
        scored = {k: v[key] for k, v in unlabeled.items() if key in v}
        nxt = requests.post(f"{server.url}/activelearning/{strategy}", json={}, timeout=30).json()
        assert nxt["id"] in unlabeled
        # the pick is the most uncertain study among the scored ones
        assert scored[nxt["id"]] == max(scored.values()), (strategy, nxt["id"], scored)
