"""The server side of each module action as a plain function of a client: what the widget runs off
the GUI thread (see :mod:`.background`). No MRML, no Qt: a worker thread must not touch either.

Each function takes a :class:`~.background.CancelToken` and checks it between requests, so that a
cancelled action does not start its next request (e.g. no inference after a cancelled upload).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from .errors import ServerError
from .results import ResultVolume
from .study import read_components


@dataclass
class PreparedStudy:
    """A study ready to send: `path` is None when the same volumes were uploaded before."""

    study_id: str
    path: str | None = None
    keys: tuple = ()
    tmpdir: str | None = None
    volumes_key: tuple = field(default_factory=tuple)

    def cleanup(self) -> None:
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def ensure_uploaded(client, prepared: PreparedStudy, token=None) -> str:
    """Upload the study unless the server has it (same content -> same id); returns the study id."""
    try:
        if client.study_exists(prepared.study_id):
            return prepared.study_id
        if prepared.path is None:
            raise ServerError("The study is no longer on the server (deleted meanwhile?): run the action again "
                              "to upload it anew.", status=404)
        if token is not None:
            token.check()
        return client.upload_study(prepared.path, prepared.study_id, {"source": "slicer", "sequences": list(prepared.keys)})
    finally:
        prepared.cleanup()


def label_result(resp, what: str) -> ResultVolume:
    if not resp.has_image:
        raise ServerError(f"The server returned no label image for {what}.")
    vol = ResultVolume.from_bytes(resp.image, resp.image_name or "label.nii.gz")
    vol.info = dict(resp.params) if isinstance(resp.params, dict) else {}
    return vol


def segment(client, prepared, token=None, model="segmentation"):
    sid = ensure_uploaded(client, prepared, token)
    if token is not None:
        token.check()
    return sid, label_result(client.segment(sid, model), "segmentation")


def contour_box(client, prepared, box, token=None, model="contour_box"):
    sid = ensure_uploaded(client, prepared, token)
    if token is not None:
        token.check()
    return sid, label_result(client.contour_box(sid, box, model), "box contour")


def classify(client, prepared, box, model, token=None):
    sid = ensure_uploaded(client, prepared, token)
    if token is not None:
        token.check()
    return sid, client.classify(sid, box, model)


def submit_label(client, prepared, label_path, tumor_class, box, tag="final", token=None):
    try:
        sid = ensure_uploaded(client, prepared, token)
        if token is not None:
            token.check()
        return sid, client.save_label(sid, label_path, tumor_class=tumor_class, roi=box, tag=tag)
    finally:
        shutil.rmtree(os.path.dirname(label_path), ignore_errors=True)


def next_sample(client, strategy="random", token=None) -> dict:
    """``{"sample", "components" {key: (array, IJK->RAS)}, "label" ResultVolume|None, "label_info"}``,
    or ``{}`` when the server has nothing left to annotate."""
    sample = client.next_sample(strategy)
    if not sample or not sample.get("id"):
        return {}
    study_id = sample["id"]
    tmp = tempfile.mkdtemp(prefix="parotid-next-")
    try:
        if token is not None:
            token.check()
        components = read_components(client.download_study(study_id, os.path.join(tmp, f"{study_id}.nii.gz")))
        label, info = None, {}
        try:
            lpath = client.download_label(study_id, os.path.join(tmp, "label.nii.gz"))
            with open(lpath, "rb") as f:
                label = ResultVolume.from_bytes(f.read(), "label.nii.gz")
            info = client.label_info(study_id)
        except ServerError as e:
            if e.status != 404:  # 404: not labelled yet, the usual case
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sample["label_info"] = info
    return {"sample": sample, "components": components, "label": label, "label_info": info}
