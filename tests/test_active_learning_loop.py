"""The whole active-learning loop over the REAL server, as an annotation team runs it:

new unlabeled studies arrive -> they are scored -> the annotator asks for the next study, labels it
(gland/tumour label map + tumor_class + roi), asks again ... -> the admin trains -> the checkpoint
changes -> the next inference is produced by the new checkpoint -> the scores are refreshed with it
-> the next study proposed is the most uncertain of those still unlabeled.

A private server (its own copy of app and studies, since training replaces its checkpoint). The
"annotator" submits the synthetic ground truth. All data are SYNTHETIC (parotid-synth).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import private_server

BIN = Path(sys.executable).parent
STRATEGY, SCORE = "seg_uncertainty", "seg_tta_variance"


def _objects(url: str) -> dict:
    return requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]


def _wait(predicate, timeout: float, what: str, step: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _unlabeled_scores(url: str) -> dict[str, float]:
    return {k: v["image"]["info"].get(SCORE) for k, v in _objects(url).items() if "final" not in v.get("labels", {})}


def _segment(url: str, study: str) -> dict:
    r = requests.post(f"{url}/infer/segmentation", params={"image": study, "output": "json"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def loop_server(tmp_path_factory):
    srv = private_server(tmp_path_factory.mktemp("alloop"), models="segmentation,classify_subtype")
    yield srv
    srv.stop()


def test_label_train_reload_rescore_next_sample(loop_server, tmp_path):
    url = loop_server.url
    cohort = tmp_path / "arrivals"
    subprocess.run([str(BIN / "parotid-synth"), "--out", str(cohort), "--n", "5", "--seed", "6161", "--no-raw",
                    "--keep", "CET1,T2", "--quiet"], check=True, timeout=600)
    truth = json.loads((cohort / "datastore_v2.json").read_text())["objects"]
    for sid in truth:  # new studies arrive unlabeled
        with open(cohort / f"{sid}.nii.gz", "rb") as f:
            r = requests.put(f"{url}/datastore/image", params={"image": sid}, files={"file": (f"{sid}.nii.gz", f)},
                             timeout=60)
        assert r.status_code == 200, r.text
    labelled_before = sum("final" in v.get("labels", {}) for v in _objects(url).values())

    # 1. score the new studies with the shipped checkpoints
    r = requests.post(f"{url}/scoring/study_uncertainty", params={"run_sync": "true"}, json={}, timeout=600)
    assert r.status_code == 200, r.text
    _wait(lambda: all(s is not None for s in _unlabeled_scores(url).values()), 120, "scores of the new studies")
    old_version = _objects(url)[next(iter(truth))]["image"]["info"]["scored_with"]["segmentation"]

    # 2. the annotator labels what active learning proposes, three times; each pick is the most uncertain left
    labelled = []
    for _ in range(3):
        scores = _unlabeled_scores(url)
        pick = requests.post(f"{url}/activelearning/{STRATEGY}", json={}, timeout=30).json()["id"]
        assert scores[pick] == max(scores.values()), (pick, scores)
        info = truth[pick]["labels"]["final"]["info"]
        with open(cohort / "labels" / "final" / f"{pick}.nii.gz", "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": pick, "tag": "final"},
                             files={"label": (f"{pick}.nii.gz", f)},
                             data={"params": json.dumps({"tumor_class": info["tumor_class"], "roi": info["roi"]})},
                             timeout=60)
        assert r.status_code == 200, r.text
        labelled.append(pick)
    remaining = sorted(set(truth) - set(labelled))
    assert set(_unlabeled_scores(url)) == set(remaining)

    # 3. before training: which checkpoint answers
    ckpt_before = requests.get(f"{url}/model/info/segmentation", timeout=30).json()
    assert _segment(url, remaining[0])["checkpoint"]["checksum"] == ckpt_before["checksum"]

    # 4. the admin trains on every final label, the three new ones included
    r = requests.post(f"{url}/train/segmentation", json={"iterations": 20, "batch_size": 2, "force": True},
                      timeout=30)  # forced past the promotion gate: this test is about the loop
    assert r.status_code == 200, r.text
    task = _wait(lambda: (lambda t: t if t.get("status") in ("DONE", "ERROR") else None)(
        requests.get(f"{url}/train/", timeout=30).json()), 900, "training", step=2)
    assert task["status"] == "DONE", task.get("details")
    stats = requests.get(f"{url}/info/", timeout=30).json()["train_stats"]["segmentation"]
    assert stats["train_studies"] + stats["val_studies"] + stats["n_holdout"] == labelled_before + len(labelled)

    # 5. the checkpoint changed, and the next inference comes from the new one
    ckpt_after = requests.get(f"{url}/model/info/segmentation", timeout=30).json()
    assert ckpt_after["checksum"] != ckpt_before["checksum"]
    assert _segment(url, remaining[0])["checkpoint"]["checksum"] == ckpt_after["checksum"]

    # 6. MONAI Label rescored after training: the unlabeled studies carry scores from the new checkpoint
    def rescored():
        objs = _objects(url)
        return all(objs[s]["image"]["info"].get("scored_with", {}).get("segmentation") != old_version
                   for s in remaining)
    _wait(rescored, 300, "scores from the new checkpoint")

    # 7. the next study proposed is the most uncertain of those still unlabeled, by the new scores
    scores = _unlabeled_scores(url)
    assert set(scores) == set(remaining)
    pick = requests.post(f"{url}/activelearning/{STRATEGY}", json={}, timeout=30).json()["id"]
    assert pick in remaining and scores[pick] == max(scores.values()), (pick, scores)
