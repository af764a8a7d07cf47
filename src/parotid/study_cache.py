"""Small, size-bounded caches of per-study work that every classification repeated (issue 11).

Profiled on the sample studies (1 torch thread, contended 2-core machine; benchmarks/bench_load.py,
docs/benchmarks.md): of a classify request's ~1.2 s outside MONAI Label, reading and decompressing the
study took ~0.14 s, the input check's intensity statistics ~0.56 s and its whole-study segmentation
~0.53 s (cache miss), the classification network with MC dropout and Grad-CAM ~0.29 s. A radiologist
segments, then classifies, then re-classifies with another box the SAME study, so:

* ``read_study_cached(path)``: parsed studies keyed by (real path, modification time in ns, size): a
  replaced or rewritten file is a different key;
* ``ByteLRU``: a thread-safe LRU bounded by bytes (``PAROTID_STUDY_CACHE_MB``, default 512, for studies;
  parotid.input_check keeps its study-level components in another one);
* ``SingleFlight``: concurrent requests missing the same key compute it once (the others wait for that
  result). Without it (and without the classify task's load lock), 4 concurrent first classifications of one
  study each read the study, ran the whole-study segmentation and the input check, and on a cold server loaded
  the classifier: 11.2 s on idle 2 cores, 5.7 s with it (benchmarks/bench_cold_start.py, docs/benchmarks.md).

Cached objects are shared between concurrent requests and must not be modified (nothing does).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

from parotid.env_settings import env_number
from parotid.study import Study, read_study


def budget_mib(env: str, default: int) -> int:
    return env_number(env, default, int, 0, "a whole number of MiB")


class SingleFlight:
    """``run(key, compute)``: while a call for `key` is computing, concurrent calls for the same key wait
    for it and return its result instead of computing it again; if it raised, each waiter computes on its
    own (and reports its own error). Results are shared and must not be modified (as cached objects).
    Hand-written: the standard library has no per-key call coalescing (functools.cache does not
    coalesce concurrent misses and is unbounded)."""

    class _Call:
        def __init__(self) -> None:
            self.done = threading.Event()
            self.value: Any = None
            self.failed = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, SingleFlight._Call] = {}
        self.shared = 0  # calls answered by another call's result (for tests and benchmarks)

    def run(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if leader:
                call = self._calls[key] = SingleFlight._Call()
        if not leader:
            call.done.wait()
            if call.failed:
                return compute()
            with self._lock:
                self.shared += 1
            return call.value
        try:
            call.value = compute()
            return call.value
        except BaseException:
            call.failed = True
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()


class ByteLRU:
    """Least-recently-used cache holding at most `max_bytes` (as measured by `size_of` at insertion)."""

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int]):
        self.max_bytes, self.size_of = max_bytes, size_of
        self._items: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._flights = SingleFlight()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return hit[0]

    def put(self, key: Hashable, value: Any) -> Any:
        size = int(self.size_of(value))
        if size > self.max_bytes:
            return value  # larger than the whole cache: not kept
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, s) = self._items.popitem(last=False)
                self._bytes -= s
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value of `key`, else `compute()` put in the cache; concurrent misses of one key
        compute it once (``SingleFlight``)."""
        hit = self.get(key)
        if hit is not None:
            return hit

        def once() -> Any:
            with self._lock:  # a call that finished between our miss and now left its value here
                done = self._items.get(key)
            return done[0] if done is not None else self.put(key, compute())

        return self._flights.run(key, once)


def study_nbytes(study: Study) -> int:
    img = study.image
    n = img.GetNumberOfPixels() * img.GetNumberOfComponentsPerPixel()
    return n * img.GetSizeOfPixelComponent()


_STUDIES = ByteLRU(budget_mib("PAROTID_STUDY_CACHE_MB", 512) * 2**20, study_nbytes)


def read_study_cached(path: str, name: str = "study") -> Study:
    """``parotid.study.read_study(path, name)``, reused while the file keeps its path, time and size."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, name)
    return _STUDIES.get_or_compute(key, lambda: read_study(path, name=name))


def study_key(study: Study) -> str:
    """Content hash of a study (voxel values, grid, sequence names): the key of per-study results (the
    segmentation label, the input check's components). Kept on the Study object (studies are not
    modified; the server reuses parsed studies)."""
    import hashlib

    import numpy as np
    import SimpleITK as sitk

    memo = study.__dict__.get("_content_key")
    if memo and memo[0] is study.image:
        return memo[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(study.image)).tobytes())
    h.update(repr((study.sequences, study.image.GetSpacing(), study.image.GetOrigin(), study.image.GetDirection())).encode())
    key = h.hexdigest()
    study.__dict__["_content_key"] = (study.image, key)
    return key
