"""Added latency of reading uploads in a contained child (parotid.safe_read) vs reading them in-process.

    python benchmarks/bench_safe_read.py [--n 10]

For each bundled SYNTHETIC sample study: median wall time of ``read_study`` in-process and of
``safe_read.check_file(kind="study")`` (fork of the warm reader process + full read in the child), after
one warm-up call that starts the reader process (its start-up time is reported separately).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

from parotid import safe_read
from parotid.study import read_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(ROOT, "sample-data", "studies", "*.nii.gz")))
    t0 = time.perf_counter()
    safe_read.check_file(files[0], "study", "warm-up")
    print(f"reader process start-up + first read: {time.perf_counter() - t0:.3f} s")
    inproc, child = [], []
    for _ in range(a.n):
        for f in files:
            t = time.perf_counter()
            read_study(f)
            inproc.append(time.perf_counter() - t)
            t = time.perf_counter()
            safe_read.check_file(f, "study", "bench")
            child.append(time.perf_counter() - t)
    mi, mc = statistics.median(inproc), statistics.median(child)
    print(f"{len(files)} studies x {a.n}: in-process read_study median {mi * 1000:.0f} ms; "
          f"contained check median {mc * 1000:.0f} ms (p90 {sorted(child)[int(0.9 * len(child))] * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
