"""An acknowledged label is never lost: kill -9 of the server while labels are being saved, restart,
and every label the server acknowledged is there, intact, with its info; the index survives."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import time

import numpy as np
import requests
import SimpleITK as sitk

from conftest import Server, copy_app, copy_studies, SAMPLE
from parotid.study import read_study


def _label_bytes(study, seed: int, tmp_path) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros(study.shape, np.uint8)
    i, j, k = (int(rng.integers(5, n - 10)) for n in study.shape)
    arr[i:i + 6, j:j + 6, max(0, k - 2):k + 2] = 2
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.CopyInformation(study.reference)
    p = tmp_path / f"l{seed}.nii.gz"
    sitk.WriteImage(img, str(p), useCompression=True)
    return p.read_bytes()


def test_kill_9_during_saves_loses_no_acknowledged_label(tmp_path):
    studies = copy_studies(SAMPLE, tmp_path / "studies")
    app = copy_app(tmp_path / "app")
    ids = sorted(json.loads((studies / "datastore_v2.json").read_text())["objects"])[:6]
    refs = {sid: read_study(str(studies / f"{sid}.nii.gz")) for sid in ids}
    acked: dict[str, tuple[str, str]] = {}  # study -> (sha256 of label sent, tumor_class) of the last acknowledged save
    inflight: dict[str, tuple[str, str]] = {}  # study -> the save sent after it (may or may not have landed)
    srv = Server(studies, tmp_path / "server.log", models="segmentation", app=app).start()
    stop = threading.Event()
    classes = ["pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant"]

    def saver():
        n = 0
        while not stop.is_set():
            sid = ids[n % len(ids)]
            data = _label_bytes(refs[sid], n, tmp_path)
            cls = classes[n % 4]
            inflight[sid] = (hashlib.sha256(data).hexdigest(), cls)
            try:
                r = requests.put(f"{srv.url}/datastore/label", params={"image": sid, "tag": "final"},
                                 files={"label": (f"{sid}.nii.gz", data)},
                                 data={"params": json.dumps({"tumor_class": cls})}, timeout=10)
            except requests.RequestException:
                return  # the server died under us: this save was never acknowledged
            if r.status_code == 200:
                acked[sid] = inflight.pop(sid)
            n += 1

    t = threading.Thread(target=saver)
    t.start()
    deadline = time.time() + 60
    while len(acked) < len(ids) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(random.uniform(0.05, 0.5))  # kill at an arbitrary moment, most likely mid-save
    srv.stop(sig=signal.SIGKILL)
    stop.set()
    t.join(30)
    assert len(acked) == len(ids), "the server acknowledged too few saves before the kill"

    index = json.loads((studies / "datastore_v2.json").read_text())  # parses: not truncated
    assert set(ids) <= set(index["objects"])
    srv2 = Server(studies, tmp_path / "server2.log", models="segmentation", app=app).start()
    try:
        for sid, (sha, cls) in acked.items():
            r = requests.get(f"{srv2.url}/datastore/label", params={"label": sid, "tag": "final"}, timeout=30)
            assert r.status_code == 200
            # the last acknowledged label, or the save in flight at the kill (never acknowledged: the
            # client retries it) — never a truncated file, never an older one. The label file and
            # its info are two atomic writes: a kill between them can pair the in-flight map with
            # the acknowledged info, so each is checked on its own.
            info = requests.get(f"{srv2.url}/datastore/label/info", params={"label": sid, "tag": "final"}, timeout=30).json()
            pending = inflight.get(sid, (None, None))
            assert hashlib.sha256(r.content).hexdigest() in (sha, pending[0]), sid
            assert info["tumor_class"] in (cls, pending[1]), sid
            lab = tmp_path / "back.nii.gz"
            lab.write_bytes(r.content)
            back = sitk.ReadImage(str(lab))
            assert back.GetSize() == refs[sid].image.GetSize()
            assert set(np.unique(sitk.GetArrayFromImage(back)).tolist()) <= {0, 2}
    finally:
        srv2.stop()


def test_delete_is_immediate_and_unknown_ids_are_404(server, sample_ids, tmp_path):
    """A deleted label or study disappears from /datastore in the same request (no waiting on the file
    watcher), and deleting what does not exist is a 404 with a JSON message, not a 500."""
    src = SAMPLE / f"{sample_ids[0]}.nii.gz"
    sid = "delete-me-" + sample_ids[0]
    with open(src, "rb") as f:
        r = requests.put(f"{server.url}/datastore/image", params={"image": sid},
                         files={"file": (f"{sid}.nii.gz", f)}, timeout=60)
    assert r.status_code == 200, r.text
    data = _label_bytes(read_study(str(src)), 1, tmp_path)
    r = requests.put(f"{server.url}/datastore/label", params={"image": sid, "tag": "final"},
                     files={"label": (f"{sid}.nii.gz", data)}, data={"params": "{}"}, timeout=60)
    assert r.status_code == 200, r.text

    def listed():
        return requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]

    assert "final" in listed()[sid]["labels"]
    assert requests.delete(f"{server.url}/datastore/label", params={"id": sid, "tag": "final"}, timeout=30).status_code == 200
    assert "final" not in listed()[sid]["labels"]
    for params in ({"id": sid, "tag": "final"}, {"id": "no-such-study", "tag": "final"}):
        r = requests.delete(f"{server.url}/datastore/label", params=params, timeout=30)
        assert r.status_code == 404 and "detail" in r.json(), r.text
    assert requests.delete(f"{server.url}/datastore/image", params={"id": sid}, timeout=30).status_code == 200
    assert sid not in listed()
    r = requests.delete(f"{server.url}/datastore/image", params={"id": sid}, timeout=30)
    assert r.status_code == 404 and sid in r.json()["detail"], r.text


def test_concurrent_index_writers_keep_each_others_changes(tmp_path):
    """The server and MONAI Label's scoring subprocess both hold the datastore index in memory and both
    write it. Two StudyDatastore instances on one folder stand for the two processes (the same file
    code runs in each): a label saved by one and scores written by the other from its older copy must
    both survive -- before the read-modify-write fix the scores' write dropped the label's tumor_class."""
    import sys
    sys.path.insert(0, str(SAMPLE.parents[1] / "apps" / "parotid"))
    from lib.datastore import StudyDatastore

    studies = copy_studies(SAMPLE, tmp_path / "studies")
    server_side = StudyDatastore(str(studies), auto_reload=False)
    scoring_side = StudyDatastore(str(studies), auto_reload=False)  # loaded before the label arrives
    first, second = sorted(server_side.list_images())[:2]
    study = read_study(str(studies / f"{first}.nii.gz"))
    label = tmp_path / f"{first}.nii.gz"
    label.write_bytes(_label_bytes(study, 7, tmp_path))
    server_side.save_label(first, str(label), "final", {"tumor_class": "warthin", "roi": [1, 5, 1, 5, 1, 3]})
    scoring_side.update_image_info(second, {"seg_tta_variance": 0.25})
    server_side.update_image_info(first, {"seen_by": "radiologist"})

    index = json.loads((studies / "datastore_v2.json").read_text())["objects"]
    assert index[first]["labels"]["final"]["info"]["tumor_class"] == "warthin"
    assert index[first]["labels"]["final"]["info"]["roi"] == [1, 5, 1, 5, 1, 3]
    assert index[first]["image"]["info"]["seen_by"] == "radiologist"
    assert index[second]["image"]["info"]["seg_tta_variance"] == 0.25
    reopened = StudyDatastore(str(studies), auto_reload=False)
    assert reopened.get_label_info(first, "final")["tumor_class"] == "warthin"


def test_many_uploads_and_deletes_never_500(server, sample_ids):
    """Each upload/delete also wakes the datastore's file watcher, which reconciles the index in its
    own thread; the request thread's reconciliation ran concurrently and crashed with "dictionary
    changed size during iteration" (HTTP 500, seen in the full suite). 100 rounds on the real server
    (a race: the old code failed 2 of 5 runs here, this one 0 of 3)."""
    data = (SAMPLE / f"{sample_ids[0]}.nii.gz").read_bytes()
    for n in range(100):
        sid = f"churn-{n}"
        r = requests.put(f"{server.url}/datastore/image", params={"image": sid},
                         files={"file": (f"{sid}.nii.gz", data)}, timeout=60)
        assert r.status_code == 200, r.text
        r = requests.delete(f"{server.url}/datastore/image", params={"id": sid}, timeout=60)
        assert r.status_code == 200, (n, r.text)
    listed = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert not [k for k in listed if k.startswith("churn-")]
