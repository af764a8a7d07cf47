"""The classifier checkpoint format, read by inference and written by training.

A checkpoint is ``torch.save`` of plain data (``torch.load(weights_only=True)`` reads it, no pickled
code): ``config`` (the model's config: label set, classes, sequences, groups, fusion, crop size, slices,
temperature, uncertainty settings, calibration, training record, training spacing), ``state_dict``
(weights, floating point stored as float16) and ``input_check`` (the feature density of
parotid.input_check; absent in checkpoints from before the input check). ``<task>.json`` next to it
repeats the config for people.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .models import SequenceModel, branch_combiner

CONFIG, STATE_DICT, INPUT_CHECK = "config", "state_dict", "input_check"


def read_raw(path: str) -> dict[str, Any]:
    """The checkpoint's entries as stored (tensors and plain data only, no pickled code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with one fusion key. Checkpoints written before it (the shipped ones included;
    files are never rewritten) say ``"fusion"``: the branch combiner and ``"fusion_mode"``: the fusion, so
    an early-fusion one reads ``"fusion": "spl", "fusion_mode": "early"``."""
    cfg = dict(cfg)
    if "fusion_mode" in cfg:
        cfg["fusion"] = cfg.pop("fusion_mode")
    return cfg


def read_config(path: str) -> dict[str, Any]:
    """The checkpoint's config (one fusion key, normalise_config), without building the model."""
    return normalise_config(read_raw(path)[CONFIG])


def _write_atomic(ck: dict[str, Any], path: str) -> None:
    tmp = path + ".part"
    torch.save(ck, tmp)
    os.replace(tmp, path)  # atomic: the server reloads on mtime change


def save_checkpoint(path: str, model: SequenceModel, config: dict) -> None:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    ck = {CONFIG: config, STATE_DICT: sd}
    if getattr(model, "input_check", None):  # feature density of parotid.input_check (plain tensors)
        ck[INPUT_CHECK] = model.input_check
    _write_atomic(ck, path)


def model_from_config(cfg: dict[str, Any]) -> SequenceModel:
    """An untrained SequenceModel shaped as the config says (older checkpoints: no clinical inputs)."""
    nseq = [len(g) for g in cfg["groups"]]
    groups = [list(range(sum(nseq[:i]), sum(nseq[:i + 1]))) for i in range(len(nseq))]
    return SequenceModel(groups, len(cfg["classes"]), cfg["n_slices"], branch_combiner(cfg["fusion"]),
                         n_clinical=cfg.get("n_clinical", 0))


def load_checkpoint(path: str) -> tuple[SequenceModel, dict]:
    ck = read_raw(path)
    cfg = normalise_config(ck[CONFIG])
    model = model_from_config(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck[STATE_DICT].items()})
    model.eval()
    model.input_check = ck.get(INPUT_CHECK)  # None for checkpoints from before the input check
    return model, cfg


def stamp_input_check(path: str, block: dict[str, Any]) -> None:
    """Write the input check's feature density into a checkpoint; every other entry (weights, config, keys
    added by other tools) is kept as loaded, so the weights stay bit-identical."""
    ck = read_raw(path)
    ck[INPUT_CHECK] = block
    _write_atomic(ck, path)


def write_config(path: str, config: dict[str, Any], out: str | None = None) -> None:
    """Write `config` as the config of the checkpoint `path` (to `out`, default `path`); every other entry
    (weights, input check) is kept as loaded, so the weights stay bit-identical."""
    ck = read_raw(path)
    ck[CONFIG] = config
    if out and os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    _write_atomic(ck, out or path)
