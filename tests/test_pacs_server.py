"""End to end: MONAI Label server (apps/parotid) on a DICOMweb PACS (Orthanc on loopback), with auth.

`monailabel start_server --studies http://127.0.0.1:<port>/dicom-web` serves the Orthanc studies (one image
per StudyInstanceUID), /infer/segmentation works on a StudyInstanceUID, a submitted label goes back to the
PACS as DICOM SEG. MONAI Label auth is enabled against a local stand-in for the Keycloak realm (it serves
the realm's public key, the only thing MONAI Label fetches from it); tokens are RS256 JWTs signed here.
Unauthenticated calls get 401, missing roles 403.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from conftest import APP, Server, copy_app, sr_series
from parotid.pacs import writeback
from parotid.pacs.orthanc import OrthancProcess, orthanc_available
from parotid.study import read_study, same_grid

jwt = pytest.importorskip("jwt")
rsa = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.rsa")
from cryptography.hazmat.primitives import serialization  # noqa: E402

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    not orthanc_available() and os.environ.get("PAROTID_REQUIRE_ORTHANC") != "1",
    reason="Orthanc + DICOMweb plugin not installed (run deploy/orthanc/install.sh)",
)
ROLES = {"user": ["monailabel-user"], "annotator": ["monailabel-user", "monailabel-annotator"],
         "admin": ["monailabel-user", "monailabel-annotator", "monailabel-reviewer", "monailabel-admin"]}


class Realm:
    """Stand-in for Keycloak's realm endpoint: GET <realm> -> {"public_key": ...}."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = self.key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        body = json.dumps({"realm": "monailabel", "public_key": base64.b64encode(der).decode()}).encode()

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/realms/monailabel"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def token(self, role: str, key=None, ttl: int = 600) -> str:
        payload = {"preferred_username": f"test-{role}", "email": f"{role}@example.org", "name": role,
                   "realm_access": {"roles": ROLES[role]}, "exp": int(time.time()) + ttl}
        return jwt.encode(payload, key or self.key, algorithm="RS256")

    def stop(self):
        self.httpd.shutdown()


class AuthServer(Server):
    """conftest.Server, but ready as soon as /auth/ answers (/info/ needs a token here)."""

    ready_path = "/auth/"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with OrthancProcess(str(tmp_path_factory.mktemp("orthanc"))) as p:
        yield p


@pytest.fixture(scope="module")
def cohort(pacs, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    subprocess.run([str(BIN / "parotid-synth"), "--out", str(out), "--n", "1", "--seed", "21", "--dicom", "--quiet"],
                   check=True, timeout=600)
    ids = {}
    for d in sorted((out / "dicom").iterdir()):
        pacs.upload_tree(str(d))
        f = sorted(glob.glob(str(d / "*" / "*.dcm")))[0]
        ids[d.name] = str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
    return out, ids


@pytest.fixture(scope="module")
def realm():
    r = Realm()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def pacs_server(pacs, cohort, realm, tmp_path_factory):
    app = copy_app(tmp_path_factory.mktemp("app") / "parotid")
    main = app / "main.py"
    text = main.read_text()
    if "fix_monailabel_jwt" not in text:  # until the app installs it itself (see docs/pacs.md)
        main.write_text(text + "\n\nfrom parotid.pacs.auth import fix_monailabel_jwt\n\nfix_monailabel_jwt()\n")
    env = {**pacs.env(), "MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": realm.url,
           "PAROTID_DICOMWEB_CACHE": str(tmp_path_factory.mktemp("dicomweb-cache")),
           "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    srv = AuthServer(pacs.dicomweb_url, tmp_path_factory.mktemp("logs") / "server.log", models="segmentation,classify_malignancy",
                     env=env, app=app).start()
    yield srv
    srv.stop()


def hdr(realm, role):
    return {"Authorization": f"Bearer {realm.token(role)}"}


def test_unauthenticated_calls_are_refused(pacs_server, cohort, realm):
    uid = next(iter(cohort[1].values()))
    assert requests.get(pacs_server.url + "/auth/", timeout=10).json()["enabled"] is True
    for method, path in [("get", "/info/"), ("get", "/datastore/?output=all"), ("post", f"/infer/segmentation?image={uid}"),
                         ("get", f"/datastore/image?image={uid}")]:
        r = requests.request(method, pacs_server.url + path, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    # a token signed by someone else
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {"Authorization": f"Bearer {realm.token('admin', key=other)}"}
    assert requests.get(pacs_server.url + "/info/", headers=bad, timeout=10).status_code == 401
    expired = {"Authorization": f"Bearer {realm.token('admin', ttl=-60)}"}
    assert requests.get(pacs_server.url + "/info/", headers=expired, timeout=10).status_code == 401


def test_datastore_lists_pacs_studies(pacs_server, cohort, realm):
    r = requests.get(pacs_server.url + "/datastore/?output=all", headers=hdr(realm, "user"), timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert set(cohort[1].values()) <= set(r.json()["objects"])
    nxt = requests.post(pacs_server.url + "/activelearning/random", json={}, headers=hdr(realm, "user"), timeout=120)
    assert nxt.status_code == 200 and nxt.json()["id"] in cohort[1].values(), nxt.text[:300]


def test_infer_segmentation_on_study_uid(pacs_server, cohort, realm, tmp_path):
    out, ids = cohort
    study_id, uid = next(iter(ids.items()))
    r = requests.post(pacs_server.url + "/infer/segmentation", params={"image": uid, "output": "image"},
                      data={"params": "{}"}, headers=hdr(realm, "user"), timeout=300)
    assert r.status_code == 200, r.text[:300]
    p = tmp_path / "seg.nii.gz"
    p.write_bytes(r.content)
    seg = sitk.ReadImage(str(p))
    study = read_study(str(out / f"{study_id}.nii.gz"))  # what parotid-synth assembled locally
    assert same_grid(seg, study.image, tol=1e-3)
    assert set(np.unique(sitk.GetArrayViewFromImage(seg)).tolist()) <= {0, 1, 2}
    # unknown study -> 4xx, not a 500
    r = requests.post(pacs_server.url + "/infer/segmentation", params={"image": "1.2.3.999"}, data={"params": "{}"},
                      headers=hdr(realm, "user"), timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


def test_roles_and_label_writeback(pacs_server, pacs, cohort, realm):
    out, ids = cohort
    study_id, uid = next(iter(ids.items()))
    label = out / "labels" / "final" / f"{study_id}.nii.gz"
    info = json.loads((out / "datastore_v2.json").read_text())["objects"][study_id]["labels"]["final"]["info"]
    params = json.dumps({"tumor_class": info["tumor_class"], "roi": info["roi"]})

    def put(role):
        with open(label, "rb") as f:
            return requests.put(pacs_server.url + "/datastore/label", params={"image": uid, "tag": "final"},
                                data={"params": params}, files={"label": (label.name, f)},
                                headers=hdr(realm, role), timeout=120)

    assert put("user").status_code == 403  # a user (radiologist) may infer but not submit labels
    r = put("annotator")
    assert r.status_code == 200, r.text[:300]
    # only an admin may delete labels
    r = requests.delete(pacs_server.url + "/datastore/label", params={"id": uid, "tag": "final"},
                        headers=hdr(realm, "annotator"), timeout=30)
    assert r.status_code == 403
    ds = requests.get(pacs_server.url + "/datastore/?output=all", headers=hdr(realm, "user"), timeout=60).json()
    linfo = ds["objects"][uid]["labels"]["final"]["info"]
    assert linfo["tumor_class"] == info["tumor_class"] and linfo["roi"] == info["roi"]
    assert "pacs_writeback_error" not in linfo, linfo
    segs = pacs.client().search_for_series(uid, search_filters={"Modality": "SEG"})
    assert linfo["seg_series_uid"] in [pydicom.Dataset.from_json(s).SeriesInstanceUID for s in segs]


def classify(pacs_server, realm, role, uid, roi, **params):
    return requests.post(pacs_server.url + "/infer/classify_malignancy", params={"image": uid, "output": "json"},
                         data={"params": json.dumps({"roi": roi, "no_heatmap": True, **params})},
                         headers=hdr(realm, role), timeout=300)


def test_classification_sr_roles_idempotence_and_model_version(pacs_server, pacs, cohort, realm, tmp_path):
    """A read-only user gets the classification but writes nothing; an annotator's repeated
    classification is one SR; a new checkpoint is a new SR carrying its version and checksum."""
    import torch

    out, ids = cohort
    study_id, uid = next(iter(ids.items()))
    roi = json.loads((out / "datastore_v2.json").read_text())["objects"][study_id]["labels"]["final"]["info"]["roi"]
    before = sr_series(pacs, uid)
    r = classify(pacs_server, realm, "user", uid, roi, write_sr="always")  # may not write, even when asking
    assert r.status_code == 200, r.text[:300]
    assert r.json()["pacs_sr"]["status"] == "skipped" and "role" in r.json()["pacs_sr"]["reason"]
    assert r.json()["pacs_sr_series_uid"] is None
    assert sr_series(pacs, uid) == before
    r = classify(pacs_server, realm, "annotator", uid, roi, write_sr="sometimes")
    assert r.status_code == 422 and "write_sr" in r.json()["detail"], r.text[:300]
    answers = []
    for _ in range(3):
        r = classify(pacs_server, realm, "annotator", uid, roi, write_sr="always")
        assert r.status_code == 200, r.text[:300]
        answers.append(r.json())
    assert [a["pacs_sr"]["status"] for a in answers] == ["written", "reused", "reused"]
    first = answers[0]["pacs_sr_series_uid"]
    assert {a["pacs_sr_series_uid"] for a in answers} == {first}
    assert {k: v for k, v in sr_series(pacs, uid).items() if k not in before} == {first: 1}
    # auto (the default): stored unless undetermined or outside the training distribution
    a = classify(pacs_server, realm, "annotator", uid, roi).json()
    unsure = a["undetermined"] or (a.get("input_check") or {}).get("in_distribution") is False
    assert a["pacs_sr"]["status"] == ("skipped" if unsure else "reused"), a["pacs_sr"]
    # the SR names the served checkpoint
    ck = answers[0]["checkpoint"]["checksum"]
    sr = pacs.client().retrieve_instance(uid, first, answers[0]["pacs_sr"]["sop_instance_uid"])
    back = writeback.read_classification_sr(sr)
    assert back["checkpoint_checksum"] == ck
    assert back["model_version"] == f"{answers[0]['version']}+{ck.split(':')[-1][:12]}"
    # an admin uploads a new checkpoint: the next classification is a new SR with a new version
    new = torch.load(APP / "model" / "classify_malignancy.pt", map_location="cpu", weights_only=True)
    new["config"]["note"] = "re-uploaded by test_pacs_server"
    torch.save(new, tmp_path / "new.pt")
    with open(tmp_path / "new.pt", "rb") as f:
        up = requests.put(pacs_server.url + "/model/classify_malignancy", files={"file": ("new.pt", f)},
                          headers=hdr(realm, "admin"), timeout=120)
    assert up.status_code == 200, up.text[:300]
    b = classify(pacs_server, realm, "annotator", uid, roi, write_sr="always").json()
    assert b["checkpoint"]["checksum"] == up.json()["checksum"] != ck
    assert b["pacs_sr"]["status"] == "written" and b["pacs_sr_series_uid"] != first
    sr = pacs.client().retrieve_instance(uid, b["pacs_sr_series_uid"], b["pacs_sr"]["sop_instance_uid"])
    assert writeback.read_classification_sr(sr)["model_version"].endswith("+" + up.json()["checksum"].split(":")[-1][:12])


def test_study_without_known_sequence_is_422(pacs_server, pacs, realm, tmp_path):
    from pydicom.uid import generate_uid

    from parotid.pacs.dicomio import save_series, volume_to_mr_series

    uid = generate_uid()
    pacs.upload_files(save_series(volume_to_mr_series(sitk.Image(8, 8, 4, sitk.sitkFloat32), "3-plane loc", uid),
                                  str(tmp_path / "loc")))
    r = requests.post(pacs_server.url + "/infer/segmentation", params={"image": uid}, data={"params": "{}"},
                      headers=hdr(realm, "user"), timeout=120)
    assert r.status_code == 422, (r.status_code, r.text[:300])
    assert "recognisable" in r.json()["detail"]
    r = requests.get(pacs_server.url + "/datastore/image", params={"image": uid}, headers=hdr(realm, "user"), timeout=60)
    assert r.status_code == 422, (r.status_code, r.text[:300])


def test_invalid_labels_never_reach_the_pacs(pacs_server, pacs, cohort, realm, tmp_path):
    """DICOMweb mode checks a label like the study-folder datastore (parotid.label_validation): each bad
    label is a 422 saying what is wrong and Orthanc's series count is unchanged; the good twin is stored."""
    out, ids = cohort
    study_id, uid = next(iter(ids.items()))
    good = out / "labels" / "final" / f"{study_id}.nii.gz"
    info = json.loads((out / "datastore_v2.json").read_text())["objects"][study_id]["labels"]["final"]["info"]
    info = {"tumor_class": info["tumor_class"], "roi": info["roi"]}
    small = tmp_path / "small.nii.gz"
    sitk.WriteImage(sitk.Image(10, 10, 10, sitk.sitkUInt8), str(small))
    seven = sitk.ReadImage(str(good))
    seven[1, 1, 1] = 7
    sitk.WriteImage(seven, str(tmp_path / "seven.nii.gz"))
    cases = [(small, info, "size [10, 10, 10]"), (good, {**info, "tumor_class": "banana"}, "tumor_class 'banana'"),
             (good, {**info, "roi": [0, 999, 0, 10, 0, 5]}, "roi [0, 999)"), (tmp_path / "seven.nii.gz", info, "[7]")]

    def put(path, params):
        with open(path, "rb") as f:
            return requests.put(pacs_server.url + "/datastore/label", params={"image": uid, "tag": "final"},
                                data={"params": json.dumps(params)}, files={"label": ("label.nii.gz", f)},
                                headers=hdr(realm, "annotator"), timeout=120)

    def n_series():
        return len(pacs.client().search_for_series(uid))

    before = n_series()
    for path, params, words in cases:
        r = put(path, params)
        assert r.status_code == 422 and words in r.json()["detail"], (words, r.status_code, r.text[:300])
        assert n_series() == before, words
    r = put(good, info)  # the good twin: stored, and written to the PACS as SEG
    assert r.status_code == 200, r.text[:300]
    assert n_series() == before + 1
    # label info of an unknown tag or study: 404
    for label, tag in ((uid, "no-such-tag"), ("1.2.3.999", "final")):
        r = requests.get(pacs_server.url + "/datastore/label/info", params={"label": label, "tag": tag},
                         headers=hdr(realm, "user"), timeout=30)
        assert r.status_code == 404 and label in r.json()["detail"], r.text[:300]
    # replacing an existing study: 409 without overwrite; overwrite=true needs the admin role
    for params, status in (({"image": uid}, 409), ({"image": uid, "overwrite": "true"}, 403)):
        with open(out / f"{study_id}.nii.gz", "rb") as f:
            r = requests.put(pacs_server.url + "/datastore/image", params=params, files={"file": ("s.nii.gz", f)},
                             headers=hdr(realm, "annotator"), timeout=60)
        assert r.status_code == status and ("overwrite" in r.json()["detail"]), r.text[:300]
    assert n_series() == before + 1


def test_no_phi_in_server_log(pacs_server, cohort):
    """Runs last in this module: nothing the server logged names the (synthetic) patient."""
    out, ids = cohort
    log = pacs_server.log_tail(10_000_000)
    assert log, "empty server log"
    assert "SYNTHETIC^" not in log
    for study_id in ids:  # the synthetic PatientID is the study id
        assert study_id not in log


class CountingProxy:
    """A reverse proxy in front of Orthanc's DICOMweb that counts the server's QIDO series searches of a
    study (``GET .../studies/{uid}/series``): the PACS datastore resolves a study with one of them."""

    def __init__(self, target: str):
        import re

        from urllib.parse import urlsplit

        self.searches: list[str] = []
        proxy, base = self, urlsplit(target)
        series_search = re.compile(r"/studies/[^/]+/series$")

        class H(BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and series_search.search(self.path.split("?")[0]):
                    proxy.searches.append(self.path)
                skip = {"host", "content-length", "connection", "accept-encoding"}
                r = requests.request(self.command, f"{base.scheme}://{base.netloc}{self.path}", data=body or None,
                                     headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
                                     timeout=120)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward  # noqa: N815

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{base.path}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def test_classification_resolves_the_study_once(pacs, cohort, tmp_path):
    """One classification with SR write-back looks the study up on the PACS once (it was three times:
    the app's check, MONAI Label's infer and the write-back)."""
    out, ids = cohort
    study_id, uid = next(iter(ids.items()))
    roi = json.loads((out / "datastore_v2.json").read_text())["objects"][study_id]["labels"]["final"]["info"]["roi"]
    proxy = CountingProxy(pacs.dicomweb_url)
    env = {**pacs.env(), "PAROTID_DICOMWEB_CACHE": str(tmp_path / "cache"), "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    srv = Server(proxy.url, tmp_path / "server.log", models="segmentation,classify_malignancy", env=env,
                 app=copy_app(tmp_path / "app")).start()
    try:
        r = requests.post(srv.url + "/infer/segmentation", params={"image": uid, "output": "json"}, timeout=300)
        assert r.status_code == 200, r.text[:300]  # fetched and cached
        proxy.searches.clear()
        r = requests.post(srv.url + "/infer/classify_malignancy", params={"image": uid, "output": "json"},
                          data={"params": json.dumps({"roi": roi, "no_heatmap": True, "write_sr": "always"})},
                          timeout=300)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["pacs_sr"]["status"] in ("written", "reused"), r.json()["pacs_sr"]
        assert len(proxy.searches) == 1, proxy.searches
    finally:
        srv.stop()
        proxy.stop()
