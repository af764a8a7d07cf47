"""Micro-batching of concurrent requests to one model (issue 11).

Requests run in worker threads (parotid.worker_pool). A request that needs the network calls
``batcher.submit(item)``; the first caller becomes the batch's *leader*: it waits at most ``max_wait_s``
for more items (or until ``max_size``), then runs ``run_batch(items)`` in its own thread and hands
every caller its result. While one batch runs, new items queue for the next one, so a batch also
serialises all use of the shared network (its dropout/train switches and Grad-CAM hooks are not
thread-safe). No extra thread, no event loop involvement.

``run_batch(items) -> results`` returns one result per item, in order; it may return an Exception
instance for one item (only that caller gets it). If it raises, each item of the batch is re-run
alone, so one bad request never fails the others.

``batcher_for(owner, run_batch)`` returns the batcher of `owner` (the served network object: a
reloaded checkpoint is a new object and so gets a new batcher), which calls ``run_batch(owner, items)``. Tuning: ``PAROTID_BATCH_MAX``
(default 8) and ``PAROTID_BATCH_WAIT_MS`` (default 5).
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Generic, List, Optional, Sequence, TypeVar

from parotid.env_settings import env_number

T = TypeVar("T")
R = TypeVar("R")


class _Slot:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item):
        self.item, self.done, self.result, self.error = item, False, None, None


class MicroBatcher(Generic[T, R]):
    def __init__(self, run_batch: Callable[[List[T]], Sequence[Any]], max_size: int = 8, max_wait_s: float = 0.005):
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.run_batch, self.max_size, self.max_wait_s = run_batch, int(max_size), float(max_wait_s)
        self._cond = threading.Condition()
        self._pending: List[_Slot] = []
        self._leading = False
        self.batch_sizes: List[int] = []  # observed sizes (last 1000), for tests and benchmarks

    def submit(self, item: T) -> R:
        slot = _Slot(item)
        with self._cond:
            self._pending.append(slot)
            self._cond.notify_all()
            while True:
                if slot.done:
                    break
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                try:
                    batch = self._collect()
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                finally:
                    self._leading = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _collect(self) -> List[_Slot]:
        """(Holding the condition.) Wait up to max_wait for a full batch; take at most max_size, oldest first."""
        deadline = time.monotonic() + self.max_wait_s
        while len(self._pending) < self.max_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)
        batch, self._pending = self._pending[: self.max_size], self._pending[self.max_size:]
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
        return batch

    def _run(self, batch: List[_Slot]) -> None:
        try:
            results = list(self.run_batch([s.item for s in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as e:
            if len(batch) == 1:
                results = [e]
            else:  # one bad item must not fail the others: each alone
                results = []
                for s in batch:
                    try:
                        results.append(self.run_batch([s.item])[0])
                    except Exception as err:
                        results.append(err)
        for s, r in zip(batch, results):
            if isinstance(r, BaseException):
                s.error = r
            else:
                s.result = r
            s.done = True


_BATCHERS: "weakref.WeakKeyDictionary[Any, MicroBatcher]" = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def batcher_for(owner: Any, run_batch: Callable[[Any, list], Sequence[Any]], max_size: Optional[int] = None,
                max_wait_s: Optional[float] = None) -> MicroBatcher:
    """The one batcher of `owner` (created on first use, dropped with `owner`); it runs
    ``run_batch(owner, items)``."""
    with _GUARD:
        b = _BATCHERS.get(owner)
        if b is None:
            size = max_size if max_size is not None else int(env_number("PAROTID_BATCH_MAX", 8, int, 1, "a whole number of requests per batch"))
            wait = max_wait_s if max_wait_s is not None else env_number("PAROTID_BATCH_WAIT_MS", 5.0, float, 0, "a number of milliseconds") / 1000
            ref = weakref.ref(owner)  # the batcher must not keep `owner` alive
            b = _BATCHERS[owner] = MicroBatcher(lambda items: run_batch(ref(), items), max(1, size), wait)
        return b
