"""POST /train/{model}: one training at a time across every worker process and replica that share the model
directory.

MONAI Label 0.8.5 refuses a second training only inside one process (its table of running subprocesses),
so with ``--workers N`` or several replicas each process would start its own training over the same
checkpoints. Here a training takes an exclusive ``flock`` on ``<model_dir>/.training.lock`` when it is
requested and keeps it until MONAI Label's background training task has ended (the release is queued on
the same single-thread executor, after the task). A request on any process while it is held is a 429
naming the running training (model, start time, process, host), read from the lock file. The lock is the
kernel's: it goes with the process that holds it, so a killed worker never leaves a stale lock (its
training subprocess may still finish and write its checkpoint; a new training can then start alongside
it). ``flock`` works on local disks and NFSv4 volumes (docs/admin.md, "Several replicas").
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any, Dict, Optional

from fastapi import Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from monailabel.config import RBAC_ADMIN, settings
from monailabel.endpoints import train
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.async_tasks import utils as async_tasks

from parotid.registry import tracked_by_git
from parotid.routes import replace_route

LOCK_NAME = ".training.lock"


class TrainingLock:
    """An exclusive, non-blocking, cross-process lock whose file records who holds it."""

    def __init__(self, path: str):
        self.path = path
        self._fd: Optional[int] = None

    def try_acquire(self, holder: Dict[str, Any]) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> Dict[str, Any]:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}


def busy_detail(holder: Dict[str, Any]) -> str:
    if not holder:
        return "a training is already running (one at a time across all workers and replicas); try again later"
    return (f"a training is already running: model '{holder.get('model')}' since {holder.get('started')} "
            f"(process {holder.get('pid')} on {holder.get('host')}); one training at a time across all workers "
            f"and replicas, try again when it has finished (GET /train/ on that process shows its progress)")


def install_single_training(app, model_dir: str) -> None:
    """Replace MONAI Label's POST /train/{model} and (deprecated) POST /train/ with lock-taking versions."""
    lock_path = os.path.join(model_dir, LOCK_NAME)

    def acquire(model: str) -> TrainingLock:
        if tracked_by_git(model_dir):  # refused before any file is written there (parotid.registry)
            raise HTTPException(409, f"the model dir {model_dir} is in a git checkout (the repository's tracked "
                                     "checkpoints), which a running server never rewrites: no training here; start "
                                     "the server with --conf model_dir DIR on a copy (scripts/serve.sh does)")
        lock = TrainingLock(lock_path)
        holder = {"model": model, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "pid": os.getpid(), "host": socket.gethostname()}
        if not lock.try_acquire(holder):
            raise HTTPException(429, busy_detail(lock.holder()))
        return lock

    async def start(lock: TrainingLock, run, run_sync: bool):
        if run_sync:
            try:
                return await run_in_threadpool(run)
            finally:
                lock.release()
        try:
            result = run()
        except BaseException:
            lock.release()
            raise
        executor = async_tasks.background_executors.get("train")
        if executor is None:  # nothing was queued
            lock.release()
        else:  # one thread, first in first out: runs when the queued training(s) have ended
            executor.submit(lock.release)
        return result

    async def api_run_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                            enqueue: Optional[bool] = False,
                            user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        lock = acquire(model)
        return await start(lock, lambda: train.run_model(model, params, run_sync, enqueue), bool(run_sync))

    async def api_run(params: Optional[dict] = None, run_sync: Optional[bool] = False,
                      user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        lock = acquire("all")
        return await start(lock, lambda: train.run(params, run_sync), bool(run_sync))

    prefix = f"{settings.MONAI_LABEL_API_STR}/train"
    replace_route(app, f"{prefix}/{{model}}", "POST", api_run_model, tags=["Train"],
                  summary=f"{RBAC_ADMIN}Run Training Task for specific model (one at a time across processes)")
    replace_route(app, f"{prefix}/", "POST", api_run, tags=["Train"], include_in_schema=False, deprecated=True,
                  summary=f"{RBAC_ADMIN}Run All Training Tasks")
