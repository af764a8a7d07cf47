"""Admin routes of the model registry (parotid.registry) and the training status in plain words.

    GET  /model/versions/{model}             the versions of a model, which one is served, why each was
                                             promoted / rejected / rolled back (admin role)
    POST /model/rollback/{model}?version=N   serve version N again (admin role): the served file is replaced
                                             atomically and inference hot-reloads it
    GET  /train/                             MONAI Label's training status + ``candidate``: what the gate
                                             did with the candidate of the training shown
    DELETE /model/{model}                    MONAI Label's (the file is moved aside), admin role as its summary
                                             says, and 409 on a read-only model dir

Unknown model or version: 404 JSON; a version that was never served (rejected by the gate): 409; a model
dir in a git checkout (the repository's tracked checkpoints, never rewritten by a server): 409.
"""

from __future__ import annotations

import calendar
import time
from datetime import datetime
from typing import Any, Callable, Dict, Optional

from fastapi import Depends, HTTPException, Query
from monailabel.config import RBAC_ADMIN, RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User

from parotid.registry import ModelRegistry, describe_versions, outcome_words
from parotid.routes import replace_route


def _utc_epoch(stamp: str) -> float:
    return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")))


def candidate_of(task: Dict[str, Any], registry: Optional[ModelRegistry]) -> Optional[Dict[str, Any]]:
    """The registry's candidate made by the training `task` (MONAI Label's task record): the newest
    version from a training created after the task started (its start_ts is local time)."""
    if registry is None or task.get("status") not in ("DONE", "RUNNING"):
        return None
    last = registry.last_candidate()
    if not last or not task.get("start_ts"):
        return None
    started = datetime.strptime(task["start_ts"], "%Y-%m-%d %H:%M:%S").timestamp()
    if _utc_epoch(last["created"]) + 1 < started:
        return None  # from an earlier training
    return {"model": registry.task, "version": last["version"], "status": last["status"], "reason": last["reason"],
            "summary": outcome_words(last)}


def install_registry_routes(app, get_registry: Callable[[str], Optional[ModelRegistry]]) -> None:
    """`get_registry(model)` returns the registry of a trainable model, or None for an unknown name."""

    def registry_or_404(model: str) -> ModelRegistry:
        reg = get_registry(model)
        if reg is None:
            raise HTTPException(404, f"unknown model '{model}'")
        return reg

    async def api_model_versions(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        reg = registry_or_404(model)
        return {"model": model, "served_version": reg.served_version(), "versions": describe_versions(reg.versions())}

    async def api_model_rollback(model: str, version: int = Query(..., ge=1, description="the version to serve again"),
                                 user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        reg = registry_or_404(model)
        who = f" ({user.username})" if user and user.username else ""
        meta = reg.rollback(version, reason=f"rolled back by an admin{who} via POST /model/rollback")  # 4xx: lib/errors.py
        return {"model": model, "served_version": reg.served_version(), "sha256": meta["sha256"],
                "reason": meta["history"][-1]["reason"] if meta.get("history") else meta.get("reason")}

    async def api_train_status(all: bool = False, check_if_running: bool = False,
                               user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        from monailabel.endpoints.train import status

        res = status(all, check_if_running)
        tasks = res if isinstance(res, list) else [res]
        out = []
        for t in tasks:
            t = dict(t)
            model = (t.get("request") or {}).get("model")
            cand = candidate_of(t, get_registry(model) if model else None)
            if cand:
                t["candidate"] = cand
            out.append(t)
        return out if isinstance(res, list) else out[0]

    async def api_delete_model(model: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        from monailabel.endpoints.model import delete_model

        reg = get_registry(model)
        if reg is not None and reg.read_only:
            raise HTTPException(409, f"the model dir {reg.model_dir} is in a git checkout (tracked checkpoints), which a "
                                     "running server never changes; start it with --conf model_dir DIR on a copy")
        return delete_model(model)

    prefix = settings.MONAI_LABEL_API_STR
    app.router.add_api_route(f"{prefix}/model/versions/{{model}}", api_model_versions, methods=["GET"], tags=["Model"],
                             summary=f"{RBAC_ADMIN}List the versions of a model (registry) and which is served")
    app.router.add_api_route(f"{prefix}/model/rollback/{{model}}", api_model_rollback, methods=["POST"], tags=["Model"],
                             summary=f"{RBAC_ADMIN}Serve an earlier version of a model again")
    # before MONAI Label's GET /model/{model} (download) would take /model/versions/x? no: that has one segment
    # more; still put ours first so that no stock route shadows them
    routes = app.router.routes
    routes.insert(0, routes.pop())
    routes.insert(0, routes.pop())
    replace_route(app, f"{prefix}/train/", "GET", api_train_status, tags=["Train"],
                  summary=f"{RBAC_USER}Get Status of Training Task (and what the promotion gate did with its candidate)")
    replace_route(app, f"{prefix}/model/{{model}}", "DELETE", api_delete_model, tags=["Model"],
                  summary=f"{RBAC_ADMIN}Delete Model File (moved aside; refused on a read-only model dir)")
    app.openapi_schema = None
