"""``parotid-eval subsets``: every served model on a held-out SYNTHETIC cohort with sequences removed.

Each complete study of the cohort (it has all of the model's sequences) is run through the SERVED
inference path (``parotid.classification.predict.classify``, ``parotid.segmentation.inference``) once
per named subset of ``parotid.subsets`` (all, no CE-T1, no DWI/ADC, T2 only), the removed sequences
taken out of the study file as a site without them would send it. Paired: every subset is measured on
the same studies.

* classification: ROC-AUC / PR-AUC / accuracy / sensitivity / specificity of benign vs malignant
  (P(malignant)), macro-AUC for more than two classes, undetermined rate (MC dropout + feature density;
  the subset floor is applied by the server on top);
* segmentation: Dice of gland and tumour on whole studies; contour_box: Dice of the tumour in the box
  region with the tight box of the largest tumour as the prompt (the protocol of segmentation/train.py).

Values: point estimate with a percentile-bootstrap 95 % CI over studies. Writes ``<out>/<name>.json``,
``<out>/<name>.md`` and, with ``--write-tables``, ``<models>/<task>.subsets.json`` (stamped with the
checkpoint's SHA-256) that the server reads for ``expected_performance``. ``--before DIR`` evaluates the
checkpoints of DIR too (e.g. the previous models), on the same studies, for before/after figures.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

import numpy as np
import torch

from parotid import subsets
from parotid.labels import GLAND, TUMOR, get_label_set
from parotid.study import Study, read_label_map, read_study

from .metrics import binary_report, bootstrap_ci, multiclass_metrics
from .report import write_report

SEG_TASKS = ("segmentation", "contour_box")


def removed_study(study: Study, model_sequences, used) -> Study:
    """The study without the model's sequences that are not in `used` (other sequences kept)."""
    return subsets.subset_study(study, [s for s in study.sequences if s not in model_sequences or s in used])


def _mean_ci(values, n_boot: int, seed: int) -> list[float]:
    v = np.asarray(values, float)
    return list(bootstrap_ci(np.mean, v, n_boot=n_boot, seed=seed))


def _complete(records, model_sequences, limit: int | None):
    out = []
    for r in records:
        s = read_study(r.image, r.study_id)
        if all(q in s.sequences for q in model_sequences):
            out.append((r, s))
        if limit and len(out) >= limit:
            break
    return out


# ------------------------------------------------------------------------------------ classification
def classification_rows(path: str, records, n_boot: int, seed: int, limit: int | None, progress: Callable) -> tuple[dict, list]:
    from parotid.classification.predict import classify
    from parotid.classification.checkpoint import load_checkpoint

    model, cfg = load_checkpoint(path)
    seqs = list(cfg["sequences"])
    ls = get_label_set(cfg["label_set"])
    cfg = {**cfg, "required": list(subsets.minimum_for(seqs))}
    studies = [(r, s) for r, s in _complete(records, seqs, None) if ls.accepts(r.tumor_class)][:limit or None]
    y = np.array([ls.index(r.tumor_class) for r, _ in studies])
    yb = np.isin(y, ls.malignant_indices).astype(int)
    rows = []
    for name, used in subsets.named_subsets(seqs).items():
        prob, und = [], []
        for r, s in studies:
            res, _ = classify(model, cfg, removed_study(s, seqs, used), r.roi, heatmap=False)
            prob.append([p["score"] for p in res["prediction"]])
            und.append(bool(res["undetermined"]))
        prob = np.array(prob)
        b = binary_report(yb, prob[:, ls.malignant_indices].sum(1), n_boot=n_boot, seed=seed)
        metrics = {k: list(b[k]) for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity")}
        if len(ls.classes) > 2:
            metrics["macro_auc"] = list(bootstrap_ci(lambda a, p: multiclass_metrics(a, p)["macro_auc"], y, prob,
                                                     n_boot=n_boot, seed=seed))
        metrics["undetermined_rate"] = float(np.mean(und))
        rows.append({"name": name, "sequences_used": used, "sequences_missing": [q for q in seqs if q not in used],
                     "n": len(studies), "metrics": metrics})
        progress(f"{os.path.basename(path)} {name}: ROC-AUC {metrics['roc_auc'][0]:.3f}")
    return {"label_set": ls.name, "sequences": seqs, "n": len(studies)}, rows


# ------------------------------------------------------------------------------------ segmentation
def segmentation_rows(path: str, task: str, records, n_boot: int, seed: int, limit: int | None,
                      progress: Callable) -> tuple[dict, list]:
    from parotid.segmentation.checkpoint import load_segmentation
    from parotid.segmentation.inference import box_region, contour_study, dice, segment_study, tumour_roi
    from parotid.segmentation.networks import SPECS

    spec = SPECS[task]
    ck = load_segmentation(path, spec)
    spacing = ck.spacing
    seqs = list(spec.sequences)
    studies = [(r, s, read_label_map(r.label)) for r, s in _complete([r for r in records if r.label], seqs, limit)]
    rows = []
    for name, used in subsets.named_subsets(seqs).items():
        gland, tumour = [], []
        for r, s, lab in studies:
            sub = removed_study(s, seqs, used)
            net = ck.network_for(sub.sequences)[1]  # the served choice of weights per study's sequences
            if spec.box_prompted:
                roi = tumour_roi(lab)  # the tight box of the largest tumour is the prompt
                if roi is None:
                    continue
                region = box_region(roi, lab.shape)
                truth = np.zeros(lab.shape, bool)
                truth[region] = lab[region] == TUMOR
                pred, _ = contour_study(net, spec, sub, roi, spacing)
                tumour.append(dice(pred == TUMOR, truth))
            else:
                pred, _ = segment_study(net, spec, sub, spacing)
                gland.append(dice(pred == GLAND, lab == GLAND))
                tumour.append(dice(pred == TUMOR, lab == TUMOR))
        metrics = {"dice_tumor": _mean_ci(tumour, n_boot, seed)}
        if gland:
            metrics["dice_gland"] = _mean_ci(gland, n_boot, seed)
        rows.append({"name": name, "sequences_used": used, "sequences_missing": [q for q in seqs if q not in used],
                     "n": len(tumour), "metrics": metrics})
        progress(f"{task} {name}: Dice tumour {metrics['dice_tumor'][0]:.3f}")
    return {"sequences": seqs, "n": len(studies)}, rows


# ------------------------------------------------------------------------------------ command
def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return "n/a" if not np.isfinite(v[0]) else f"{v[0]:.2f} ({v[1]:.2f}–{v[2]:.2f})"
    return f"{v:.2f}"


def markdown(results: dict, cohort: str, before: dict | None = None) -> str:
    lines = [f"SYNTHETIC held-out cohort `{cohort}` (seed never used for training); every subset on the same "
             "complete studies, removed sequences taken out of the study file; served inference path. "
             "Values: point estimate (percentile-bootstrap 95 % CI over studies).", ""]
    runs = [(task, r, "") for task, r in results.items()]
    runs += [(task, r, " — BEFORE: " + r["models"]) for task, r in (before or {}).items()]
    for task, r, label in runs:
        rows = r["subsets"]
        keys = [k for k in rows[0]["metrics"]]
        lines += [f"**{task}**{label} (n = {r['n']}, sequences {', '.join(r['sequences'])})", "",
                  "| Subset | Sequences used | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
        for row in rows:
            lines.append(f"| {row['name']} | {', '.join(row['sequences_used'])} | "
                         + " | ".join(_fmt(row["metrics"][k]) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def cmd_subsets(a) -> dict:
    from parotid.cohort import load_classification_cohort

    torch.set_num_threads(a.threads)
    records = load_classification_cohort(a.cohort)
    cohort = os.path.basename(os.path.abspath(a.cohort))
    os.makedirs(a.out, exist_ok=True)
    command = " ".join(["parotid-eval"] + (sys.argv[1:] if a.argv is None else list(a.argv)))
    results, before = {}, {}
    for folder, out in ((a.models, results), (a.before, before)):
        for task in a.tasks if folder else ():
            path = os.path.join(folder, f"{task}.pt")
            if not os.path.exists(path):
                print(f"{task}: no checkpoint in {folder}, skipped")
                continue
            t0 = time.time()
            if task in SEG_TASKS:
                meta, rows = segmentation_rows(path, task, records, a.n_boot, a.seed, a.seg_limit, print)
            else:
                meta, rows = classification_rows(path, records, a.n_boot, a.seed, a.limit, print)
            out[task] = {"task": task, "synthetic": True, "checkpoint_sha256": subsets.file_sha256(path),
                         "models": folder, "cohort": cohort, "source": command, "seconds": round(time.time() - t0, 1),
                         **meta, "subsets": rows}
            if a.write_tables and out is results:
                subsets.write_table(subsets.table_path(a.models, task), out[task])
    write_report(a.out, a.name, {"meta": {"command": command, "synthetic": True, "cohort": cohort}, "results": results,
                                 **({"before": before} if before else {})}, markdown(results, cohort, before))
    return results


def add_parser(sub) -> None:
    s = sub.add_parser("subsets", help="metrics per available-sequence subset (all, no CE-T1, no DWI/ADC, T2 only)")
    s.add_argument("--cohort", required=True, help="held-out SYNTHETIC cohort folder (a seed never used for training)")
    s.add_argument("--models", default="apps/parotid/model")
    s.add_argument("--before", default=None, help="another checkpoint folder evaluated too (e.g. the previous models)")
    s.add_argument("--tasks", nargs="+", default=["classify_malignancy", "classify_subtype", "segmentation", "contour_box"])
    s.add_argument("--out", default="docs/results")
    s.add_argument("--name", default="subsets")
    s.add_argument("--limit", type=int, default=None, help="at most this many studies per classifier")
    s.add_argument("--seg-limit", type=int, default=None, help="at most this many studies per segmentation model")
    s.add_argument("--write-tables", action="store_true", help="write <models>/<task>.subsets.json for the server")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-boot", type=int, default=1000)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=cmd_subsets)
