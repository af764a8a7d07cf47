"""Segmentation latency per study over HTTP (p50 of N) and the server's peak RSS.

    python benchmarks/bench_segmentation.py --studies sample-data/studies --n 7

Starts a real server on loopback over a temporary copy of the studies, sends N sequential
/infer/segmentation requests (one per study, cycling), and samples the RSS of the server process
tree (psutil) every 50 ms. Targets (issue 3): p50 <= 3 s, peak RSS <= 3 GiB on a 2-core CPU.
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
import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import report  # noqa: E402  (benchmarks/report.py)
from conftest import Server, copy_app, copy_studies  # noqa: E402  (the same server harness as the tests)


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", default="sample-data/studies")
    ap.add_argument("--n", type=int, default=7)
    ap.add_argument("--models", default="all")
    ap.add_argument("--model", default="segmentation")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-seg-"))
    srv = Server(copy_studies(Path(a.studies), tmp / "studies"), tmp / "server.log", models=a.models,
                 app=copy_app(tmp / "app")).start()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(srv.proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        ids = sorted(requests.get(srv.url + "/datastore/?output=all", timeout=30).json()["objects"])
        requests.post(f"{srv.url}/infer/{a.model}", params={"image": ids[0], "output": "json"}, timeout=120)  # warm-up
        lat = []
        for i in range(a.n):
            t0 = time.perf_counter()
            r = requests.post(f"{srv.url}/infer/{a.model}", params={"image": ids[i % len(ids)], "output": "image"}, timeout=120)
            lat.append(time.perf_counter() - t0)
            r.raise_for_status()
    finally:
        stop.set()
        t.join()
        srv.stop()
    out = {
        "model": a.model, "n": a.n, "p50_s": round(float(np.median(lat)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
        "max_s": round(max(lat), 3), "server_peak_rss_gib": round(peak[0] / 2**30, 3), "cpu_count": os.cpu_count(),
    }
    report(out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
