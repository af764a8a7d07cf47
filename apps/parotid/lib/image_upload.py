"""PUT /datastore/image that never replaces a study silently.

MONAI Label 0.8.5's endpoint (monailabel/endpoints/datastore.py) takes the id from the file name up to
its FIRST dot (`1.2.840.113619.2.55.nii.gz` and `1.3.12.2.1107.5.2.nii.gz` both became `1`) and the
datastore then overwrote whatever study had that id, leaving the old labels attached to the new
study. This route replaces it (and its deprecated twin PUT /datastore/): the id keeps every part of
the file name but the image extension, and an existing id is a 409 unless the caller passes
`overwrite=true` (admin role: the old study's labels leave service), in which case the datastore
archives the old study, its labels and label info in the same request (`lib/datastore.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Query, UploadFile
from monailabel.config import RBAC_ANNOTATOR, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file

from lib.datastore import StudyDatastore
from lib.study_support import FLAG_KEYS
from parotid.cohort import split_image_name
from parotid.routes import replace_route
from parotid.worker_pool import offload

OVERWRITE_HELP = ("replace the study that has this id; its labels and label info are archived in the study "
                  "folder's .archive/ (admin role). Without it an existing id is a 409.")


async def api_add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = Query(None, description="study id (default: the file name without its image extension)"),
    overwrite: bool = Query(False, description=OVERWRITE_HELP),
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)),
):
    if overwrite and settings.MONAI_LABEL_AUTH_ENABLE and settings.MONAI_LABEL_AUTH_ROLE_ADMIN not in user.roles:
        raise HTTPException(403, f'overwrite=true needs the role "{settings.MONAI_LABEL_AUTH_ROLE_ADMIN}"')
    stem, ext = split_image_name(file.filename or "")
    image_id = image or stem
    info = json.loads(params) if params else {}
    if not isinstance(info, dict):
        raise HTTPException(422, f"params must be a JSON object, got {type(info).__name__}")
    if user and user.username:
        info["user"] = user.username
    fd, path = tempfile.mkstemp(suffix=ext or ".nii.gz")
    background_tasks.add_task(remove_file, path)
    # copying, reading and indexing the study block: in the worker pool (one upload per id at a time)
    return await offload(f"image:{image_id}", _store, fd, path, file, image_id, info, overwrite)


def _store(fd: int, path: str, file: UploadFile, image_id: str, info: dict, overwrite: bool) -> dict:
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(file.file, out)
    ds = app_instance().datastore()
    if isinstance(ds, StudyDatastore):  # archives the replaced study in the same index transaction
        image_id = ds.add_image(image_id, path, info, overwrite=overwrite)
        stored = ds.get_image_info(image_id)  # the upload answer carries the flags lib/study_support.py set
        archived = stored.get("archived")
        return {"image": image_id, **{k: stored[k] for k in FLAG_KEYS if k in stored},
                **({"archived": archived} if archived else {})}
    if not overwrite and image_id in ds.list_images():
        raise HTTPException(409, f"study '{image_id}' already exists; repeat the upload with overwrite=true to replace it")
    return {"image": ds.add_image(image_id, path, info)}


def install_image_upload(app) -> None:
    """Replace MONAI Label's PUT /datastore/image and PUT /datastore/ routes in place (and in the schema)."""
    prefix = f"{settings.MONAI_LABEL_API_STR}/datastore"
    for path, public in ((f"{prefix}/image", True), (f"{prefix}/", False)):
        replace_route(app, path, "PUT", api_add_image, tags=["Datastore"], include_in_schema=public,
                      deprecated=not public, summary=f"{RBAC_ANNOTATOR}Upload new Image (never replaces "
                                                     "a study without overwrite=true)")
