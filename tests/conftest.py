"""Shared fixtures: a real MONAI Label server on loopback over a copy of a study folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "apps" / "parotid"
SAMPLE = ROOT / "sample-data" / "studies"
BIN = Path(sys.executable).parent  # the venv's bin: `monailabel` runs `python -m monailabel.main`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A first port p such that p .. p+n-1 are free now (deploy/nginx/start.sh numbers replicas from it)."""
    for _ in range(100):
        first = free_port()
        try:
            with contextlib.ExitStack() as stack:
                for p in range(first, first + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


class Server:
    """`monailabel start_server` as a subprocess; `url` is its loopback base URL. It is ready when
    `ready_path` answers 200."""

    ready_path = "/info/"

    def __init__(self, studies: str | Path, log: Path, models: str = "all", env: dict | None = None,
                 app: str | Path = APP, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.studies = str(studies)
        self.models = models
        self.app = str(app)
        self.workers = workers
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "Server":
        # several workers: MONAI Label's command with a worker health check that survives the start (parotid.serve)
        launcher = [str(BIN / "monailabel")] if self.workers == 1 else [sys.executable, "-m", "parotid.serve"]
        cmd = [*launcher, "start_server", "--app", self.app, "--studies", self.studies,
               "--conf", "models", self.models, "--host", "127.0.0.1", "--port", str(self.port),
               "--uvicorn_app", "parotid.asgi:app"]  # the app's HTTP layer installed before start
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early; log: {self.log_path}\n{self.log_tail()}")
            try:
                if requests.get(self.url + self.ready_path, timeout=5).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s\n{self.log_tail()}")

    def alive(self) -> bool:
        return requests.get(self.url + "/info/", timeout=30).ok

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self, sig: int = 15) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(30)
        if getattr(self, "_log", None):
            self._log.close()


def infer(server, model, image="", params=None, files=None, output="json"):
    """POST /infer/{model} on a study id (or an uploaded file), JSON params as MONAI Label's form field."""
    q = {"image": image} if image else {}
    if output:
        q["output"] = output
    return requests.post(f"{server.url}/infer/{model}", params=q, data={"params": json.dumps(params or {})},
                         files=files, timeout=300)


def copy_studies(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "raw", "dicom"))
    return dst


def private_server(root: Path, **kwargs) -> Server:
    """A started server over its OWN copies of the sample studies and the app, for tests that change
    them (training, uploads, fuzzing); the caller stops it."""
    return Server(copy_studies(SAMPLE, root / "studies"), root / "server.log", app=copy_app(root / "app"),
                  **kwargs).start()


@pytest.fixture(scope="session")
def studies_copy(tmp_path_factory) -> Path:
    """A private copy of the shipped sample studies (the server writes labels and its index)."""
    assert (SAMPLE / "datastore_v2.json").exists(), "sample-data/studies is missing; see sample-data/README.md"
    return copy_studies(SAMPLE, tmp_path_factory.mktemp("studies") / "studies")


def copy_app(dst: Path) -> Path:
    """A private copy of the app (training replaces checkpoints in <app>/model; logs go to <app>/logs)."""
    shutil.copytree(APP, dst, ignore=shutil.ignore_patterns("logs", "__pycache__", "*.tmp"))
    return dst


@pytest.fixture(scope="session")
def app_copy(tmp_path_factory) -> Path:
    return copy_app(tmp_path_factory.mktemp("app") / "parotid")


@pytest.fixture(scope="session")
def server(studies_copy, app_copy, tmp_path_factory):
    srv = Server(studies_copy, tmp_path_factory.mktemp("logs") / "server.log", app=app_copy).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def sample_ids(server) -> list[str]:
    """The shipped sample studies (all labelled), whatever other tests uploaded to the server since."""
    with open(SAMPLE / "datastore_v2.json") as f:
        return sorted(json.load(f)["objects"])


# --------------------------------------------------------------------------- small shared helpers
def rotation(ax, ay, az):
    """Rotation matrix ``Rz @ Ry @ Rx`` from angles in radians."""
    import math

    import numpy as np

    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def sr_series(pacs, uid: str) -> dict[str, int]:
    """SR series of study `uid` on the PACS: SeriesInstanceUID -> number of instances."""
    import pydicom

    out = {}
    for s in pacs.client().search_for_series(uid, search_filters={"Modality": "SR"},
                                             fields=["NumberOfSeriesRelatedInstances"]):
        d = pydicom.Dataset.from_json(s)
        out[str(d.SeriesInstanceUID)] = int(d.get("NumberOfSeriesRelatedInstances", 0) or 0)
    return out


@pytest.fixture(scope="module")
def brain_study(tmp_path_factory) -> tuple[bytes, list[int]]:
    """nibabel's anatomical.nii (a real brain T1, a file no one here wrote) imported as T2, CE-T1, DWI b1000 and
    ADC (issue 9's report), as parotid-import builds it; and a central box of the image."""
    import nibabel as nib

    from parotid.study import assemble_study, read_volume, write_study

    path = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    vol = read_volume(path, "T2")
    study = assemble_study({k: vol for k in ("T2", "CET1", "DWI_B1000", "ADC")})
    out = tmp_path_factory.mktemp("real") / "anatomical_study.nii.gz"
    write_study(study, str(out))
    roi = [v for n in study.shape for v in (n // 3, n // 3 + max(4, n // 3))]
    return out.read_bytes(), roi
