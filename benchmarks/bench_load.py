"""Load: N concurrent classify clients for T seconds, optionally while a training runs (loopback only, bounded).

    python benchmarks/bench_load.py --clients 20 --seconds 60              # while a training runs
    python benchmarks/bench_load.py --compare --clients 16 --seconds 30 --no-train   # issue 11: 1 vs 16

Starts a real server over a temporary copy of the sample studies, optionally starts a segmentation
training (`/train/segmentation`, long enough to overlap the run), then N threads send /infer/classify_*
requests with each study's box for T seconds while one more thread probes `GET /info/` (every 0.2 s).
With --compare a 1-client phase runs first, in the same server, and the throughput ratio is reported.
Reports errors (any non-200 or exception), latency p50/p95/max, throughput and the /info p95.
Every request loop is bounded by the deadline and a request timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
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
    out = {"model": a.model, "seconds": a.seconds, "data": "synthetic sample studies, loopback"}
    try:
        objects = requests.get(srv.url + "/datastore/?output=all", timeout=30).json()["objects"]
        boxes = [(k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items()) if "final" in v["labels"]]
        requests.post(f"{srv.url}/infer/{a.model}", params={"image": boxes[0][0], "output": "json"},
                      data={"params": json.dumps({"roi": boxes[0][1]})}, timeout=300)  # warm-up: checkpoint load
        if not a.no_train:
            r = requests.post(f"{srv.url}/train/segmentation", json={"iterations": a.train_iterations}, timeout=30)
            out["training_started"] = r.status_code == 200
        if a.compare:
            out["one_client"] = phase(srv.url, a.model, boxes, 1, a.seconds)
        out["many_clients"] = phase(srv.url, a.model, boxes, a.clients, a.seconds)
        if a.compare:
            out["throughput_ratio"] = round(out["many_clients"]["throughput_rps"] / out["one_client"]["throughput_rps"], 2)
        if not a.no_train:
            out["training_status_at_end"] = requests.get(srv.url + "/train/", timeout=30).json().get("status")
    finally:
        srv.stop()
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0 if not out["many_clients"]["errors"] else 1


def _pct(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def phase(url: str, model: str, boxes, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    info: list[float] = []
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
            t0 = time.perf_counter()
            try:
                ok = requests.get(f"{url}/info/", timeout=60).ok
            except requests.RequestException:
                ok = False
            (info.append(time.perf_counter() - t0) if ok else errors.append("GET /info/ failed"))
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)] + [threading.Thread(target=prober)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return {"clients": clients, "requests_ok": len(lat), "errors": len(errors), "error_samples": errors[:5],
            "p50_s": _pct(lat, 50), "p95_s": _pct(lat, 95), "max_s": round(max(lat), 3) if lat else None,
            "throughput_rps": round(len(lat) / seconds, 2), "info_probes": len(info), "info_p50_s": _pct(info, 50),
            "info_p95_s": _pct(info, 95)}


if __name__ == "__main__":
    raise SystemExit(main())
