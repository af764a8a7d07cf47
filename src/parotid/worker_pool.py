"""A bounded worker pool for the blocking work of HTTP routes, so the event loop stays free (issue 11).

MONAI Label 0.8.5's routes are ``async def`` functions that call synchronous code (inference, label
saves): while one runs, the event loop answers nothing else, ``GET /info/`` included. Routes this app
owns run that work with ``await offload(key, fn, *args)`` instead:

* in a worker thread (``anyio.to_thread.run_sync``, context variables are copied into it), at most
  ``PAROTID_WORKERS`` (default 2, the cores of the reference machine) at a time across all routes;
* one call per ``key`` at a time (a lock per key, e.g. per model): a served network is shared and
  not thread-safe -- MC dropout switches its dropout layers to train mode, Grad-CAM hooks it, and
  MONAI Label's task caches (``BasicInferTask._networks``) are mutated without a lock. Different
  models still run in parallel.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable, Dict, Optional

import anyio
import anyio.to_thread

ENV = "PAROTID_WORKERS"

_limiter: Optional[anyio.CapacityLimiter] = None
_locks: Dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def workers() -> int:
    value = os.environ.get(ENV, "2")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{ENV} must be a whole number of worker threads (e.g. 2), got {value!r}") from None
    if n < 1:
        raise ValueError(f"{ENV} must be at least 1, got {n}")
    return n


def limiter() -> anyio.CapacityLimiter:
    global _limiter
    if _limiter is None:  # created lazily, inside the server's event loop
        _limiter = anyio.CapacityLimiter(workers())
    return _limiter


def key_lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _locked(key: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    with key_lock(key):
        return fn(*args, **kwargs)


async def offload(key: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in the bounded pool, one at a time per `key`; exceptions propagate."""
    return await anyio.to_thread.run_sync(functools.partial(_locked, key, fn, *args, **kwargs), limiter=limiter())
