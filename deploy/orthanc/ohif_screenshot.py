"""Screenshot MONAI Label's bundled OHIF viewer on studies served from the loopback Orthanc.

    python deploy/orthanc/ohif_screenshot.py --cohort DIR --out docs/img

Starts Orthanc (deploy/orthanc/start.sh), uploads DIR/dicom/* (a parotid-synth cohort: SYNTHETIC),
starts `monailabel start_server --app apps/parotid --studies <orthanc>/dicom-web` (auth off; OHIF reaches
Orthanc through MONAI Label's /proxy/dicom with MONAI_LABEL_DICOMWEB_USERNAME/PASSWORD), then takes
headless Chromium screenshots of the study list and the viewer. Stops everything it started.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pydicom
import requests

from parotid.pacs.orthanc import OrthancProcess

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shot(url: str, path: str, budget_ms: int, size: str = "1400,900") -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not installed (WITH_CHROMIUM=1 deploy/orthanc/install.sh)")
    with tempfile.TemporaryDirectory() as prof:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-dev-shm-usage", f"--user-data-dir={prof}", f"--window-size={size}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                       check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    ap.add_argument("--budget-ms", type=int, default=20000)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ohif-") as tmp, OrthancProcess(os.path.join(tmp, "orthanc")) as pacs:
        studies = sorted(glob.glob(os.path.join(a.cohort, "dicom", "*")))
        for d in studies:
            pacs.upload_tree(d)
        uid = str(pydicom.dcmread(sorted(glob.glob(os.path.join(studies[0], "*", "*.dcm")))[0],
                                  stop_before_pixels=True).StudyInstanceUID)
        port = free_port()
        env = {**os.environ, **pacs.env(), "PAROTID_DICOMWEB_CACHE": os.path.join(tmp, "cache"),
               "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
        log = open(os.path.join(tmp, "server.log"), "wb")
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "monailabel"), "start_server",
                                 "--app", os.path.join(ROOT, "apps", "parotid"), "--studies", pacs.dicomweb_url,
                                 "--conf", "models", "segmentation", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(240):
                try:
                    if requests.get(base + "/info/", timeout=5).ok:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit("server exited: " + open(os.path.join(tmp, "server.log")).read()[-2000:])
                time.sleep(1)
            r = requests.get(base + "/proxy/dicom/qido/studies", timeout=30)
            print("proxy QIDO:", r.status_code, len(r.json()) if r.ok else r.text[:200])
            shot(base + "/ohif/", os.path.join(a.out, "ohif_study_list.png"), a.budget_ms)
            shot(f"{base}/ohif/viewer?StudyInstanceUIDs={uid}", os.path.join(a.out, "ohif_viewer.png"), a.budget_ms)
            print("screenshots in", a.out)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
