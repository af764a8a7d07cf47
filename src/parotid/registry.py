"""Versioned model registry and the promotion gate (issue 12).

Layout, per task, in the model dir (the one the server reads, ``--conf model_dir``)::

    <model_dir>/<task>.pt (+ .json)          the served checkpoint: what inference reads (hot reload by mtime)
    <model_dir>/registry/<task>/served.json  {"version": N, "sha256": ...}: which version is served
    <model_dir>/registry/<task>/v<N>/        <task>.pt, <task>.json (if any) and meta.json

``meta.json``: version, parent (the version served when it was made), created (UTC), sha256, source
(shipped / training / upload / found on start), data (study ids + count; held-out ids), metrics (the
candidate's and the served checkpoint's on the same held-out studies), config (training request),
status (promoted / rejected / rolled_back / superseded) and reason (plain words).

Every checkpoint a training produces gets the next number, whether it is promoted or rejected, so a
version number names one set of weights forever; the served version only moves on promotion, rollback
or upload. The checkpoint found in the model dir when a registry is first opened (the shipped one)
is version 1.

The gate (:func:`decide`): the candidate replaces the served checkpoint only if its metric on the
held-out studies (``parotid.cohort.split_holdout``) is not worse than the served one's by more than
the task's tolerance (:data:`GATES`), or if an admin forces it (``POST /train/<model>`` with
``"force": true``; that route needs the admin role). No served checkpoint: the candidate is promoted.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from filelock import FileLock

from parotid.checksums import cached_sha256, sha256_of

REGISTRY_DIR = "registry"
STATUSES = ("promoted", "rejected", "rolled_back", "superseded")


# --------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class Gate:
    """`metric` (higher is better) may drop by at most `tolerance`; `check` (lower is better, optional)
    may rise by at most `check_tolerance`. When `metric` is undefined on the held-out studies (e.g. one
    class only), `check` decides alone."""

    metric: str
    tolerance: float
    label: str
    check: str | None = None
    check_tolerance: float = 0.0
    check_label: str = ""

    def describe(self) -> str:
        s = f"{self.label} of the candidate >= served - {self.tolerance:g}"
        if self.check:
            s += f" and {self.check_label} <= served + {self.check_tolerance:g}"
        return s + " on the held-out studies"


GATES: dict[str, Gate] = {
    # macro one-vs-rest AUC (plain AUC for two classes) over the classes present with both outcomes in the
    # held-out studies; log-loss of the calibrated probabilities guards against a model whose ranking is
    # fine but whose probabilities are not (issue 12: temperature 20, every class ~0.25)
    "classification": Gate("auc", 0.02, "macro-AUC", "log_loss", 0.10, "log-loss"),
    # mean tumour Dice (whole-study model: on the study; box model: inside the tumour's box)
    "segmentation": Gate("dice_tumor", 0.02, "tumour Dice"),
}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def decide(gate: Gate, candidate: Mapping[str, Any], served: Mapping[str, Any] | None, force: bool = False) -> Decision:
    """Promote or reject `candidate` (metrics dict with `gate.metric`, `gate.check`, `n`) against `served`."""
    n = candidate.get("n")
    on = f"on {n} held-out studies" if n is not None else "on the held-out studies"
    if served is None:
        return Decision(True, "promoted: no checkpoint was served")
    words = []
    c, s = _num(candidate.get(gate.metric)), _num(served.get(gate.metric))
    ok_metric = None
    if c is not None and s is not None:
        ok_metric = c >= s - gate.tolerance
        words.append(f"{gate.label} {c:.3f} {'>=' if ok_metric else '<'} served {s:.3f} - {gate.tolerance:g}")
    ok_check = None
    if gate.check:
        cc, sc = _num(candidate.get(gate.check)), _num(served.get(gate.check))
        if cc is not None and sc is not None:
            ok_check = cc <= sc + gate.check_tolerance
            words.append(f"{gate.check_label} {cc:.3f} {'<=' if ok_check else '>'} served {sc:.3f} + {gate.check_tolerance:g}")
    if ok_metric is None and ok_check is None:
        ok, why = False, f"{gate.label} could not be computed {on}"
    else:
        ok, why = all(v is not False for v in (ok_metric, ok_check)), ", ".join(words) + f" {on}"
    if force:
        return Decision(True, f"promoted (forced by an admin; the gate alone would have {'promoted' if ok else 'rejected'}"
                              f" it: {why})")
    return Decision(ok, f"{'promoted' if ok else 'rejected'}: {why}")


# --------------------------------------------------------------------------- storage
def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _copy_atomic(src: str, dst: str) -> None:
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)  # a concurrent reader sees the old file or the new one, never half of one


@functools.lru_cache(maxsize=None)
def tracked_by_git(path: str) -> bool:
    """True when git tracks files in the folder `path` (the repository's apps/parotid/model): a running
    server never changes tracked checkpoints. A folder that merely lies inside some git work tree (an
    untracked copy, a home directory under version control) is writable. Outside any work tree git is not
    run; when git cannot answer (not installed, not a repository it may read) the folder counts as tracked."""
    p = os.path.abspath(path)
    top = p
    while not os.path.exists(os.path.join(top, ".git")):
        parent = os.path.dirname(top)
        if parent == top:
            return False
        top = parent
    try:
        out = subprocess.run(["git", "-C", top, "ls-files", "--", os.path.relpath(p, top)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return True
    return bool(out.strip())


def _stat_key(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class RegistryError(Exception):
    """A request the registry cannot satisfy (unknown version, read-only model dir): a 4xx."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelRegistry:
    """The versions of one task's checkpoint in `model_dir` (see the module docstring)."""

    _served_cache: dict[str, tuple[tuple, int]] = {}  # registry root -> (stat of served file + pointer, version)

    def __init__(self, model_dir: str, task: str, ext: str = ".pt"):
        self.model_dir, self.task = os.path.abspath(model_dir), task
        self.served_path = os.path.join(self.model_dir, task + ext)
        self.root = os.path.join(self.model_dir, REGISTRY_DIR, task)
        self.read_only = tracked_by_git(self.model_dir)
        self._lock: FileLock | None = None

    # ---- reading
    def _dir(self, version: int) -> str:
        return os.path.join(self.root, f"v{int(version)}")

    def checkpoint_path(self, version: int) -> str:
        return os.path.join(self._dir(version), os.path.basename(self.served_path))

    def meta(self, version: int) -> dict:
        path = os.path.join(self._dir(version), "meta.json")
        if not os.path.exists(path):
            raise RegistryError(404, f"model {self.task} has no version {version}; "
                                     f"known: {[m['version'] for m in self.versions()]}")
        with open(path) as f:
            return json.load(f)

    def _numbers(self) -> list[int]:
        if not os.path.isdir(self.root):
            return []
        return sorted(int(d[1:]) for d in os.listdir(self.root) if d[:1] == "v" and d[1:].isdigit())

    def versions(self) -> list[dict]:
        """meta.json of every version with one (oldest first); `served` marks the one served now."""
        served = self.served_version()
        out = []
        for n in self._numbers():
            p = os.path.join(self._dir(n), "meta.json")
            if os.path.exists(p):  # a version being written has none yet
                with open(p) as f:
                    out.append({**json.load(f), "served": n == served})
        return out

    def served_version(self) -> int | None:
        """The served file's version: the pointer if the file still has its checksum, else the newest version
        with the file's checksum, else None. A read-only model dir (a git checkout) serves the shipped files:
        version 1."""
        if not os.path.exists(self.served_path):
            return None
        if self.read_only and not os.path.isdir(self.root):
            return 1
        pointer = os.path.join(self.root, "served.json")
        # the answer read from the pointer holds while neither file changes (asked on every /info and result)
        key = (_stat_key(self.served_path), _stat_key(pointer))
        hit = self._served_cache.get(self.root)
        if hit and hit[0] == key:
            return hit[1]
        digest = cached_sha256(self.served_path)
        if os.path.exists(pointer):
            with open(pointer) as f:
                p = json.load(f)
            if p.get("sha256") == digest:
                self._served_cache[self.root] = (key, int(p["version"]))
                return int(p["version"])
        for n in reversed(self._numbers()):
            try:
                if self.meta(n).get("sha256") == digest:
                    return n
            except (RegistryError, ValueError):
                continue
        return None

    def last_candidate(self) -> dict | None:
        """meta.json of the newest version made by a training (promoted or not)."""
        for m in reversed(self.versions()):
            if m.get("source") == "training":
                return m
        return None

    # ---- writing
    def _require_writable(self) -> None:
        if self.read_only:
            raise RegistryError(409, f"the model dir {self.model_dir} is in a git checkout (the repository's tracked "
                                     "checkpoints), which a running server never rewrites; start the server with "
                                     "--conf model_dir DIR on a copy (scripts/serve.sh does)")

    def lock(self) -> FileLock:
        """One lock per registry object (re-entrant), across processes (the server and its training subprocess)."""
        if self._lock is None:
            os.makedirs(self.root, exist_ok=True)
            self._lock = FileLock(os.path.join(self.root, ".lock"), timeout=120)
        return self._lock

    def reserve(self) -> tuple[int, str]:
        """(version, checkpoint path) of a new, empty version folder (mkdir is atomic across processes)."""
        self._require_writable()
        os.makedirs(self.root, exist_ok=True)
        n = (self._numbers() or [0])[-1] + 1
        while True:
            try:
                os.mkdir(self._dir(n))
                return n, self.checkpoint_path(n)
            except FileExistsError:
                n += 1

    def write_meta(self, version: int, meta: dict) -> dict:
        path = self.checkpoint_path(version)
        meta = {"version": version, "task": self.task, "created": utc_now(), "sha256": sha256_of(path), **meta}
        meta["checkpoint"] = os.path.relpath(path, self.model_dir)
        _write_json(os.path.join(self._dir(version), "meta.json"), meta)
        return meta

    def set_status(self, version: int, status: str, reason: str | None = None) -> None:
        assert status in STATUSES, status
        m = self.meta(version)
        m["status"] = status
        if reason:
            m.setdefault("history", []).append({"at": utc_now(), "status": status, "reason": reason})
        _write_json(os.path.join(self._dir(version), "meta.json"), m)

    def _serve(self, version: int) -> None:
        """Copy version's files over the served ones (json first, then the checkpoint, each atomically)."""
        src = self.checkpoint_path(version)
        side = os.path.splitext(src)[0] + ".json"
        if os.path.exists(side):
            _copy_atomic(side, os.path.splitext(self.served_path)[0] + ".json")
        _copy_atomic(src, self.served_path)
        _write_json(os.path.join(self.root, "served.json"), {"version": version, "sha256": self.meta(version)["sha256"],
                                                             "since": utc_now()})

    def register_file(self, path: str, source: str, reason: str, sidecar: dict | None = None,
                      extra: dict | None = None, serve: bool = True) -> dict:
        """Copy checkpoint `path` in as a new version (status promoted) and, with `serve`, serve it."""
        self._require_writable()
        with self.lock():
            parent = self.served_version()
            n, dst = self.reserve()
            shutil.copyfile(path, dst)
            if sidecar is not None:
                _write_json(os.path.splitext(dst)[0] + ".json", sidecar)
            meta = self.write_meta(n, {"parent": parent, "source": source, "status": "promoted", "reason": reason,
                                       **(extra or {})})
            if serve and os.path.abspath(path) != self.served_path:
                self._serve(n)
            elif serve:
                _write_json(os.path.join(self.root, "served.json"), {"version": n, "sha256": meta["sha256"],
                                                                     "since": utc_now()})
            if serve and parent is not None and parent != n:
                self.set_status(parent, "superseded", f"version {n} served ({source})")
            return meta

    def sync_served(self, source: str = "found on start", sidecar: dict | None = None) -> int | None:
        """Register the served file if the registry does not know it (first start: the shipped checkpoint
        becomes version 1, nothing in the model dir is rewritten). Returns the served version."""
        if self.read_only or not os.path.exists(self.served_path):
            return self.served_version()
        with self.lock():
            v = self.served_version()
            if v is not None:
                return v
            first = not self._numbers()
            side_path = os.path.splitext(self.served_path)[0] + ".json"
            if sidecar is None and os.path.exists(side_path):
                with open(side_path) as f:
                    sidecar = json.load(f)
            meta = self.register_file(self.served_path, "shipped" if first else source,
                                      "the checkpoint in the model dir when the registry was first opened" if first
                                      else "a checkpoint the registry did not know was found in the model dir",
                                      sidecar=sidecar)
            return meta["version"]

    def promote(self, version: int, reason: str) -> None:
        self._require_writable()
        with self.lock():
            old = self.served_version()
            self._serve(version)
            self.set_status(version, "promoted", reason)
            if old is not None and old != version:
                self.set_status(old, "superseded", f"version {version} promoted")

    def rollback(self, version: int, reason: str = "rolled back by an admin") -> dict:
        """Serve `version` again (it must have been served before: promoted or superseded)."""
        self._require_writable()
        m = self.meta(version)
        if m.get("status") == "rejected":
            raise RegistryError(409, f"version {version} of {self.task} was rejected by the gate ({m.get('reason')}); "
                                     "only versions that were served can be rolled back to")
        if not os.path.exists(self.checkpoint_path(version)):
            raise RegistryError(410, f"version {version} of {self.task} has no checkpoint file any more")
        with self.lock():
            old = self.served_version()
            self._serve(version)
            self.set_status(version, "promoted", f"{reason} (was serving version {old})")
            if old is not None and old != version:
                self.set_status(old, "rolled_back", f"{reason}: version {version} served instead")
        return self.meta(version)


# --------------------------------------------------------------------------- a gated training
def gated_training(registry: ModelRegistry, gate: Gate, train: Callable[[str], dict],
                   score: Callable[[str], dict], force: bool = False, data: dict | None = None,
                   config: dict | None = None) -> dict:
    """Train a candidate into a new version, score it and the served checkpoint with `score(path)` on the
    same held-out studies, promote it if the gate (or `force`) says so. `train(path)` writes the
    checkpoint (+ optional sidecar json) at `path` and returns its training stats. Returns the
    candidate's meta.json (status, reason, metrics)."""
    registry.sync_served()
    parent = registry.served_version()
    version, path = registry.reserve()
    try:
        stats = train(path)
    except BaseException:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        raise
    cand = score(path)
    served = score(registry.served_path) if os.path.exists(registry.served_path) else None
    d = decide(gate, cand, served, force)
    meta = registry.write_meta(version, {
        "parent": parent, "source": "training", "status": "promoted" if d.promote else "rejected",
        "reason": d.reason, "forced": bool(force), "gate": gate.describe(),
        "metrics": {"candidate": cand, "served": served, "served_version": parent},
        "data": data or {}, "config": config or {}, "train_stats": stats})
    if d.promote:
        registry.promote(version, d.reason)
    return registry.meta(version)


def outcome_words(meta: Mapping[str, Any] | None) -> str | None:
    """One line for /info and GET /train/: what happened to the last candidate."""
    if not meta:
        return None
    return f"version {meta['version']} ({meta.get('created')}): {meta.get('reason')}"


def describe_versions(metas: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The list GET /model/versions/{name} answers (the training's own stats and config are in meta.json)."""
    keep = ("version", "parent", "created", "sha256", "source", "status", "reason", "served", "forced", "metrics",
            "data", "history")
    return [{k: m[k] for k in keep if k in m} for m in metas]
