"""SHA-256 of files (checkpoints): the model registry, the per-subset tables and the input check name the
weights they were made for by it. ``cached_sha256`` remembers the digest per (path, mtime, size)."""

from __future__ import annotations

import hashlib
import os
import threading

_CACHE: dict[tuple, str] = {}
_LOCK = threading.Lock()


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    digest = sha256_of(path)
    with _LOCK:
        _CACHE[key] = digest
    return digest
