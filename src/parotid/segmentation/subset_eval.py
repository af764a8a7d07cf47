"""Held-out Dice of segmentation checkpoints per available-sequence subset (SYNTHETIC cohorts).

    python -m parotid.segmentation.subset_eval --cohort /tmp/h521 /tmp/h522 --checkpoints old.pt new.pt --out res.json

Every study of the cohort with all the model's input sequences is segmented as it is and as a study
lacking CE-T1, lacking DWI/ADC, and with its T2 only (the study is rebuilt without those sequences
and goes through the served path, `segment_study`, model-space resampling included). Reported: mean
gland and tumour Dice per subset and checkpoint, with n and the study ids; and, for complete studies, per
cohort seed and per tumour class (`breakdown`: a cohort's mean follows its share of malignant tumours).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from parotid.cohort import load_cohort
from parotid.labels import GLAND, TUMOR
from parotid.segmentation.checkpoint import load_segmentation
from parotid.segmentation.inference import dice, segment_study
from parotid.segmentation.sequence_dropout import SUBSETS, missing_in
from parotid.study import Study, read_label_map, read_study, study_from_array


def without(study: Study, missing) -> Study:
    """The same study lacking the `missing` sequences (same reference grid)."""
    keep = [s for s in study.sequences if s not in missing]
    return study_from_array(study.array(keep), keep, study.reference)


def load_checkpoint(path: str):
    ck = load_segmentation(path)
    if ck.spec.box_prompted:
        raise ValueError(f"{path}: a box-prompted model; this evaluates whole-study segmentation")
    # what the checkpoint was trained to need (older checkpoints: none recorded; evaluated with zero channels)
    return ck, replace(ck.spec, required=tuple(ck.meta.get("required", ["T2"])))


def evaluate_cohorts(cohorts: list[str], checkpoints: list[str], subsets=tuple(SUBSETS)) -> dict:
    models = {p: load_checkpoint(p) for p in checkpoints}
    scores = {p: {s: {"gland": [], "tumor": []} for s in subsets} for p in checkpoints}
    used, skipped, classes = [], [], []
    for it in [it for cohort in cohorts for it in load_cohort(cohort)]:
        study = read_study(it.image, it.study_id)
        spec0 = next(iter(models.values()))[1]
        if not all(s in study.sequences for s in spec0.sequences):
            skipped.append(it.study_id)  # incomplete as generated: its subsets are built from complete ones
            continue
        used.append(it.study_id)
        classes.append(it.tumor_class)
        lab = read_label_map(it.label)
        for subset in subsets:
            sub = without(study, missing_in(subset, spec0.sequences))
            for path, (ck, spec) in models.items():
                with torch.no_grad():
                    pred, _ = segment_study(ck.network_for(sub.sequences)[1], spec, sub, ck.spacing)
                scores[path][subset]["gland"].append(dice(pred == GLAND, lab == GLAND))
                scores[path][subset]["tumor"].append(dice(pred == TUMOR, lab == TUMOR))
    out = {"synthetic": True, "cohorts": cohorts, "n": len(used), "studies": used, "tumor_classes": classes,
           "skipped_incomplete": skipped, "results": {}}
    for path in checkpoints:
        out["results"][path] = {
            subset: {"dice_gland": float(np.mean(v["gland"])), "dice_tumor": float(np.mean(v["tumor"])),
                     "dice_tumor_sd": float(np.std(v["tumor"])), "n": len(v["tumor"]),
                     "per_study_gland": v["gland"], "per_study_tumor": v["tumor"]}
            for subset, v in scores[path].items()}
    out["breakdown"] = {path: breakdown(out, path) for path in checkpoints if "all" in out["results"][path]}
    return out


def _seed(study_id: str) -> str:
    """The cohort a study comes from: the id's prefix (`syn523_0004` -> `syn523`)."""
    return study_id.rsplit("_", 1)[0]


def breakdown(res: dict, path: str, subset: str = "all", resamples: int = 2000) -> list[dict]:
    """Mean Dice of `path` on `subset` per cohort (id prefix) and tumour class, and per cohort overall with
    its malignant share and a percentile-bootstrap 95 % CI of the tumour Dice (seed 0)."""
    r = res["results"][path][subset]
    rows = list(zip(res["studies"], res["tumor_classes"], r["per_study_tumor"], r["per_study_gland"]))
    rng = np.random.default_rng(0)
    out = []
    for cohort in sorted({_seed(s) for s, *_ in rows}) + ["all"]:
        mine = [x for x in rows if cohort == "all" or _seed(x[0]) == cohort]
        tumour = np.array([x[2] for x in mine])
        boot = [float(rng.choice(tumour, len(tumour)).mean()) for _ in range(resamples)]
        entry = {"cohort": cohort, "n": len(mine), "malignant_share": float(np.mean([x[1] == "malignant" for x in mine])),
                 "dice_tumor": float(tumour.mean()), "dice_tumor_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                 "dice_gland": float(np.mean([x[3] for x in mine])), "by_class": {}}
        for cls in sorted({x[1] for x in mine}):
            t = [x[2] for x in mine if x[1] == cls]
            entry["by_class"][cls] = {"n": len(t), "dice_tumor": float(np.mean(t))}
        out.append(entry)
    return out


def breakdown_table(res: dict) -> str:
    classes = sorted(set(res["tumor_classes"]))
    lines = ["| Checkpoint | Cohort | n | malignant | Dice tumour (95 % CI) | Dice gland | " + " | ".join(classes) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(classes)]
    for path, rows in res.get("breakdown", {}).items():
        for e in rows:
            lo, hi = e["dice_tumor_ci95"]
            per = [f"{e['by_class'][c]['dice_tumor']:.3f} (n {e['by_class'][c]['n']})" if c in e["by_class"] else "–"
                   for c in classes]
            lines.append(f"| {path} | {e['cohort']} | {e['n']} | {e['malignant_share']:.2f} | {e['dice_tumor']:.3f} "
                         f"({lo:.3f}–{hi:.3f}) | {e['dice_gland']:.3f} | " + " | ".join(per) + " |")
    return "\n".join(lines)


def table(res: dict) -> str:
    lines = ["| Checkpoint | Subset | n | Dice gland | Dice tumour |", "|---|---|---|---|---|"]
    for path, subsets in res["results"].items():
        for subset, r in subsets.items():
            lines.append(f"| {path} | {subset} | {r['n']} | {r['dice_gland']:.3f} | {r['dice_tumor']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Held-out segmentation Dice per available-sequence subset (SYNTHETIC).")
    ap.add_argument("--cohort", required=True, nargs="+", help="held-out cohort folder(s)")
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--out", help="JSON file for all numbers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--subsets", nargs="+", choices=list(SUBSETS), default=list(SUBSETS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t = time.time()
    res = evaluate_cohorts(a.cohort, a.checkpoints, a.subsets)
    res["seconds"] = round(time.time() - t, 1)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
    print(f"SYNTHETIC held-out cohort(s) {' '.join(a.cohort)}: n={res['n']} complete studies "
          f"({len(res['skipped_incomplete'])} incomplete skipped), {res['seconds']} s")
    print(table(res))
    if res.get("breakdown"):
        print("\nComplete studies as they are (subset 'all'), per cohort and tumour class (tumour Dice):")
        print(breakdown_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
