"""Start/stop the loopback Orthanc of ``deploy/orthanc`` (for tests, benchmarks and demos).

    with OrthancProcess(workdir) as pacs:      # credentials: PAROTID_ORTHANC_USER/_PASSWORD or random
        pacs.upload_files(paths)               # POST /instances (Orthanc REST)
        client = pacs.client()                 # DICOMweb client on pacs.dicomweb_url

Credentials are taken from the environment; when absent a random pair is generated for this process
(never logged). ``deploy/orthanc/start.sh`` does the actual start, so CI and tests run the same code.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from typing import Iterable

import requests

from parotid.pacs.client import make_client


def deploy_dir() -> str:
    env = os.environ.get("PAROTID_ORTHANC_DEPLOY")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for up in range(1, 6):
        cand = os.path.join(here, *([".."] * up), "deploy", "orthanc")
        if os.path.isfile(os.path.join(cand, "start.sh")):
            return os.path.realpath(cand)
    raise FileNotFoundError("deploy/orthanc/start.sh not found; set PAROTID_ORTHANC_DEPLOY")


def orthanc_available() -> bool:
    return shutil.which("Orthanc") is not None and os.path.exists("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancProcess:
    def __init__(self, workdir: str, user: str | None = None, password: str | None = None):
        self.workdir = workdir
        self.user = user or os.environ.get("PAROTID_ORTHANC_USER") or "parotid-" + secrets.token_hex(4)
        self.password = password or os.environ.get("PAROTID_ORTHANC_PASSWORD") or secrets.token_urlsafe(16)
        self.url = ""
        self.dicomweb_url = ""
        self.pid: int | None = None

    def start(self) -> "OrthancProcess":
        env = dict(os.environ, PAROTID_ORTHANC_USER=self.user, PAROTID_ORTHANC_PASSWORD=self.password)
        subprocess.run(["bash", os.path.join(deploy_dir(), "start.sh"), self.workdir], env=env, check=True,
                       stdout=subprocess.PIPE, timeout=60)
        vals = {}
        with open(os.path.join(self.workdir, "orthanc.env")) as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                vals[k] = v
        self.url, self.dicomweb_url = vals["PAROTID_ORTHANC_URL"], vals["PAROTID_ORTHANC_DICOMWEB"]
        self.pid = int(vals["PAROTID_ORTHANC_PID"])
        return self

    def stop(self) -> None:
        subprocess.run(["bash", os.path.join(deploy_dir(), "stop.sh"), self.workdir], check=False, timeout=30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def env(self) -> dict:
        """Environment for a MONAI Label server using this PACS (the DICOMWEB_* names also serve MONAI
        Label's /proxy/dicom, which the bundled OHIF viewer uses)."""
        return {"MONAI_LABEL_DATASTORE_USERNAME": self.user, "MONAI_LABEL_DATASTORE_PASSWORD": self.password,
                "MONAI_LABEL_DICOMWEB_USERNAME": self.user, "MONAI_LABEL_DICOMWEB_PASSWORD": self.password}

    def client(self):
        return make_client(self.dicomweb_url, self.user, self.password)

    def upload_files(self, paths: Iterable[str]) -> int:
        """POST each DICOM file to /instances; returns the number stored."""
        n = 0
        with requests.Session() as s:
            s.auth = self.auth
            for p in paths:
                with open(p, "rb") as f:
                    r = s.post(f"{self.url}/instances", data=f.read(), headers={"Content-Type": "application/dicom"}, timeout=60)
                r.raise_for_status()
                n += 1
        return n

    def upload_tree(self, root: str) -> int:
        paths = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in sorted(fs) if f.endswith(".dcm")]
        return self.upload_files(sorted(paths))
