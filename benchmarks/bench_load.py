"""Load: N concurrent classify clients for T seconds while a training runs (loopback only, bounded).

    python benchmarks/bench_load.py --clients 20 --seconds 60

Starts a real server over a temporary copy of the sample studies, starts a segmentation training
(`/train/segmentation`, long enough to overlap the run), then N threads send /infer/classify_*
requests with each study's box for T seconds. Reports errors (any non-200 or exception), latency
p50/p95/max and throughput. Every request loop is bounded by the deadline and a request timeout.
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
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    srv = Server(copy_studies(SAMPLE, tmp / "studies"), tmp / "server.log", app=copy_app(tmp / "app")).start()
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        objects = requests.get(srv.url + "/datastore/?output=all", timeout=30).json()["objects"]
        boxes = [(k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items()) if "final" in v["labels"]]
        r = requests.post(f"{srv.url}/train/segmentation", json={"iterations": a.train_iterations}, timeout=30)
        training_started = r.status_code == 200
        deadline = time.time() + a.seconds

        def client(i: int):
            n = i
            while time.time() < deadline:
                sid, roi = boxes[n % len(boxes)]
                n += a.clients
                t0 = time.perf_counter()
                try:
                    resp = requests.post(f"{srv.url}/infer/{a.model}", params={"image": sid, "output": "json"},
                                         data={"params": json.dumps({"roi": roi})}, timeout=300)
                    ok = resp.status_code == 200
                    msg = f"{resp.status_code} {resp.text[:100]}"
                except requests.RequestException as e:
                    ok, msg = False, repr(e)
                with lock:
                    (lat.append(time.perf_counter() - t0) if ok else errors.append(msg))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        train = requests.get(srv.url + "/train/", timeout=30).json()
    finally:
        srv.stop()
    out = {
        "clients": a.clients, "seconds": a.seconds, "model": a.model, "requests_ok": len(lat), "errors": len(errors),
        "error_samples": errors[:5], "p50_s": round(float(np.median(lat)), 3) if lat else None,
        "p95_s": round(float(np.percentile(lat, 95)), 3) if lat else None, "max_s": round(max(lat), 3) if lat else None,
        "throughput_rps": round(len(lat) / a.seconds, 2), "training_started": training_started,
        "training_status_at_end": train.get("status"),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
