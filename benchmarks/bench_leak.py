"""Server memory over many heatmap requests: RSS after `--n` Grad-CAM classifications vs after `--base`.

    python benchmarks/bench_leak.py --n 500 --base 50

A real `monailabel start_server` on loopback over a copy of the sample studies (synthetic); each request
is `POST /infer/classify_subtype` with the study's box and the heatmap NIfTI (output=all), cycling over the
studies. RSS is the server process's (`python -m monailabel.main`, which serves HTTP and runs inference);
background jobs (scoring, training) are separate child processes that come and go, so they are left out. Issue 11's target: RSS(n) - RSS(base) <= 100 MiB (each leaked Grad-CAM kept ~0.28 MiB per branch).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import report  # noqa: E402  (benchmarks/report.py)
from conftest import SAMPLE, Server, copy_app, copy_studies  # noqa: E402


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--base", type=int, default=50)
    ap.add_argument("--every", type=int, default=50, help="sample RSS every this many requests")
    ap.add_argument("--model", default="classify_subtype")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-leak-"))
    srv = Server(copy_studies(SAMPLE, tmp / "studies"), tmp / "server.log", app=copy_app(tmp / "app")).start()
    samples, t0 = {}, time.perf_counter()
    try:
        objects = requests.get(srv.url + "/datastore/?output=all", timeout=30).json()["objects"]
        boxes = [(k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items()) if "final" in v["labels"]]
        for i in range(1, a.n + 1):
            sid, roi = boxes[i % len(boxes)]
            r = requests.post(f"{srv.url}/infer/{a.model}", params={"image": sid, "output": "all"},
                              data={"params": json.dumps({"roi": roi})}, timeout=120)
            r.raise_for_status()
            if i == a.base or i % a.every == 0 or i == a.n:
                samples[i] = round(rss_mib(srv.proc.pid), 1)
                print(f"{i:5d} requests: RSS {samples[i]} MiB", flush=True)
    finally:
        srv.stop()
    out = {"model": a.model, "requests": a.n, "base": a.base, "rss_mib": samples,
           "growth_mib": round(samples[a.n] - samples[a.base], 1), "wall_s": round(time.perf_counter() - t0, 1),
           "data": "synthetic sample studies (sample-data/studies)"}
    report(out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
