"""Which served models can process a study, told on upload; batch inference skips the studies a model
cannot process instead of failing as a whole.

A study is accepted with any subset of sequences (it can still be annotated, and a later model may
use it), but a study that lacks a model's required sequences is flagged in its image info at upload:

    models_unavailable: {model: [missing sequences]}   ({} when every served model can run)
    warnings: ["..."]                                   ([] when none)

and the `PUT /datastore/image` answer (lib/image_upload.py) carries the same two keys. The flags are computed against the
models served at upload time (`required_sequences` in `/info`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Sequence

from fastapi import HTTPException

logger = logging.getLogger(__name__)
FLAG_KEYS = ("models_unavailable", "warnings")


def _served_app():
    """The MONAI Label app of this server process, if one is running (never creates one)."""
    from monailabel.interfaces.utils import app as app_utils

    return next(iter(app_utils.apps.values()), None)


def served_requirements() -> Dict[str, List[str]]:
    """model -> sequences it requires, for every model of the running app that `/info` lists (it has a
    checkpoint) and that declares them."""
    app = _served_app()
    tasks = getattr(app, "_infers", None) or {}
    return {name: list(task.required) for name, task in tasks.items()
            if getattr(task, "required", None) and task.is_valid()}


def study_flags(sequences: Sequence[str], requirements: Dict[str, List[str]] | None = None) -> Dict[str, Any]:
    """The image-info flags for a study holding `sequences`."""
    requirements = served_requirements() if requirements is None else requirements
    have = set(sequences)
    missing = {m: [s for s in req if s not in have] for m, req in sorted(requirements.items())}
    missing = {m: s for m, s in missing.items() if s}
    warnings = [f"model {m} cannot process this study: it lacks {s} (the study has {list(sequences)})"
                for m, s in missing.items()]
    if missing and len(missing) == len(requirements):
        warnings.insert(0, "no model served here can process this study; it is stored (it can be annotated) "
                           "and skipped by batch inference")
    return {"models_unavailable": missing, "warnings": warnings}


def skipping_unprocessable(infer: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    """`infer` for MONAI Label's BatchInferTask: a study the model refuses (4xx: lacking sequences,
    unreadable, ...) or fails on is reported in the batch result and the batch goes on. MONAI Label
    runs the images one by one on a small CPU server and the first error ended the whole batch."""

    def infer_one(request: Dict[str, Any], datastore=None) -> Dict[str, Any]:
        image = request.get("image")
        try:
            return infer(request, datastore)
        except HTTPException as e:
            if e.status_code >= 500:
                logger.error(f"batch inference failed on study {image}: {e.detail}")
                return {"skipped": True, "status": e.status_code, "detail": "inference failed; see the server log"}
            logger.info(f"batch inference skips study {image}: {e.detail}")
            return {"skipped": True, "status": e.status_code, "detail": str(e.detail)}
        except Exception:
            logger.exception(f"batch inference failed on study {image}")
            return {"skipped": True, "status": 500, "detail": "inference failed; see the server log"}

    return infer_one
