"""Open untrusted image files where a native crash is contained.

ITK's readers are C++: a crafted file can corrupt the heap and abort the process that reads it (seen:
a complex64 NIfTI-1 with intent code 1007 "vector", which nibabel reads without complaint, makes
``SimpleITK.ReadImage`` abort with "malloc(): invalid size"). Inside the server that killed every
user's session with nothing in the log. Every file that arrives from outside (study / label / session
uploads, PACS downloads) is therefore first read in a child process:

* before the child: the file's size and (NIfTI, parsed by nibabel in pure Python) its voxel count are
  checked against limits;
* the child (``python -m parotid.safe_read``) sets RLIMIT_AS (address space) and RLIMIT_CORE, reads
  the file with the same functions the server uses (``parotid.study.read_study`` / ``read_volume``,
  ``parotid.pacs.convert.read_dicom_folder``) and prints a JSON verdict;
* a signal, a limit or a timeout becomes a ``StudyError`` (HTTP 422) naming what happened.

The parent reads the file itself afterwards: the readers are deterministic, so a file the child read
completely does not crash the parent. DICOM is converted in the child and handed back as a NIfTI file
written by ITK. Limits (environment): PAROTID_MAX_UPLOAD_MB (default 2048), PAROTID_MAX_VOXELS
(default 2**28 values incl. components), PAROTID_READER_MEMORY_MB (default 4096), PAROTID_READER_TIMEOUT_S
(default 300).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

from parotid.study import NIFTI_EXT, StudyError

KINDS = ("study", "volume", "dicom")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child imports this parotid


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_voxels: int
    memory_bytes: int
    timeout_s: float

    @classmethod
    def from_env(cls) -> "Limits":
        env = os.environ.get
        return cls(
            max_file_bytes=int(float(env("PAROTID_MAX_UPLOAD_MB", 2048)) * 2**20),
            max_voxels=int(float(env("PAROTID_MAX_VOXELS", 2**28))),
            memory_bytes=int(float(env("PAROTID_READER_MEMORY_MB", 4096)) * 2**20),
            timeout_s=float(env("PAROTID_READER_TIMEOUT_S", 300)),
        )


def _precheck(path: str, name: str, limits: Limits) -> None:
    """Size and voxel-count limits, decided without reading the payload."""
    if os.path.isdir(path):
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    else:
        total = os.path.getsize(path)
    if total > limits.max_file_bytes:
        raise StudyError(f"{name}: {total / 2**20:.0f} MB is more than the server accepts "
                         f"({limits.max_file_bytes / 2**20:.0f} MB)")
    if os.path.isfile(path) and path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib  # pure Python header parsing: safe in-process
        import numpy as np

        try:
            shape = nib.load(path).shape
        except Exception:  # noqa: BLE001 - the child reports unreadable files with the reader's words
            return
        n = int(np.prod([int(v) for v in shape], dtype=np.float64))
        if n > limits.max_voxels:
            raise StudyError(f"{name}: image of size {list(shape)} ({n:,} values) is larger than the server "
                             f"accepts ({limits.max_voxels:,})")


def check_file(path: str, kind: str = "study", name: str = "upload", out: str | None = None,
               limits: Limits | None = None, key: str | None = None) -> dict:
    """Read `path` as `kind` in a contained child process; return its summary or raise StudyError.

    kind "study": a study file (``read_study``); "volume": one image / label map (``read_volume``);
    "dicom": a folder of DICOM files, converted and written to `out` (a .nii.gz path)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    limits = limits or Limits.from_env()
    if not os.path.exists(path):
        raise StudyError(f"{name}: file not found: {os.path.basename(path)}")
    if kind != "dicom" and not path.lower().endswith(NIFTI_EXT):
        # MetaImage/NRRD headers can point the reader at other files on the server (ElementDataFile)
        raise StudyError(f"{name}: uploads must be NIfTI (.nii.gz or .nii, NIfTI-1 or NIfTI-2); convert other "
                         "formats and DICOM with the `parotid-import` command")
    _precheck(path, name, limits)
    req = {"kind": kind, "path": os.path.abspath(path), "name": name, "memory": limits.memory_bytes,
           "timeout": limits.timeout_s, "out": out or "", "key": key}
    verdict = _WORKER.request(req, limits.timeout_s)
    if "signal" in verdict:
        num = int(verdict["signal"])
        if num == signal.SIGALRM:
            raise StudyError(f"{name}: reading the file took longer than {limits.timeout_s:.0f} s; refused")
        sig = signal.Signals(num).name if num in signal.Signals._value2member_map_ else num
        raise StudyError(f"{name}: the file crashed the image reader ({sig}); it is not a valid image — "
                         "check how it was written, or re-make it with the `parotid-import` command")
    if "error" in verdict:
        raise StudyError(verdict["error"])
    return verdict


class _Worker:
    """One long-lived reader process (``python -m parotid.safe_read``, single-threaded, modules preloaded)
    that forks a fresh child per file: a fork costs milliseconds where a new interpreter importing
    SimpleITK and nibabel costs seconds. Requests are serialised; a dead worker is restarted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
        return subprocess.Popen([sys.executable, "-m", "parotid.safe_read"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def request(self, req: dict, timeout_s: float) -> dict:
        with self._lock:
            for _ in range(2):  # a worker that died between requests is restarted once
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                proc = self._proc
                ready: list = [proc.stdout]
                try:
                    proc.stdin.write(json.dumps(req) + "\n")
                    proc.stdin.flush()
                    ready, _, _ = select.select([proc.stdout], [], [], timeout_s + 60)  # + worker start-up
                    line = proc.stdout.readline() if ready else ""
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    return json.loads(line)
                proc.kill()  # hung or dead worker: replace it
                proc.wait()
                self._proc = None
                if not ready:
                    return {"signal": int(signal.SIGALRM)}
            return {"error": f"{req['name']}: the image reader process failed; try again"}


_WORKER = _Worker()


def read_dicom_folder(folder: str, name: str = "series", key: str | None = None):
    """Convert a folder of (untrusted) DICOM files in the child; return the SimpleITK image."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="parotid-safe-") as tmp:
        out = os.path.join(tmp, "series.nii.gz")
        v = check_file(folder, "dicom", name, out=out, key=key)
        img = sitk.ReadImage(out)
    img.SetOrigin(v["origin"])  # NIfTI stores geometry as float32: the exact values come in the verdict
    img.SetSpacing(v["spacing"])
    img.SetDirection(v["direction"])
    return img


# ---------------------------------------------------------------------- child
def _child(kind: str, path: str, name: str, memory_bytes: int, out: str, key: str | None = None) -> dict:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        if kind == "study":
            from parotid.study import read_study

            s = read_study(path, name)
            return {"ok": True, "sequences": list(s.sequences), "shape": list(s.shape)}
        if kind == "volume":
            from parotid.study import read_volume

            img = read_volume(path, name)
            return {"ok": True, "size": list(img.GetSize()), "components": img.GetNumberOfComponentsPerPixel()}
        import SimpleITK as sitk

        from parotid.pacs.convert import read_dicom_folder as convert

        img = convert(path, name, key=key)
        sitk.WriteImage(img, out, useCompression=True)
        return {"ok": True, "size": list(img.GetSize()), "origin": list(img.GetOrigin()),
                "spacing": list(img.GetSpacing()), "direction": list(img.GetDirection())}
    except StudyError as e:
        return {"error": str(e)}
    except MemoryError:
        return {"error": f"{name}: the image needs more memory than the server allows for one file "
                         f"({memory_bytes / 2**20:.0f} MB)"}
    except RuntimeError as e:  # ITK: "Failed to allocate memory for image", or another reader failure
        from parotid.study import scrub_paths

        text = str(e)
        if "allocate" in text.lower():
            return {"error": f"{name}: the image needs more memory than the server allows for one file "
                             f"({memory_bytes / 2**20:.0f} MB)"}
        last = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return {"error": f"{name}: corrupt or unreadable image ({scrub_paths(last[-1] if last else 'error', path)[:200]})"}


def _serve() -> None:
    """Worker loop: one JSON request per stdin line, one JSON verdict per stdout line. Each file is read in
    a forked child (limits set there); the worker only reports how the child ended."""
    import parotid.pacs.convert  # noqa: F401 - preload what the children use (SimpleITK, nibabel, pydicom)
    import parotid.study  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: read the file, write the verdict, never return into the loop
            os.close(r)
            try:
                signal.alarm(max(1, int(req["timeout"])))
                verdict = _child(req["kind"], req["path"], req["name"], int(req["memory"]), req["out"], req.get("key"))
            except BaseException as e:  # noqa: BLE001 - any Python-level failure is a verdict too
                verdict = {"error": f"{req['name']}: the image reader failed ({type(e).__name__})"}
            os.write(w, json.dumps(verdict).encode())
            os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            out = {"signal": os.WTERMSIG(status)}
        elif chunks:
            out = json.loads(b"".join(chunks))
        else:
            out = {"error": f"{req['name']}: the image reader exited with status {os.WEXITSTATUS(status)}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
