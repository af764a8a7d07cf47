"""Cold start: concurrent first classifications of one study (loopback only, bounded).

    python benchmarks/bench_cold_start.py --concurrent 4 --studies 4 --json docs/results/bench_cold_start.json

Starts a real server over a temporary copy of the sample studies (SYNTHETIC). First `--concurrent`
identical classifications of one study on the cold server (a replica that just started, as after a
failover: the checkpoints are loaded then), timed until the last answer. Then, for each of `--studies` other studies, never
requested before: `--concurrent` identical classifications sent at once (as a double click, a retry, or
two radiologists opening the same case), timed until the last answer; and, for as many more studies,
one classification alone. Each study's first classification reads the study, runs the whole-study
segmentation and the input check (parotid.study_cache.SingleFlight makes concurrent first requests share
that work). Reports per study the wall time of the concurrent burst and of the single request, and the
ratio of their medians (1 would be free concurrency; `--concurrent` would be no sharing at all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_load import load_boxes  # noqa: E402
from report import report  # noqa: E402  (benchmarks/report.py)
from conftest import SAMPLE, Server, copy_app, copy_studies  # noqa: E402


def classify(url: str, model: str, sid: str, roi) -> int:
    return requests.post(f"{url}/infer/{model}", params={"image": sid, "output": "json"},
                         data={"params": json.dumps({"roi": roi})}, timeout=600).status_code


def burst(url: str, model: str, sid: str, roi, n: int) -> tuple[float, list[int]]:
    """n identical requests released together; (seconds until the last answer, status codes)."""
    codes: list[int] = [0] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        codes[i] = classify(url, model, sid, roi)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join(900) for t in threads]
    return time.perf_counter() - t0, codes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--studies", type=int, default=4, help="studies per arm (burst, single)")
    ap.add_argument("--model", default="classify_subtype")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    srv = Server(copy_studies(SAMPLE, tmp / "studies"), tmp / "server.log", app=copy_app(tmp / "app")).start()
    out = {"model": a.model, "concurrent": a.concurrent, "data": "SYNTHETIC sample studies, loopback",
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
           "load_average_at_start": list(os.getloadavg())}
    try:
        boxes = load_boxes(srv.url)
        if len(boxes) < 1 + 2 * a.studies:
            raise SystemExit(f"need {1 + 2 * a.studies} labelled studies, the sample has {len(boxes)}")
        s, codes = burst(srv.url, a.model, *boxes[0], a.concurrent)
        out["cold_server_burst_s"] = round(s, 2)
        bursts, singles, errors = [], [], [c for c in codes if c != 200]
        for sid, roi in boxes[1:1 + a.studies]:
            s, codes = burst(srv.url, a.model, sid, roi, a.concurrent)
            bursts.append(s)
            errors += [c for c in codes if c != 200]
        for sid, roi in boxes[1 + a.studies:1 + 2 * a.studies]:
            s, codes = burst(srv.url, a.model, sid, roi, 1)
            singles.append(s)
            errors += [c for c in codes if c != 200]
        out.update(burst_s=[round(v, 2) for v in bursts], single_s=[round(v, 2) for v in singles],
                   burst_median_s=round(float(np.median(bursts)), 2), single_median_s=round(float(np.median(singles)), 2),
                   burst_over_single=round(float(np.median(bursts) / np.median(singles)), 2), errors=errors,
                   load_average_at_end=list(os.getloadavg()))
    finally:
        srv.stop()
    report(out, a.json)
    return 0 if not out.get("errors") else 1


if __name__ == "__main__":
    raise SystemExit(main())
