"""PUT /model/{model} that checks an uploaded checkpoint before it replaces the served one.

MONAI Label 0.8.5's endpoint copies any upload over the model file (and lets the annotator role do
it, although its summary says admin): one wrong file and every later inference of that model fails.
This route takes precedence over it: admin role, the upload must load (weights only, no pickled
code) into the task's network, and it replaces the checkpoint atomically (rename) so a concurrent
inference never reads half a file. An accepted upload is registered as a new version of the model
(parotid.registry: source "upload", promoted without the gate: an admin chose it), so /info and
/model/info describe the served checkpoint. The response is MONAI Label's (checksum, modified_time)
+ ``version``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional

from fastapi import BackgroundTasks, Depends, File, HTTPException, UploadFile
from monailabel.config import RBAC_ADMIN, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import file_checksum

from lib.errors import http_errors
from lib.trainers.gated import GatedTrainTask
from parotid.routes import replace_route
from parotid.worker_pool import offload


def install_checkpoint_upload_check(app, get_task: Callable[[str], Optional[object]],
                                    get_trainer: Callable[[str], Optional[object]] = lambda m: None) -> None:
    """`get_task(model)` returns the infer task that serves `model` (with `check_checkpoint` and
    `path`), or None; `get_trainer(model)` its train task (a lib.trainers.gated.GatedTrainTask holds
    the model's registry), or None."""

    async def api_update_model(background_tasks: BackgroundTasks, model: str, file: UploadFile = File(...),
                               user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        task = get_task(model)
        if task is None:
            raise HTTPException(404, f"unknown model '{model}'")
        target = task.path[0] if isinstance(task.path, (list, tuple)) else task.path
        # copying and loading the checkpoint block: in the worker pool, the event loop stays free
        return await offload(f"model:{model}", _check_and_replace, model, user, task, file, target)

    def _check_and_replace(model: str, user: User, task, file: UploadFile, target: str) -> dict:
        fd, staged = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".upload-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(file.file, out)
            trainer = get_trainer(model)
            version = None
            with http_errors():
                task.check_checkpoint(staged)
                if isinstance(trainer, GatedTrainTask):
                    who = f" ({user.username})" if user and user.username else ""
                    version = trainer.registry.register_file(
                        staged, "upload", f"uploaded by an admin{who} (PUT /model/{model}); not gated",
                        sidecar=trainer.sidecar(staged))["version"]
                else:
                    os.replace(staged, target)
        finally:
            if os.path.exists(staged):
                os.remove(staged)
        return {"checksum": file_checksum(target), "modified_time": int(os.stat(target).st_mtime), "version": version}

    path = f"{settings.MONAI_LABEL_API_STR}/model/{{model}}"
    replace_route(app, path, "PUT", api_update_model, tags=["Model"],
                  summary=f"{RBAC_ADMIN}Upload/Update Model File (checked before it is served)")
