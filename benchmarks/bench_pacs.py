"""Benchmark: study fetch + convert time from Orthanc (DICOMweb), cold vs cached.

    python benchmarks/bench_pacs.py [--cohort DIR | --n 3 --seed 7] [--repeats 3] [--json out.json]

Starts the loopback Orthanc of deploy/orthanc (random credentials), uploads the DICOM series of a
parotid-synth cohort (SYNTHETIC), then for each study times
  * cold:   ``get_image_uri`` with an empty cache (QIDO + WADO-RS of every series, SimpleITK conversion,
            assembly on the reference grid, study file write),
  * cached: ``get_image_uri`` again (QIDO series check + cache hit),
and the per-phase split of a cold fetch (WADO-RS download / DICOM->SimpleITK / assemble+write).

With --infer it also starts two real MONAI Label servers, one on the Orthanc DICOMweb URL and one on
the cohort's local study folder (the same SYNTHETIC studies), and times /infer/<model> per study:
the first request on the DICOMweb server (cache empty: fetch + convert + inference), then repeated
requests on both (study cached / local file). Run it on an otherwise idle machine; numbers depend
on CPU and disk.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from pathlib import Path

import pydicom
import requests

from parotid.pacs.convert import datasets_to_image
from parotid.pacs.datastore import ParotidDICOMwebDatastore
from parotid.pacs.orthanc import OrthancProcess
from parotid.study import assemble_study, write_study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Server, copy_app  # noqa: E402  (the same server harness as the tests)


def infer_latency(url: str, model: str, ids: list[str], repeats: int) -> tuple[list[float], list[float]]:
    """(first request per study, later requests) in seconds, /infer/<model> JSON output."""
    first, later = [], []
    for sid in ids:
        for r in range(1 + repeats):
            t0 = time.perf_counter()
            resp = requests.post(f"{url}/infer/{model}", params={"image": sid, "output": "json"}, timeout=600)
            dt = time.perf_counter() - t0
            if resp.status_code != 200:
                raise SystemExit(f"{model} on {sid}: HTTP {resp.status_code} {resp.text[:300]}")
            (first if r == 0 else later).append(dt)
    return first, later


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", help="existing parotid-synth folder with dicom/ (default: generate one)")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3, help="cold fetches per study (fresh cache each)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--infer", action="store_true", help="also time /infer on a DICOMweb vs a local server")
    ap.add_argument("--models", default="segmentation,classify_malignancy", help="models timed with --infer")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        cohort = a.cohort
        if not cohort:
            cohort = os.path.join(tmp, "cohort")
            exe = os.path.join(os.path.dirname(sys.executable), "parotid-synth")
            subprocess.run([exe, "--out", cohort, "--n", str(a.n), "--seed", str(a.seed), "--dicom", "--quiet"], check=True)
        studies = sorted(glob.glob(os.path.join(cohort, "dicom", "*")))
        with OrthancProcess(os.path.join(tmp, "orthanc")) as pacs:
            t0 = time.perf_counter()
            n_files = sum(pacs.upload_tree(d) for d in studies)
            upload_s = time.perf_counter() - t0
            mb = sum(os.path.getsize(p) for d in studies for p in glob.glob(os.path.join(d, "*", "*.dcm"))) / 1e6
            uids = [str(pydicom.dcmread(sorted(glob.glob(os.path.join(d, "*", "*.dcm")))[0], stop_before_pixels=True).StudyInstanceUID)
                    for d in studies]
            client = pacs.client()
            cold, warm, phases = [], [], []
            for r in range(a.repeats):
                ds = ParotidDICOMwebDatastore(client, os.path.join(tmp, f"cache{r}"), list_ttl=0)
                for uid in uids:
                    t0 = time.perf_counter()
                    ds.get_image_uri(uid)
                    cold.append(time.perf_counter() - t0)
                    for _ in range(3):
                        t0 = time.perf_counter()
                        ds.get_image_uri(uid)
                        warm.append(time.perf_counter() - t0)
            # phase split (one pass)
            ds = ParotidDICOMwebDatastore(client, os.path.join(tmp, "cache-phase"))
            for uid in uids:
                g = ds.grouping(uid)
                t_dl = t_cv = 0.0
                vols = {}
                for key, s in g.sequences.items():
                    t0 = time.perf_counter()
                    dsets = client.retrieve_series(uid, s.series_uid)
                    t_dl += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    vols[key] = datasets_to_image(dsets, key)
                    t_cv += time.perf_counter() - t0
                t0 = time.perf_counter()
                write_study(assemble_study(vols), os.path.join(tmp, "phase.nii.gz"))
                phases.append({"download_s": t_dl, "convert_s": t_cv, "assemble_write_s": time.perf_counter() - t0,
                               "series": len(g.sequences)})

            infer = {}
            if a.infer:
                local_ids = [os.path.basename(d) for d in studies]  # parotid-synth: dicom/<study id>/
                servers = {
                    "dicomweb": (Server(pacs.dicomweb_url, Path(tmp) / "srv-dicomweb.log", models=a.models,
                                        app=copy_app(Path(tmp) / "app-dicomweb"),
                                        env={**pacs.env(), "PAROTID_DICOMWEB_CACHE": os.path.join(tmp, "srv-cache")}),
                                 uids),
                    "local": (Server(cohort, Path(tmp) / "srv-local.log", models=a.models,
                                     app=copy_app(Path(tmp) / "app-local")), local_ids),
                }
                for where, (srv, ids) in servers.items():
                    srv.start(timeout=300)
                    try:
                        for model in a.models.split(","):
                            f, l = infer_latency(srv.url, model, ids, a.repeats)
                            infer[f"{model}@{where}"] = {"first_request": f, "later_requests": l}
                    finally:
                        srv.stop()

    def summ(v):
        return {"median_s": round(statistics.median(v), 4), "mean_s": round(statistics.mean(v), 4),
                "min_s": round(min(v), 4), "max_s": round(max(v), 4), "n": len(v)}

    res = {
        "data": f"SYNTHETIC parotid-synth cohort: {len(uids)} studies, {n_files} instances, {mb:.1f} MB DICOM",
        "upload_s": round(upload_s, 2),
        "cold_fetch_convert": summ(cold),
        "cached": summ(warm),
        "cold_phases_median": {k: round(statistics.median(p[k] for p in phases), 4)
                               for k in ("download_s", "convert_s", "assemble_write_s")},
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), {platform.python_version()}",
    }
    if infer:
        res["infer"] = {k: {"first_request": summ(v["first_request"]), "later_requests": summ(v["later_requests"])}
                        for k, v in infer.items()}
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
