"""Label sets are data end to end (issue 12, item 6), over the real server on loopback:

an annotator relabels synthetic studies with sinonasal classes (seed 004's label set ``sinonasal3``)
through ``PUT /datastore/label``; ``POST /train/classify_sinonasal`` trains on exactly those studies
and the server then serves a 3-class model that classifies a study. A class no served label set
knows is a 422 that names the accepted classes. Which studies each trainer uses is decided by the
label-set JSON (``map_from``), checked without a server in ``test_trainer_studies_follow_label_set_json``.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from conftest import infer, private_server
from parotid.labels import classification_label_sets, get_label_set

# synthetic parotid phantoms relabelled as sinonasal tumours: one sinonasal class per image phenotype,
# so the 3-class problem is learnable from the images
SINONASAL_OF = {"pleomorphic_adenoma": "squamous_cell_carcinoma", "warthin": "adenoid_cystic_carcinoma",
                "basal_cell_adenoma": "olfactory_neuroblastoma", "malignant": "olfactory_neuroblastoma"}


@pytest.fixture(scope="module")
def ls_server(tmp_path_factory):
    srv = private_server(tmp_path_factory.mktemp("labelsets"), models="classify_subtype,classify_sinonasal")
    yield srv
    srv.stop()


def _final_labels(url: str) -> dict[str, dict]:
    objs = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    return {sid: o["labels"]["final"]["info"] for sid, o in objs.items() if "final" in o.get("labels", {})}


def _put_label(url: str, sid: str, info: dict) -> requests.Response:
    label = requests.get(f"{url}/datastore/label", params={"label": sid, "tag": "final"}, timeout=60)
    assert label.status_code == 200, label.text[:300]
    return requests.put(f"{url}/datastore/label", params={"image": sid, "tag": "final"},
                        files={"label": (f"{sid}.nii.gz", label.content)},
                        data={"params": json.dumps(info)}, timeout=60)


def test_trainer_studies_follow_label_set_json():
    """subtype4 classes map into benign_malignant (its JSON's map_from); sinonasal3 classes only into sinonasal3."""
    sets = classification_label_sets()
    assert {"subtype4", "benign_malignant", "sinonasal3"} <= set(sets)
    for c in get_label_set("subtype4").classes:
        assert get_label_set("benign_malignant").accepts(c)
        assert not get_label_set("sinonasal3").accepts(c)
    for c in get_label_set("sinonasal3").classes:
        assert [n for n, s in sets.items() if s.accepts(c)] == ["sinonasal3"]
    assert get_label_set("benign_malignant").index("warthin") == 0


def test_info_lists_the_accepted_label_sets_for_clients(ls_server):
    """/info label_sets: every class the datastore accepts; the Slicer module offers exactly those."""
    from ParotidTumorLib import tumor_classes_from_info

    info = requests.get(f"{ls_server.url}/info/", timeout=30).json()
    assert info["label_sets"]["sinonasal3"]["classes"] == list(get_label_set("sinonasal3").classes)
    offered = tumor_classes_from_info(info)
    for name in ("subtype4", "benign_malignant", "sinonasal3"):
        assert set(get_label_set(name).classes) <= set(offered)
    assert len(offered) == len(set(offered))


def test_unknown_class_is_422_naming_accepted_classes(ls_server):
    sid, info = sorted(_final_labels(ls_server.url).items())[0]
    r = _put_label(ls_server.url, sid, {"tumor_class": "sinonasal_lymphoma", "roi": info["roi"]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "sinonasal_lymphoma" in detail
    for c in ("olfactory_neuroblastoma", "warthin"):  # the accepted classes are named
        assert c in detail
    assert _final_labels(ls_server.url)[sid]["tumor_class"] == info["tumor_class"]  # nothing stored


def test_relabel_sinonasal_train_and_serve_3_class_model(ls_server):
    url = ls_server.url
    before = requests.get(f"{url}/info/", timeout=30).json()
    assert before["train_stats"]["classify_sinonasal"]["trained"] is False
    labels = _final_labels(url)
    assert len(labels) >= 10
    for sid, info in sorted(labels.items()):  # the annotator relabels every study with a sinonasal class
        r = _put_label(url, sid, {"tumor_class": SINONASAL_OF[info["tumor_class"]], "roi": info["roi"]})
        assert r.status_code == 200, r.text
    relabelled = _final_labels(url)
    assert {i["tumor_class"] for i in relabelled.values()} <= set(get_label_set("sinonasal3").classes)

    r = requests.post(f"{url}/train/classify_sinonasal", json={"epochs1": 2, "epochs2": 10}, timeout=30)
    assert r.status_code == 200, r.text
    deadline = time.time() + 900
    while True:
        task = requests.get(f"{url}/train/", timeout=30).json()
        if task.get("status") in ("DONE", "ERROR"):
            break
        assert time.time() < deadline, "training did not finish"
        time.sleep(2)
    assert task["status"] == "DONE", task.get("details")

    info = requests.get(f"{url}/info/", timeout=30).json()
    stats = info["train_stats"]["classify_sinonasal"]
    assert stats["trained"] and stats["label_set"] == "sinonasal3"
    assert "classify_sinonasal" in info["models"]
    sid = sorted(relabelled)[0]
    res = infer(ls_server, "classify_sinonasal", sid, {"roi": relabelled[sid]["roi"]})
    assert res.status_code == 200, res.text[:500]
    out = res.json()
    assert [p["label"] for p in out["prediction"]] == list(get_label_set("sinonasal3").classes)
    assert sum(p["score"] for p in out["prediction"]) == pytest.approx(1.0, abs=1e-5)
    assert out["label_set"] == "sinonasal3"
