"""Dice of the whole-study segmentation with and without test-time flips (SYNTHETIC cohorts).

    python -m parotid.segmentation.flip_eval --checkpoint W/k/segmentation.pt --ids W/k/segmentation.json \\
        --cohort s41 s31 s32 s33 s34 s42 --out flips_k_val.json
    python -m parotid.segmentation.flip_eval --checkpoint W/f/segmentation.pt --ids W/f/segmentation.pt \\
        --subsets no_CET1 no_DWI_ADC T2_only --cohort s41 s31 s32 --out flips_f_val.json

Each study (complete as generated; with `--ids`, only the checkpoint's validation studies) is segmented once
per flip; the variants average the probabilities of: the study as it is (`single`, what the server did
before), plus its I flip, plus its J flip, all 4 in-plane flips, and the study plus its left-right mirror
(`mirror_lr`, what the server does now: `inference.mirror_flips`; on the synthetic studies the I flip). Paired
per study, so the variants differ only in the averaging. `--subsets` rebuilds each study without sequences
(`subset_eval.without`), as the incomplete-study part sees them.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from parotid.cohort import load_cohort
from parotid.labels import GLAND, TUMOR
from parotid.model_space import to_model_space
from parotid.segmentation.inference import UNCERTAINTY_FLIPS, clean_label, dice, flip_probabilities, mirror_flips, study_input
from parotid.segmentation.sequence_dropout import missing_in
from parotid.segmentation.subset_eval import load_checkpoint, without
from parotid.study import read_label_map, read_study

# variant -> the flips whose probabilities it averages (None: the served left-right mirroring of the study)
VARIANTS: dict[str, tuple[tuple[int, ...], ...] | None] = {
    "single": ((),), "flip_I": ((), (2,)), "flip_J": ((), (3,)), "flips_4": UNCERTAINTY_FLIPS, "mirror_lr": None}


def validation_ids(path: str) -> set[str]:
    """`validation_ids` of a trainer's stats: the .json it writes next to the checkpoint, or the .pt itself."""
    if path.endswith(".json"):
        with open(path) as f:
            return set(json.load(f)["validation_ids"])
    return set(torch.load(path, map_location="cpu", weights_only=False)["stats"]["validation_ids"])


def evaluate(checkpoint: str, cohorts: list[str], ids: set[str] | None = None, subsets=("all",)) -> dict:
    ck, spec = load_checkpoint(checkpoint)
    rows = []
    for it in [it for c in cohorts for it in load_cohort(c)]:
        if ids is not None and it.study_id not in ids:
            continue
        full = read_study(it.image, it.study_id)
        if not all(s in full.sequences for s in spec.sequences):
            continue
        lab = read_label_map(it.label)
        for subset in subsets:
            study = full if subset == "all" else without(full, missing_in(subset, spec.sequences))
            space = to_model_space(study, ck.spacing)
            flips = list(dict.fromkeys([f for v in VARIANTS.values() if v for f in v] + list(mirror_flips(space.model_study))))
            stack = flip_probabilities(ck.network_for(study.sequences)[1], spec, study_input(space.model_study, spec), flips)
            row = {"id": it.study_id, "tumor_class": it.tumor_class, "subset": subset}
            for name, wanted in VARIANTS.items():
                probs = stack[[flips.index(f) for f in (wanted or mirror_flips(space.model_study))]].mean(0).numpy()
                min_voxels = 20
                if space.resampled:
                    probs = space.values_to_study(probs)
                    min_voxels = max(1, int(round(20 * space.voxel_ratio())))
                label = clean_label(probs.argmax(0).astype(np.uint8), min_voxels=min_voxels)
                row[name] = {"gland": dice(label == GLAND, lab == GLAND), "tumor": dice(label == TUMOR, lab == TUMOR)}
            rows.append(row)
            print(it.study_id, subset, {v: round(row[v]["tumor"], 3) for v in VARIANTS}, file=sys.stderr, flush=True)
    summary = {}
    for subset in subsets:
        sub = [r for r in rows if r["subset"] == subset]
        summary[subset] = {v: {k: float(np.mean([r[v][k] for r in sub])) if sub else None for k in ("gland", "tumor")}
                           for v in VARIANTS} | {"n": len(sub)}
        if sub:
            for v in ("flips_4", "mirror_lr"):
                diff = np.array([r[v]["tumor"] - r["single"]["tumor"] for r in sub])
                summary[subset][f"tumor_{v}_minus_single"] = {"mean": float(diff.mean()), "better": int((diff > 0).sum()),
                                                               "worse": int((diff < 0).sum()),
                                                               "lost": sum(r[v]["tumor"] == 0 and r["single"]["tumor"] > 0.3 for r in sub)}
    return {"checkpoint": checkpoint, "synthetic": True, "variants": {k: v and [list(f) for f in v] for k, v in VARIANTS.items()},
            "summary": summary, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cohort", nargs="+", required=True)
    p.add_argument("--ids", help="trainer stats (.json or .pt) whose validation_ids to evaluate (default: every study)")
    p.add_argument("--subsets", nargs="+", default=["all"])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = evaluate(a.checkpoint, a.cohort, validation_ids(a.ids) if a.ids else None, a.subsets)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
