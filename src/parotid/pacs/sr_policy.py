"""Who may store a classification as a DICOM SR on the PACS, and what the /infer answer says about it.

MONAI Label 0.8.5 checks the caller's role on ``POST /infer/{model}`` (``monailabel-user``) but does not
pass the caller to the app, so the app cannot tell a read-only radiologist from an annotator.
``install_infer_caller(app)`` replaces that route with the same endpoint (same parameters, same RBAC
dependency) that also records the caller's roles in a context variable for the duration of the request;
``caller_may_write()`` reads it. The inference runs in parotid.worker_pool (a bounded thread pool; one
inference per model at a time unless the model micro-batches), not on the event loop as MONAI Label's
own route does.
Writers are the roles that may write to the datastore (``PUT /datastore/label``): annotator and admin.
With auth disabled MONAI Label treats every caller as admin (all roles), so the SR is written. An
inference with no HTTP caller (batch inference, started by an admin, runs in a separate process) counts
as a writer.

``write_back(datastore, image_id, result, write_sr)`` applies the rules and returns the ``pacs_sr``
dictionary put in the answer: ``{"series_uid", "sop_instance_uid", "status": "written" | "reused" |
"skipped", "reason"}``; ``write_back_step`` is the classification task's output step that calls it
(apps/parotid/lib/infers/classify.py).
"""

import contextvars
import logging
from typing import Any, Dict, Optional, Sequence

from parotid.pacs.writeback import WRITE_SR_MODES
from parotid.routes import replace_route
from parotid.study import StudyError

logger = logging.getLogger(__name__)

_CALLER_ROLES: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("parotid_infer_caller_roles",
                                                                                default=None)


def writer_roles() -> tuple:
    from monailabel.config import settings

    return settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR, settings.MONAI_LABEL_AUTH_ROLE_ADMIN


def caller_may_write() -> bool:
    roles = _CALLER_ROLES.get()
    return roles is None or bool(set(roles) & set(writer_roles()))


def parse_write_sr(value: Any) -> str:
    """The request's ``write_sr`` (default ``auto``); a StudyError (422) for anything else than auto/always/never."""
    mode = "auto" if value in (None, "") else str(value).strip().lower()
    if mode not in WRITE_SR_MODES:
        raise StudyError(f"params.write_sr must be one of {list(WRITE_SR_MODES)} (default 'auto': store the "
                         f"classification SR unless it is undetermined or its input failed the input check), "
                         f"got {value!r}")
    return mode


def skipped(reason: str) -> Dict[str, Any]:
    return {"series_uid": None, "sop_instance_uid": None, "status": "skipped", "reason": reason}


def write_back(datastore, image_id: str, result: Dict[str, Any], write_sr: Any = None,
               study_path: Optional[str] = None, may_write: Optional[bool] = None) -> Dict[str, Any]:
    """`may_write`: ``caller_may_write()`` as read on the request's thread (default: read it here)."""
    mode = parse_write_sr(write_sr)
    if mode != "never" and not (caller_may_write() if may_write is None else may_write):
        return skipped(f"the caller's role may not write to the PACS (needs {' or '.join(writer_roles())}); "
                       "the classification is returned but not stored")
    return datastore.write_classification(image_id, result, write_sr=mode, study_path=study_path)


def write_back_step(datastore, image_id: str, study_path: str, result: Dict[str, Any], write_sr: Any = None,
                    may_write: Optional[bool] = None) -> None:
    """The classification task's last step on a PACS datastore: store the result as a DICOM SR (once per
    study and model checkpoint, only for callers that may write, by default only when determined and in
    distribution: ``params.write_sr`` auto / always / never) and say in the result what happened
    (``pacs_sr``; docs/pacs.md). `study_path`: the study file this request resolved `image_id` to."""
    try:
        pacs_sr = write_back(datastore, image_id, result, write_sr, study_path=study_path, may_write=may_write)
    except Exception as e:  # the answer still reaches the radiologist; the write-back failure is reported
        logger.warning(f"classification SR write-back failed: {e}")
        reason = result["pacs_writeback_error"] = str(getattr(e, "detail", e))
        pacs_sr = {"series_uid": None, "sop_instance_uid": None, "status": "failed", "reason": reason}
    result.update(sr_params(pacs_sr))


def install_infer_caller(app) -> None:
    """Replace MONAI Label's ``POST /infer/{model}`` by the same endpoint that records the caller's roles
    (see the module docstring), as lib/model_upload.py replaces ``PUT /model/{model}``.
    (No ``from __future__ import annotations`` in this module: FastAPI reads the endpoint's annotations.)"""
    import json
    from typing import Optional as Opt

    from fastapi import BackgroundTasks, Depends, File, Form, UploadFile
    from monailabel.config import RBAC_USER, settings
    from monailabel.endpoints import infer as ep
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.interfaces.utils.app import app_instance

    from parotid.worker_pool import offload

    path = f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}"

    async def api_run_inference(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: Opt[ep.ResultType] = None,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)),
    ):
        try:  # a bad write_sr is refused before the model runs
            p = json.loads(params) if params else {}
        except json.JSONDecodeError:
            p = {}  # MONAI Label's own handling answers malformed params
        if isinstance(p, dict) and "write_sr" in p:
            parse_write_sr(p["write_sr"])
        token = _CALLER_ROLES.set(tuple(user.roles or ()))
        # in the inference worker pool, the event loop stays free; one inference per model at a time,
        # except for models that micro-batch their network work (parotid.batching), which serialises it
        task = app_instance()._infers.get(model)
        key = None if getattr(task, "concurrent_requests", False) else f"infer:{model}"
        try:
            return await offload(key, ep.run_inference, background_tasks, model, image, session_id,
                                 params, file, label, output, pool="infer")
        finally:
            _CALLER_ROLES.reset(token)

    replace_route(app, path, "POST", api_run_inference, tags=["Infer"],
                  summary=f"{RBAC_USER}Run Inference for supported model")


def sr_params(pacs_sr: Dict[str, Any]) -> Dict[str, Any]:
    """The answer's keys: ``pacs_sr`` and, for existing clients, ``pacs_sr_series_uid``."""
    return {"pacs_sr": pacs_sr, "pacs_sr_series_uid": pacs_sr.get("series_uid")}


__all__: Sequence[str] = ("caller_may_write", "install_infer_caller", "parse_write_sr", "skipped", "sr_params",
                          "write_back", "write_back_step", "writer_roles")
