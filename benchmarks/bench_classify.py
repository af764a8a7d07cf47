"""Classification latency over HTTP, the extra cost of Grad-CAM, and the ratio to a reference CNN pass.

    python benchmarks/bench_classify.py --n 9

Measures, in one run on the same machine (issue 4's targets):
- p50 of `/infer/classify_subtype` with the box of each sample study, JSON + heatmap NIfTI (the
  radiologist's request) and with `no_heatmap` (JSON only): target p50 <= 0.5 s, Grad-CAM extra <= 0.5 s;
- one forward pass of torchvision ResNet-18 conv1..layer2 over 60 whole 224x224 slices (3 channels),
  in-process, 2 threads — the cost of NOT cropping to the box; target ratio classify / reference <= 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import report  # noqa: E402  (benchmarks/report.py)
from conftest import SAMPLE, Server, copy_app, copy_studies  # noqa: E402


def reference_pass(repeats: int = 5) -> float:
    net = torchvision.models.resnet18(weights=None)
    trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2).eval()
    x = torch.randn(60, 3, 224, 224)
    with torch.no_grad():
        trunk(x)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            trunk(x)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=9)
    ap.add_argument("--model", default="classify_subtype")
    ap.add_argument("--json", help="write the figures to this file")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cls-"))
    srv = Server(copy_studies(SAMPLE, tmp / "studies"), tmp / "server.log", app=copy_app(tmp / "app")).start()
    try:
        objects = requests.get(srv.url + "/datastore/?output=all", timeout=30).json()["objects"]
        boxes = [(k, v["labels"]["final"]["info"]["roi"]) for k, v in sorted(objects.items()) if "final" in v["labels"]]

        def run(i: int, heatmap: bool) -> float:
            sid, roi = boxes[i % len(boxes)]
            params = {"roi": roi} if heatmap else {"roi": roi, "no_heatmap": True}
            t0 = time.perf_counter()
            r = requests.post(f"{srv.url}/infer/{a.model}", params={"image": sid, "output": "all" if heatmap else "json"},
                              data={"params": json.dumps(params)}, timeout=120)
            dt = time.perf_counter() - t0
            r.raise_for_status()
            return dt

        run(0, True)  # warm-up: checkpoint load
        with_map = [run(i, True) for i in range(a.n)]
        json_only = [run(i, False) for i in range(a.n)]
    finally:
        srv.stop()
    ref = reference_pass()
    p50_map, p50_json = float(np.median(with_map)), float(np.median(json_only))
    out = {"model": a.model, "n": a.n, "p50_with_heatmap_s": round(p50_map, 3), "p50_json_only_s": round(p50_json, 3),
           "gradcam_extra_s": round(p50_map - p50_json, 3), "reference_resnet18_layer2_60x224_s": round(ref, 3),
           "ratio_classify_to_reference": round(p50_map / ref, 3)}
    report(out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
