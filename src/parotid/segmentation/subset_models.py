"""One segmentation checkpoint file, one set of weights per kind of study (issue 15).

A whole-study segmentation checkpoint holds the weights for COMPLETE studies (every input sequence
present) under ``model``, as every checkpoint always has, and may hold a second set under
``subset_models["incomplete"]``: weights trained with sequence dropout (parotid.segmentation.sequence_dropout)
that serve a study lacking any optional sequence (no CE-T1, no DWI/ADC, T2 only, ...). The study's
sequences choose the weights at request time (``parotid.segmentation.checkpoint.load_segmentation`` loads
every part, ``SegCheckpoint.network_for`` picks one); a file without ``subset_models`` serves ``model`` to
every study, as before. Each part records its own architecture (``network``, parotid.segmentation.networks:
the complete part may be FULL_RES while the incomplete one is HALF_RES). Both parts share the spec, the input
sequences and the training spacing, so the
registry, hot reload, PUT /model and the SHA-256-stamped subsets table keep treating the file as one
model.

Why two sets (measured, SYNTHETIC, docs/model-card-segmentation.md): one network trained with sequence
dropout gains on incomplete studies (T2 only: gland Dice 0.00 -> 0.75) but lost ~0.01 tumour Dice on
complete ones, below the full-sequence quality bar; two sets keep the full-sequence weights unchanged.

    python -m parotid.segmentation.subset_models combine --complete c.pt --incomplete f.pt --out apps/parotid/model/segmentation.pt
    python -m parotid.segmentation.subset_models extract --part incomplete --file apps/parotid/model/segmentation.pt --out f.pt
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import torch

from parotid.model_space import SPACING_KEY, checkpoint_spacing
from parotid.segmentation.networks import NETWORK_KEY, SPECS, SegModelSpec, build_network, network_shape

COMPLETE, INCOMPLETE = "complete", "incomplete"
SUBSET_MODELS = "subset_models"


def part_for(ck: dict, spec: SegModelSpec, sequences: Sequence[str]) -> str:
    """The weights serving a study with `sequences`: INCOMPLETE when it lacks one of the model's input
    sequences and the file has incomplete-study weights, else COMPLETE."""
    complete = all(s in sequences for s in spec.sequences)
    return INCOMPLETE if not complete and INCOMPLETE in (ck.get(SUBSET_MODELS) or {}) else COMPLETE


def state_dict_of(ck: dict, part: str) -> dict:
    return ck["model"] if part == COMPLETE else ck[SUBSET_MODELS][part]["model"]


def parts(ck: dict) -> list[str]:
    return [COMPLETE] + list(ck.get(SUBSET_MODELS) or {})


def part_state(ck: dict, part: str) -> dict:
    """The state dict of the extra part `part`, after checking its entry and that it was trained at the
    file's spacing (raises ValueError)."""
    entry = ck[SUBSET_MODELS][part]
    if not isinstance(entry, dict) or not isinstance(entry.get("model"), dict):
        raise ValueError(f"subset model {part!r} has no state dict")
    if entry.get(SPACING_KEY) is not None and checkpoint_spacing(entry) != checkpoint_spacing(ck):
        raise ValueError(f"subset model {part!r} was trained at spacing {entry[SPACING_KEY]}, "
                         f"the file's is {ck.get(SPACING_KEY)}")
    return entry["model"]


def part_entries(ck: dict, part: str) -> dict:
    """The entries describing `part` (its ``network`` above all): the file's own for COMPLETE."""
    return ck if part == COMPLETE else ck[SUBSET_MODELS][part]


def check_parts(ck: dict, spec: SegModelSpec) -> None:
    """Every part of `ck` loads strictly into a network of its recorded architecture and they share one
    spacing (raises)."""
    for part in parts(ck):
        state = ck["model"] if part == COMPLETE else part_state(ck, part)
        build_network(spec, network_shape(part_entries(ck, part))).load_state_dict(state, strict=True)


def combine(complete_path: str, incomplete_path: str, out_path: str) -> dict:
    """Write `out_path` (+ its .json sidecar): `complete_path`'s checkpoint with `incomplete_path`'s
    weights as the incomplete-study part. Returns the stats written to the sidecar."""
    ck = torch.load(complete_path, map_location="cpu", weights_only=True)
    inc = torch.load(incomplete_path, map_location="cpu", weights_only=True)
    for other in (ck, inc):
        if SUBSET_MODELS in other:
            raise ValueError("combine plain checkpoints (one set of weights each)")
    if ck.get("spec") != inc.get("spec") or list(ck.get("sequences", [])) != list(inc.get("sequences", [])):
        raise ValueError(f"different models: {ck.get('spec')} {ck.get('sequences')} vs {inc.get('spec')} {inc.get('sequences')}")
    if checkpoint_spacing(ck) != checkpoint_spacing(inc):
        raise ValueError(f"different training spacings: {ck.get(SPACING_KEY)} vs {inc.get(SPACING_KEY)}")
    spec = SPECS[ck.get("spec", "segmentation")]
    inc_stats = dict(inc.get("stats") or {})
    stats = {**dict(ck.get("stats") or {}), "required": list(inc.get("required", ["T2"])),
             "optional": list(inc.get("optional", [])),
             SUBSET_MODELS: {INCOMPLETE: {"serves": "studies lacking any of " + ", ".join(spec.sequences), **inc_stats}}}
    out = {**ck, "stats": stats, "required": stats["required"], "optional": stats["optional"],
           SUBSET_MODELS: {INCOMPLETE: {"model": inc["model"], "stats": inc_stats, SPACING_KEY: inc.get(SPACING_KEY),
                                        NETWORK_KEY: network_shape(inc).as_dict()}}}
    out[NETWORK_KEY] = network_shape(ck).as_dict()
    check_parts(out, spec)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    torch.save(out, tmp)
    os.replace(tmp, out_path)  # atomic: the server's hot reload never sees a partial file
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def extract(path: str, part: str, out_path: str) -> dict:
    """Write one part of a two-part file as a plain checkpoint (to retrain or recombine one part while
    keeping the other bit for bit). Returns the part's stats."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if part not in parts(ck):
        raise ValueError(f"{path} has no part {part!r} (parts: {', '.join(parts(ck))})")
    entries = part_entries(ck, part)
    stats = dict(ck.get("stats") or {}) if part == COMPLETE else dict(entries.get("stats") or {})
    stats.pop(SUBSET_MODELS, None)
    out = {k: v for k, v in ck.items() if k not in (SUBSET_MODELS, "model", "stats")}
    out.update(model=state_dict_of(ck, part) if part == COMPLETE else part_state(ck, part), stats=stats,
               **{NETWORK_KEY: network_shape(entries).as_dict()})
    if part == INCOMPLETE:  # what the incomplete part was trained to need (the file's own entries)
        out.update(required=list(stats.get("required", ck.get("required", ["T2"]))),
                   optional=list(stats.get("optional", ck.get("optional", []))))
    spec = SPECS[ck.get("spec", "segmentation")]
    build_network(spec, network_shape(out)).load_state_dict(out["model"], strict=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    torch.save(out, out_path + ".tmp")
    os.replace(out_path + ".tmp", out_path)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parotid.segmentation.subset_models",
                                 description="One segmentation checkpoint with weights for complete and incomplete studies.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("combine", help="complete-study weights + incomplete-study weights -> one checkpoint file")
    c.add_argument("--complete", required=True, help="checkpoint serving studies with every input sequence")
    c.add_argument("--incomplete", required=True, help="checkpoint (sequence dropout) serving studies lacking any")
    c.add_argument("--out", required=True, help="e.g. apps/parotid/model/segmentation.pt")
    e = sub.add_parser("extract", help="one part of a two-part file -> a plain checkpoint")
    e.add_argument("--file", required=True, help="a two-part segmentation checkpoint")
    e.add_argument("--part", choices=[COMPLETE, INCOMPLETE], required=True)
    e.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "extract":
        stats = extract(a.file, a.part, a.out)
        print(json.dumps({k: stats[k] for k in ("dice_gland", "dice_tumor", "network") if k in stats}, indent=1))
        return 0
    stats = combine(a.complete, a.incomplete, a.out)
    print(json.dumps({k: stats[k] for k in ("dice_gland", "dice_tumor", "required") if k in stats}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
