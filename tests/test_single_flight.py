"""Concurrent first requests for one study do its per-study work once (parotid.study_cache.SingleFlight):
the parsed study, the input check's components and the whole-study segmentation. Real threads; the last
test runs the served segmentation checkpoint on a real sample study (SYNTHETIC)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from parotid.study_cache import ByteLRU, SingleFlight

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data" / "studies"
MODEL = ROOT / "apps" / "parotid" / "model" / "segmentation.pt"
THREADS = 4


def _concurrently(call, n: int = THREADS) -> list:
    """`call(i)` in n threads started together; their results (or exceptions) in thread order."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = call(i)
        except Exception as e:  # noqa: BLE001 - returned to the test
            out[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


class _SlowCompute:
    """Counts its calls; the first call waits until every thread has entered (so the others are waiting on
    it, not arriving after it finished), then takes 0.2 s."""

    def __init__(self, fail_first: bool = False):
        self.calls, self.entered, self.fail_first = 0, 0, fail_first
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.entered += 1

    def __call__(self):
        with self.lock:
            self.calls += 1
            first = self.calls == 1
        if first:
            deadline = time.time() + 10
            while self.entered < THREADS and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            if self.fail_first:
                raise OSError("the first read failed")
        return object()


def test_concurrent_calls_for_one_key_compute_once_and_share_the_result():
    flight, compute = SingleFlight(), _SlowCompute()

    def call(i):
        compute.enter()
        return flight.run("study-1", compute)

    results = _concurrently(call)
    assert compute.calls == 1 and flight.shared == THREADS - 1
    assert all(r is results[0] for r in results)
    assert flight.run("study-1", object) is not results[0]  # nothing is kept once the call is over


def test_different_keys_do_not_wait_for_each_other():
    flight = SingleFlight()
    started = threading.Barrier(2, timeout=10)

    def call(i):
        return flight.run(f"study-{i}", lambda: started.wait() is not None)  # both must run at the same time

    assert _concurrently(call, 2) == [True, True]


def test_a_failed_call_is_not_shared_each_waiter_computes_its_own():
    flight, compute = SingleFlight(), _SlowCompute(fail_first=True)

    def call(i):
        compute.enter()
        return flight.run("study-1", compute)

    results = _concurrently(call)
    errors = [r for r in results if isinstance(r, OSError)]
    assert len(errors) == 1  # only the request whose read failed reports it
    assert compute.calls == THREADS and flight.shared == 0


def test_lru_get_or_compute_coalesces_misses_and_keeps_the_value():
    cache, compute = ByteLRU(1000, lambda v: 10), _SlowCompute()

    def call(i):
        compute.enter()
        return cache.get_or_compute("k", compute)

    results = _concurrently(call)
    assert compute.calls == 1 and all(r is results[0] for r in results)
    assert cache.get_or_compute("k", object) is results[0]  # kept: no new compute
    big = ByteLRU(5, lambda v: 10)  # larger than the whole cache: returned, not kept
    first = big.get_or_compute("k", object)
    assert first is not None and big.get_or_compute("k", object) is not first


def test_four_concurrent_first_requests_segment_a_study_once(monkeypatch):
    import parotid.segmentation.inference as inference
    from parotid.segmentation.checkpoint import StudySegmenter
    from parotid.study import read_study

    if not MODEL.exists():
        pytest.skip("no shipped segmentation checkpoint")
    real, runs = inference.segment_study, []

    def counted(*args, **kwargs):
        runs.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "segment_study", counted)  # a spy around the real model run
    segmenter = StudySegmenter(str(MODEL))
    study = read_study(str(SAMPLE / "syn7_0000.nii.gz"), "syn7_0000")
    labels = _concurrently(lambda i: segmenter.label_of(study))
    assert not any(isinstance(x, Exception) for x in labels), labels
    assert len(runs) == 1, f"{len(runs)} segmentations of one study for {THREADS} concurrent requests"
    assert all(x is labels[0] for x in labels) and isinstance(labels[0], np.ndarray)
    assert labels[0].any()


def test_four_concurrent_first_classifications_load_the_checkpoint_once(monkeypatch):
    """The classify infer task (apps/parotid/lib/infers/classify.py) on a cold server: concurrent first
    requests load the checkpoint once and share the network (before: one load per request)."""
    import sys

    from conftest import APP

    sys.path.insert(0, str(APP))
    try:
        import lib.infers.classify as classify
    finally:
        sys.path.remove(str(APP))
    path = APP / "model" / "classify_malignancy.pt"
    real, loads = classify.load_checkpoint, []

    def counted(*args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.3)  # the others arrive while it loads
        return real(*args, **kwargs)

    monkeypatch.setattr(classify, "load_checkpoint", counted)  # a spy around the real loader
    task = classify.ClassifyStudy("classify_malignancy", str(path), "benign_malignant")
    nets = _concurrently(lambda i: task._get_network("cpu", {}))
    assert not any(isinstance(x, Exception) for x in nets), nets
    assert len(loads) == 1, f"{len(loads)} loads of one checkpoint for {THREADS} concurrent requests"
    assert all(x is nets[0] for x in nets)
