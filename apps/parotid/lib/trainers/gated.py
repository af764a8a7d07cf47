"""Base of the app's train tasks: every training writes a candidate into the model registry and the
promotion gate decides whether it replaces the served checkpoint (parotid.registry, docs/admin.md).

Subclasses implement ``describe(path)`` (the training stats embedded in a checkpoint file) and call
``run_gated(request, train_items, holdout_items, train, score)``. ``stats()`` (``/info`` ``train_stats``)
always describes the SERVED checkpoint, with its registry ``version``, and says in plain words what
happened to the last candidate (``last_candidate``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, Optional, Sequence

from monailabel.interfaces.tasks.train import TrainTask

from parotid.registry import GATES, ModelRegistry, gated_training, outcome_words

logger = logging.getLogger(__name__)


def parse_force(value: Any) -> bool:
    """The request's ``force`` (admin only: POST /train/<model> needs the admin role)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"force must be true or false, got {value!r}")


class GatedTrainTask(TrainTask):
    gate_kind = ""  # key of parotid.registry.GATES

    def __init__(self, description: str, name: str, path: str):
        super().__init__(description)
        self.name, self.path = name, path
        self._described: Dict[tuple, dict] = {}

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(os.path.dirname(self.path), self.name)

    @property
    def gate(self):
        return GATES[self.gate_kind]

    def info(self) -> Dict[str, Any]:
        return {**super().info(), "gate": self.gate.describe()}

    def describe(self, path: str) -> dict:
        """The training stats embedded in checkpoint `path` (what train_stats shows)."""
        raise NotImplementedError

    def sidecar(self, path: str) -> dict:
        """The `<model>.json` written next to checkpoint `path` (as the training writes it)."""
        raise NotImplementedError

    def served_description(self) -> Optional[dict]:
        """describe() of the served file, cached by its time stamp and size."""
        if not os.path.exists(self.path):
            return None
        st = os.stat(self.path)
        key = (st.st_mtime_ns, st.st_size)
        if key not in self._described:
            try:
                self._described = {key: self.describe(self.path)}
            except Exception as e:  # a foreign file: inference reports it on use
                self._described = {key: {"error": f"cannot read the served checkpoint: {type(e).__name__}"}}
        return self._described[key]

    def registry_stats(self) -> Dict[str, Any]:
        reg = self.registry
        last = reg.last_candidate()
        version = reg.served_version()
        out: Dict[str, Any] = {"version": version, "gate": self.gate.describe()}
        if version is not None and not reg.read_only:
            meta = reg.meta(version)
            out.update(version_source=meta.get("source"), version_created=meta.get("created"))
            if "n_holdout" in (meta.get("data") or {}):
                out["n_holdout"] = meta["data"]["n_holdout"]  # studies held out of its training (the gate's)
        if last:
            out["last_candidate"] = {k: last.get(k) for k in ("version", "created", "status", "reason", "forced")}
            out["last_candidate"]["summary"] = outcome_words(last)
            if last.get("metrics"):
                out["last_candidate"]["metrics"] = {k: last["metrics"].get(k) for k in ("candidate", "served")}
        return out

    def run_gated(self, request: Dict[str, Any], train_items: Sequence, holdout_items: Sequence,
                  train: Callable[[str], dict], score: Callable[[str], dict], config: Dict[str, Any]) -> Dict[str, Any]:
        force = parse_force(request.get("force"))
        data = {"n_train": len(train_items), "train_study_ids": [it.study_id for it in train_items],
                "n_holdout": len(holdout_items), "holdout_study_ids": [it.study_id for it in holdout_items]}
        # a RegistryError (e.g. a read-only model dir) is a 409 for `run_sync` (lib/errors.py), the message in the task log
        meta = gated_training(self.registry, self.gate, train, score, force=force, data=data, config=config)
        logger.info(f"{self.name}: candidate {outcome_words(meta)}")
        return {**(meta.get("train_stats") or {}), "version": meta["version"], "status": meta["status"],
                "reason": meta["reason"], "promoted": meta["status"] == "promoted"}
