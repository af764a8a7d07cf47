"""Load: N concurrent classify clients for T seconds, optionally while a training runs (loopback only, bounded).

    python benchmarks/bench_load.py --clients 20 --seconds 60              # while a training runs
    python benchmarks/bench_load.py --compare --clients 16 --seconds 30 --no-train   # issue 11: 1 vs 16
    python benchmarks/bench_load.py --compare --clients 16 --seconds 30    # the same while a training runs

Starts a real server over a temporary copy of the sample studies (SYNTHETIC), classifies every study
once (warm-up: checkpoint load, the parsed-study and input-check caches, see parotid.study_cache),
optionally starts a segmentation training (`/train/segmentation`, long enough to overlap the run), then
N threads send /infer/{model} requests with each study's box for T seconds while one more thread
probes `GET /info/` and `GET /datastore/?output=stats` (every 0.2 s). With --compare a 1-client phase
runs first, in the same server and the same run, and the throughput ratio and the 16-client p95 over
the 1-client p50 are reported (issue 11: >= 2.5 and <= 8). Reports errors (any non-200 or exception),
latency p50/p95/max, throughput and the probes' p50/p95. Every request loop is bounded by the deadline
and a request timeout.

Reusable: ``load_boxes(url)`` (study ids and boxes of the server's labelled studies) and
``run_load(url, model, boxes, clients, seconds)`` (one phase against any base URL, e.g. nginx).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import report  # noqa: E402  (benchmarks/report.py)
from conftest import SAMPLE, Server, copy_app, copy_studies  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--model", default="classify_malignancy")
    ap.add_argument("--train-iterations", type=int, default=400)
    ap.add_argument("--no-train", action="store_true", help="no training during the load")
    ap.add_argument("--compare", action="store_true", help="a 1-client phase first; report the throughput ratio")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    srv = Server(copy_studies(SAMPLE, tmp / "studies"), tmp / "server.log", app=copy_app(tmp / "app")).start()
    out = {"model": a.model, "seconds": a.seconds, "data": "SYNTHETIC sample studies, loopback",
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": list(os.getloadavg())}
    try:
        boxes = load_boxes(srv.url)
        t0 = time.perf_counter()
        for sid, roi in boxes:  # warm-up: checkpoint load, parsed studies and input-check results cached
            requests.post(f"{srv.url}/infer/{a.model}", params={"image": sid, "output": "json"},
                          data={"params": json.dumps({"roi": roi})}, timeout=300).raise_for_status()
        out["warmup_s_per_study"] = round((time.perf_counter() - t0) / len(boxes), 3)
        if not a.no_train:
            r = requests.post(f"{srv.url}/train/segmentation", json={"iterations": a.train_iterations}, timeout=30)
            out["training_started"] = r.status_code == 200
        if a.compare:
            out["one_client"] = run_load(srv.url, a.model, boxes, 1, a.seconds)
        out["many_clients"] = run_load(srv.url, a.model, boxes, a.clients, a.seconds)
        if a.compare:
            one, many = out["one_client"], out["many_clients"]
            out["throughput_ratio"] = round(many["throughput_rps"] / one["throughput_rps"], 2) if one["throughput_rps"] else None
            out["p95_over_single_p50"] = round(many["p95_s"] / one["p50_s"], 2) if one["p50_s"] and many["p95_s"] else None
        if not a.no_train:
            out["training_status_at_end"] = requests.get(srv.url + "/train/", timeout=30).json().get("status")
        out["load_average_at_end"] = list(os.getloadavg())
    finally:
        srv.stop()
    report(out, a.json)
    return 0 if not out["many_clients"]["errors"] else 1


def _pct(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def load_boxes(url: str) -> list[tuple[str, list[int]]]:
    """(study id, final label's box) of every labelled study of the server at `url`."""
    objects = requests.get(url + "/datastore/?output=all", timeout=30).json()["objects"]
    return [(k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items()) if "final" in v["labels"]]


PROBES = ("/info/", "/datastore/?output=stats")


def run_load(url: str, model: str, boxes, clients: int, seconds: float, probes=PROBES) -> dict:
    """`clients` threads classify (cycling over `boxes`) for `seconds` while one thread GETs each of
    `probes` every 0.2 s; latency percentiles, throughput, errors, probe percentiles per path."""
    lat: list[float] = []
    probe_lat: dict[str, list[float]] = {p: [] for p in probes}
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def client(i: int):
        n = i
        while time.time() < deadline:
            sid, roi = boxes[n % len(boxes)]
            n += clients
            t0 = time.perf_counter()
            try:
                resp = requests.post(f"{url}/infer/{model}", params={"image": sid, "output": "json"},
                                     data={"params": json.dumps({"roi": roi})}, timeout=300)
                ok = resp.status_code == 200
                msg = f"{resp.status_code} {resp.text[:100]}"
            except requests.RequestException as e:
                ok, msg = False, repr(e)
            with lock:
                (lat.append(time.perf_counter() - t0) if ok else errors.append(msg))

    def prober():
        while time.time() < deadline:
            for path in probes:
                t0 = time.perf_counter()
                try:
                    ok = requests.get(f"{url}{path}", timeout=60).ok
                except requests.RequestException:
                    ok = False
                with lock:
                    (probe_lat[path].append(time.perf_counter() - t0) if ok else errors.append(f"GET {path} failed"))
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=prober)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"clients": clients, "requests_ok": len(lat), "errors": len(errors), "error_samples": errors[:5],
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "max_s": round(max(lat), 3) if lat else None,
            "throughput_rps": round(len(lat) / seconds, 2),
            "info_probes": len(probe_lat.get("/info/", [])), "info_p50_s": _pct(probe_lat.get("/info/", []), 50),
            "info_p95_s": _pct(probe_lat.get("/info/", []), 95),
            "probes": {p: {"n": len(v), "p50_s": _pct(v, 50), "p95_s": _pct(v, 95)} for p, v in probe_lat.items()}}


phase = run_load  # the earlier name


if __name__ == "__main__":
    raise SystemExit(main())
