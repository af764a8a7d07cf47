"""Scale-out load (issue 11 item 4): N classify clients for T seconds against
  --mode workers : one server with `--workers 1`, then one with `--workers W` (parotid.serve), same load;
  --mode nginx   : nginx + 2 replicas (deploy/nginx/start.sh); replica 1 is killed (SIGKILL) half-way.

    python benchmarks/bench_scale.py --mode workers --clients 16 --seconds 30 --workers 2
    python benchmarks/bench_scale.py --mode nginx --clients 16 --seconds 30

The load loop, figures and `/info` probe are bench_load.py's `phase` (bounded by the deadline and a
request timeout; loopback only). Reports errors, p50/p95, throughput, /info p95 per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_load import phase  # noqa: E402
from report import report  # noqa: E402  (benchmarks/report.py)
from conftest import SAMPLE, Server, copy_app, copy_studies  # noqa: E402


def boxes_of(url: str):
    objects = requests.get(url + "/datastore/?output=all", timeout=60).json()["objects"]
    return [(k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items())
            if "roi" in v["labels"].get("final", {}).get("info", {})]


def warm(url: str, model: str, boxes, n: int = 8) -> None:
    """Every worker/replica loads the checkpoint before timing (n requests, new connections)."""
    for sid, roi in boxes[:n]:
        requests.post(f"{url}/infer/{model}", params={"image": sid, "output": "json"},
                      data={"params": json.dumps({"roi": roi})}, timeout=300)


def run_workers(a) -> dict:
    out = {}
    for workers in (1, a.workers):
        tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        srv = Server(copy_studies(SAMPLE, tmp / "studies"), tmp / "server.log", app=copy_app(tmp / "app"),
                     models=a.model, workers=workers).start(timeout=600)
        try:
            from test_workers import served_by
            served_by(srv.url, workers)
            boxes = boxes_of(srv.url)
            warm(srv.url, a.model, boxes)
            out[f"workers_{workers}"] = phase(srv.url, a.model, boxes, a.clients, a.seconds)
        finally:
            srv.stop()
    return out


def run_nginx(a) -> dict:
    from test_replicas import Deployment

    d = Deployment(Path(tempfile.mkdtemp(prefix="bench-scale-nginx-")), models=a.model)
    try:
        boxes = boxes_of(d.url)
        warm(d.url, a.model, boxes)
        out = {"both_replicas": phase(d.url, a.model, boxes, a.clients, a.seconds / 2)}
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(phase(d.url, a.model, boxes, a.clients, a.seconds)))
        t.start()
        time.sleep(a.seconds / 2)
        d.kill_replica(1)
        t.join()
        out["replica_1_killed_half_way"] = result
    finally:
        d.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("workers", "nginx"), required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="classify_subtype")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    out = {"mode": a.mode, "model": a.model, "clients": a.clients, "seconds": a.seconds,
           "data": "synthetic sample studies, loopback", **(run_workers(a) if a.mode == "workers" else run_nginx(a))}
    report(out, a.json)
    return 0 if not any(v.get("errors") for v in out.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
