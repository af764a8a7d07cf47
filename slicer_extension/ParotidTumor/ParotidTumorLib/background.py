"""Run a server request off the GUI thread, with Cancel and a timeout (no Qt, no Slicer).

The widget starts a :class:`BackgroundTask` for the HTTP part of an action (upload, infer, next sample,
training status) and polls :meth:`BackgroundTask.poll` from a ``qt.QTimer`` on the GUI thread; only the
GUI thread then touches MRML with the result (MRML and Qt are not thread-safe). A plain
``threading.Thread`` suffices here: the work is I/O-bound HTTP, and results come back as Python
objects. (SlicerMONAIAuto3DSeg runs its inference in a separate *process* because it computes in
Slicer; we only wait for a server.)

Cancel / timeout cannot interrupt a request already in flight (``requests`` has no abort): the task is
marked CANCELLED / TIMED_OUT at once, its result is discarded, the GUI is free again, and the worker
thread ends when its request ends (bounded by the client's own timeouts). The work function receives
a :class:`CancelToken` and should call ``token.check()`` between requests so that a cancelled task
does not start the next one (e.g. no inference after a cancelled upload).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

RUNNING, DONE, FAILED, CANCELLED, TIMED_OUT = "running", "done", "failed", "cancelled", "timed out"


class Cancelled(Exception):
    """Raised by :meth:`CancelToken.check` inside the work function after Cancel / timeout."""


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled")


class BackgroundTask:
    """``fn(token) -> result`` in a daemon thread; state is one of RUNNING, DONE, FAILED, CANCELLED,
    TIMED_OUT. ``timeout_s`` None: no limit (the client's request timeouts still apply)."""

    def __init__(self, fn: Callable[[CancelToken], Any], timeout_s: float | None = None, name: str = "request"):
        self.fn, self.timeout_s, self.name = fn, timeout_s, name
        self.token = CancelToken()
        self.result: Any = None
        self.error: BaseException | None = None
        self._state = RUNNING
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"ParotidTumor {name}", daemon=True)
        self.started = None

    def start(self) -> "BackgroundTask":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            result, error = self.fn(self.token), None
        except BaseException as e:  # handed to the GUI thread, which shows it
            result, error = None, e
        with self._lock:
            if self._state != RUNNING:  # cancelled / timed out meanwhile: discard
                return
            self.result, self.error = result, error
            self._state = DONE if error is None else (CANCELLED if isinstance(error, Cancelled) else FAILED)

    def _finish(self, state: str) -> bool:
        with self._lock:
            if self._state != RUNNING:
                return False
            self._state = state
        self.token.cancel()
        return True

    def cancel(self) -> bool:
        """Stop waiting for the task (True if it was still running)."""
        return self._finish(CANCELLED)

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def poll(self) -> str:
        """The current state; turns RUNNING into TIMED_OUT once ``timeout_s`` has passed."""
        if self._state == RUNNING and self.timeout_s is not None and self.elapsed_s > self.timeout_s:
            self._finish(TIMED_OUT)
        return self._state

    @property
    def state(self) -> str:
        return self.poll()

    def wait(self, interval_s: float = 0.05, max_s: float | None = None) -> str:
        """Block until the task leaves RUNNING (scripts / tests); returns the final state."""
        t0 = time.monotonic()
        while self.poll() == RUNNING and (max_s is None or time.monotonic() - t0 < max_s):
            self._thread.join(interval_s)
        return self._state

    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    def message(self) -> str:
        """A short user message for the final state."""
        s = self._state
        if s == DONE:
            return f"{self.name}: done ({self.elapsed_s:.1f} s)"
        if s == CANCELLED:
            return f"{self.name}: cancelled (the server may finish the request; its result is ignored)"
        if s == TIMED_OUT:
            return f"{self.name}: no answer within {self.timeout_s:g} s; gave up waiting (check the server)"
        if s == FAILED:
            return f"{self.name} failed: {self.error}"
        return f"{self.name} ... {self.elapsed_s:.0f} s"
