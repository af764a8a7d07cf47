"""HTTP client for the parotid MONAI Label server (no Slicer imports; usable from any Python).

Endpoints used (MONAI Label 0.8.5):

* ``GET  /info/``                                 models, their sequences / label sets
* ``GET  /auth/``, ``POST /auth/token``            auth status and token (form: username, password)
* ``PUT  /datastore/image?image=<id>``            upload a study file (form ``params``, file ``file``)
* ``HEAD /datastore/image?image=<id>``            does the study exist
* ``GET  /datastore/?output=all``                 the datastore index (images, labels, label info)
* ``PUT  /datastore/label?image=<id>&tag=final``  save a label (file ``label``, form ``params``): the
  endpoint passes the ``params`` JSON object unchanged to ``Datastore.save_label(..., label_info)``, so
  its keys become the label's info -- we send ``tumor_class`` and ``roi`` at the top level (plus
  ``label_info``: the segment names/values, as the stock Slicer plugin does)
* ``GET  /datastore/label/info?label=<id>&tag=``  label info
* ``POST /infer/<model>?image=<id>``              form ``params`` (JSON, e.g. ``{"roi": [...]}``)
* ``POST /activelearning/<strategy>``             next sample
* ``POST /train/<model>``, ``DELETE /train/``, ``GET /train/``   training
"""

from __future__ import annotations

import json
import os
import re
import time

import requests

from .errors import ServerError, connection_message, detail_from_body, user_message
from .labels import SEGMENT_NAMES
from .responses import InferResponse, parse_infer_response

DEFAULT_URL = "http://127.0.0.1:8000"


class ParotidClient:
    def __init__(self, server_url: str = DEFAULT_URL, token: str | None = None, timeout: float = 600.0,
                 connect_timeout: float = 5.0, session: requests.Session | None = None, client_id: str = "slicer"):
        self.server_url = normalize_url(server_url)
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.session = session or requests.Session()
        self.client_id = client_id

    # ------------------------------------------------------------------ plumbing
    def url(self, path: str) -> str:
        return self.server_url + "/" + path.lstrip("/")

    def _headers(self):
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, what: str = "", timeout: float | None = None, **kw) -> requests.Response:
        """One HTTP call; any failure becomes a :class:`ServerError` with a user message."""
        url = self.url(path)
        headers = dict(self._headers(), **kw.pop("headers", {}))
        t = self.timeout if timeout is None else timeout
        try:
            r = self.session.request(method, url, headers=headers, timeout=(self.connect_timeout, t), **kw)
        except requests.exceptions.ConnectTimeout:
            raise ServerError(connection_message(self.server_url, "connection timed out"), url=url) from None
        except requests.exceptions.ConnectionError as e:
            reason = "connection refused" if "refused" in str(e).lower() else type(e).__name__
            raise ServerError(connection_message(self.server_url, reason), url=url) from None
        except requests.exceptions.Timeout:
            raise ServerError(connection_message(self.server_url, timeout=t), url=url) from None
        except requests.exceptions.RequestException as e:
            raise ServerError(f"{what + ': ' if what else ''}request failed ({e})", url=url) from None
        if r.status_code >= 400:
            detail = detail_from_body(r.content, r.headers.get("content-type"))
            raise ServerError(user_message(r.status_code, detail, what, self.server_url),
                              status=r.status_code, detail=detail, url=url)
        return r

    def _json(self, r: requests.Response, what: str):
        try:
            return r.json() if r.content else {}
        except ValueError:
            raise ServerError(f"{what}: the server sent an unexpected answer (not JSON): {r.text[:200]!r}") from None

    # ------------------------------------------------------------------ info / auth
    def info(self) -> dict:
        return self._json(self.request("GET", "/info/", "Connect", timeout=30), "Connect")

    def auth_enabled(self) -> bool:
        """MONAI Label mounts /auth/ only when auth is enabled: 404 means no auth."""
        try:
            r = self.request("GET", "/auth/", "Connect", timeout=30)
        except ServerError as e:
            if e.status == 404:
                return False
            raise
        return bool(self._json(r, "Connect").get("enabled"))

    def login(self, username: str, password: str) -> str | None:
        """Fetch a bearer token (only when auth is enabled) and use it for later calls."""
        r = self.request("POST", "/auth/token", "Log in", timeout=30, data={"username": username, "password": password})
        self.token = self._json(r, "Log in").get("access_token")
        return self.token

    # ------------------------------------------------------------------ datastore
    def datastore(self, output: str = "all") -> dict:
        return self._json(self.request("GET", "/datastore/", "Datastore", params={"output": output}), "Datastore")

    def study_exists(self, image_id: str) -> bool:
        try:
            self.request("HEAD", "/datastore/image", "Check study", timeout=30, params={"image": image_id})
            return True
        except ServerError as e:
            if e.status == 404:
                return False
            raise

    def upload_study(self, path: str, image_id: str | None = None, params: dict | None = None) -> str:
        """PUT a study file into the datastore; returns the study (image) id the server assigned."""
        name = os.path.basename(path)
        with open(path, "rb") as f:
            r = self.request("PUT", "/datastore/image", "Upload study",
                             params={"image": image_id} if image_id else None,
                             data={"params": json.dumps(params or {})},
                             files={"file": (name, f, "application/octet-stream")})
        return self._json(r, "Upload study").get("image", image_id)

    def delete_study(self, image_id: str) -> None:
        """Remove a study and its labels from the datastore (admin role)."""
        self.request("DELETE", "/datastore/image", "Delete study", params={"id": image_id})

    def download_study(self, image_id: str, path: str) -> str:
        r = self.request("GET", "/datastore/image", "Download study", params={"image": image_id})
        with open(path, "wb") as f:
            f.write(r.content)
        return path

    def save_label(self, image_id: str, label_path: str, tumor_class: str | None = None, roi=None,
                   tag: str = "final", segments: list | None = None, extra: dict | None = None) -> dict:
        """Submit a (refined) label map with the tumour class and box as label info."""
        info = dict(extra or {})
        if tumor_class:
            info["tumor_class"] = tumor_class
        if roi is not None:
            info["roi"] = [int(v) for v in roi]
        info["label_info"] = segments if segments is not None else [
            {"name": name, "idx": idx} for idx, name in SEGMENT_NAMES.items()]
        info.setdefault("client_id", self.client_id)
        with open(label_path, "rb") as f:
            r = self.request("PUT", "/datastore/label", "Submit label",
                             params={"image": image_id, "tag": tag},
                             data={"params": json.dumps(info)},
                             files={"label": (os.path.basename(label_path), f, "application/octet-stream")})
        return self._json(r, "Submit label")

    def label_info(self, image_id: str, tag: str = "final") -> dict:
        r = self.request("GET", "/datastore/label/info", "Label info", params={"label": image_id, "tag": tag})
        return self._json(r, "Label info")

    def download_label(self, image_id: str, path: str, tag: str = "final") -> str:
        r = self.request("GET", "/datastore/label", "Download label", params={"label": image_id, "tag": tag})
        with open(path, "wb") as f:
            f.write(r.content)
        return path

    # ------------------------------------------------------------------ inference
    def infer(self, model: str, image_id: str, params: dict | None = None, what: str = "",
              output: str | None = None) -> InferResponse:
        """POST /infer/<model>; `output` None (server default: multipart when there is an image, else
        JSON), "json" or "image". Whatever comes back is parsed into an :class:`InferResponse`."""
        q = {"image": image_id}
        if output:
            q["output"] = output
        r = self.request("POST", f"/infer/{model}", what or f"Run {model}", params=q,
                         data={"params": json.dumps(params or {})})
        return parse_infer_response(r.content, r.headers.get("content-type", ""))

    def segment(self, image_id: str, model: str = "segmentation") -> InferResponse:
        return self.infer(model, image_id, {}, "Segment")

    def contour_box(self, image_id: str, roi, model: str = "contour_box") -> InferResponse:
        return self.infer(model, image_id, {"roi": [int(v) for v in roi]}, "Contour in box")

    def classify(self, image_id: str, roi=None, model: str = "classify_subtype"):
        from .results import ClassificationResult

        params = {"roi": [int(v) for v in roi]} if roi is not None else {}
        resp = self.infer(model, image_id, params, "Classify tumour")
        return ClassificationResult.from_response(resp)

    # ------------------------------------------------------------------ active learning / training
    def next_sample(self, strategy: str = "random", params: dict | None = None) -> dict:
        p = dict(params or {})
        p.setdefault("client_id", self.client_id)
        r = self.request("POST", f"/activelearning/{strategy}", "Next sample", json=p)
        return self._json(r, "Next sample")

    def train_start(self, model: str | None = None, params: dict | None = None, enqueue: bool = False) -> dict:
        path = f"/train/{model}" if model else "/train/"
        r = self.request("POST", path, "Start training", params={"enqueue": str(bool(enqueue)).lower()}, json=params or {})
        return self._json(r, "Start training")

    def train_stop(self) -> dict:
        return self._json(self.request("DELETE", "/train/", "Stop training"), "Stop training")

    def train_status(self, check_if_running: bool = False) -> dict | None:
        """The latest training task (``{"id", "status", "details", ...}``) or None if there is none."""
        try:
            r = self.request("GET", "/train/", "Training status", timeout=30,
                             params={"check_if_running": str(bool(check_if_running)).lower()})
        except ServerError as e:
            if e.status == 404:  # no training task yet / not running
                return None
            raise
        return self._json(r, "Training status")

    def wait_for_training(self, poll_s: float = 2.0, timeout_s: float = 3600.0, callback=None) -> dict | None:
        """Poll /train/ until the latest task is no longer RUNNING; `callback(progress)` each poll."""
        t0 = time.time()
        while True:
            st = self.train_status()
            prog = training_progress(st)
            if callback:
                callback(prog)
            if not prog["running"]:
                return st
            if time.time() - t0 > timeout_s:
                raise ServerError(f"Training did not finish within {timeout_s:g} s")
            time.sleep(poll_s)


def normalize_url(url: str) -> str:
    url = (url or "").strip().rstrip("/")
    if not url:
        raise ValueError("enter the server address, e.g. http://127.0.0.1:8000")
    if not re.match(r"^https?://", url):
        url = "http://" + url
    return url


_EPOCH = re.compile(r"[Ee]poch[^0-9]{0,3}(\d+)\s*/\s*(\d+)")


def training_progress(status: dict | None) -> dict:
    """``{"running", "status", "fraction" (0..1 or None), "text"}`` from a /train/ status object."""
    if not status:
        return {"running": False, "status": "NONE", "fraction": None, "text": "No training task"}
    st = str(status.get("status", "")).upper()
    details = status.get("details") or []
    if isinstance(details, str):
        details = details.splitlines()
    frac = None
    for line in reversed([str(d) for d in details]):
        m = _EPOCH.search(line)
        if m and int(m.group(2)) > 0:
            frac = min(1.0, int(m.group(1)) / int(m.group(2)))
            break
    if st == "DONE":
        frac = 1.0
    last = str(details[-1]).strip() if details else ""
    text = f"{st.title()}" + (f": {last[:120]}" if last else "")
    return {"running": st in ("SUBMITTED", "RUNNING", "QUEUED", "PENDING"), "status": st, "fraction": frac, "text": text}
