"""A bounded worker pool for the blocking work of HTTP routes, so the event loop stays free (issue 11).

MONAI Label 0.8.5's routes are ``async def`` functions that call synchronous code (inference, label
saves): while one runs, the event loop answers nothing else, ``GET /info/`` included. Routes this app
owns run that work with ``await offload(key, fn, *args)`` instead:

* in a worker thread (``anyio.to_thread.run_sync``, context variables are copied into it), at most
  ``PAROTID_WORKERS`` (default 2, the cores of the reference machine) at a time across the routes'
  blocking work (label saves, uploads, ...); reads that may wait for a lock a save holds (the datastore
  listing) have their own pool (``PAROTID_READ_THREADS``, default 4), so have synchronous batch jobs
  (``PAROTID_JOB_THREADS``, default 2); inference has its own pool (``pool="infer"``) of
  ``PAROTID_INFER_THREADS`` (default 16) threads, which mostly wait for their model's micro-batch
  (parotid.batching), so that many inferences never delay a label save or the other way round;
* one call per ``key`` at a time (a lock per key, e.g. per model) unless ``key`` is None: a served
  network is shared and not thread-safe -- MC dropout switches its dropout layers to train mode,
  Grad-CAM hooks it. Models whose network work goes through a micro-batcher (which serialises it)
  run their requests concurrently (key None). Different models still run in parallel.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, Optional

import anyio
import anyio.to_thread

from parotid.env_settings import env_number

ENV = "PAROTID_WORKERS"
INFER_ENV = "PAROTID_INFER_THREADS"

_limiters: Dict[str, anyio.CapacityLimiter] = {}
_locks: Dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def workers(env: str = ENV, default: int = 2) -> int:
    return env_number(env, default, int, 1, f"a whole number of worker threads (e.g. {default})")


POOLS = {"requests": (ENV, 2), "reads": ("PAROTID_READ_THREADS", 4), "jobs": ("PAROTID_JOB_THREADS", 2),
         "infer": (INFER_ENV, 16)}


def limiter(pool: str = "requests") -> anyio.CapacityLimiter:
    if pool not in _limiters:  # created lazily, inside the server's event loop
        _limiters[pool] = anyio.CapacityLimiter(workers(*POOLS[pool]))
    return _limiters[pool]


def key_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _locked(key: Optional[str], fn: Callable[..., Any], *args, **kwargs) -> Any:
    if key is None:
        return fn(*args, **kwargs)
    with key_lock(key):
        return fn(*args, **kwargs)


async def offload(key: Optional[str], fn: Callable[..., Any], *args, pool: str = "requests", **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in the bounded `pool`, one at a time per `key` (None: no such limit);
    exceptions propagate."""
    return await anyio.to_thread.run_sync(functools.partial(_locked, key, fn, *args, **kwargs), limiter=limiter(pool))
