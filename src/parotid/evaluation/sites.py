"""``parotid-eval sites``: the SERVED classifiers on cohorts from several sites (acquisition profiles).

    parotid-eval sites --cohorts /tmp/s600_default /tmp/s600_siteB_1.5T ... --models apps/parotid/model

Every labelled study with the served minimum (parotid.subsets) goes through the served inference path
(``input_check.box_components`` + ``classification.predict.classify``: resampling to the model spacing,
calibrated probabilities, MC dropout, the classifier-feature density), once per model folder and
task. Per site: ROC-AUC of benign vs malignant (P(malignant)), macro-AUC (more than two classes),
top-label ECE, how many studies the input check flags (the served check, all components), how many
of the misclassified studies it flags, and the metrics of the studies it passes. The internal site
(``--internal``, default the site named ``default``) is the training scanner's profile. The study
components of the input check are computed once per study for model folders that share the
reference (``input_check.json``) and segmentation checkpoint.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

from parotid import input_check, subsets
from parotid.checksums import sha256_of
from parotid.labels import get_label_set
from parotid.study import StudyError, read_study

from .external import study_sites
from .flags import flag_summary, flagged_result
from .metrics import binary_report, bootstrap_ci, expected_calibration_error, multiclass_metrics
from .report import write_report

TARGETS = {"internal_roc_auc": 0.96, "external_roc_auc": 0.90, "external_macro_auc": 0.85}


def _check_key(model_dir: str) -> tuple:
    ref = os.path.join(model_dir, input_check.REFERENCE_FILE)
    seg = os.path.join(model_dir, "segmentation.pt")
    return tuple(sha256_of(p) if os.path.exists(p) else None for p in (ref, seg))


def _metrics(y, prob, ls, n_boot, seed) -> dict | None:
    yb = np.isin(y, ls.malignant_indices).astype(int)
    if len(y) < 2 or yb.all() or not yb.any():
        return None
    score = prob[:, ls.malignant_indices].sum(1)
    b = binary_report(yb, score, n_boot=n_boot, seed=seed)
    out = {"n": int(len(y)), "n_malignant": int(yb.sum()),
           **{k: list(b[k]) for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity")},
           "ece_top_label": expected_calibration_error(y, prob), "ece_binary": expected_calibration_error(yb, score)}
    if len(ls.classes) > 2:
        out["macro_auc"] = list(bootstrap_ci(lambda a, p: multiclass_metrics(a, p)["macro_auc"], y, prob,
                                             n_boot=n_boot, seed=seed))
        out["accuracy_classes"] = float((prob.argmax(1) == y).mean())
    return out


def evaluate_site(rows, ls, n_boot: int, seed: int) -> dict:
    """rows: per study {"y", "prob", "check", "undetermined"} -> metrics, flag counts, failures flagged."""
    y = np.array([r["y"] for r in rows])
    prob = np.array([r["prob"] for r in rows])
    flagged = np.array([not r["check"]["in_distribution"] for r in rows])
    und = np.array([r["undetermined"] for r in rows])
    yb = np.isin(y, ls.malignant_indices)
    wrong_bm = (prob[:, ls.malignant_indices].sum(1) >= 0.5) != yb
    wrong_cls = prob.argmax(1) != y
    return {"all": _metrics(y, prob, ls, n_boot, seed), "unflagged": _metrics(y[~flagged], prob[~flagged], ls, n_boot, seed),
            "input_check": flag_summary({r["study_id"]: r["check"] for r in rows}),
            "undetermined": int(und.sum()),
            "misclassified_benign_malignant": int(wrong_bm.sum()), "of_which_flagged": int((wrong_bm & flagged).sum()),
            "of_which_undetermined": int((wrong_bm & und).sum()),
            "misclassified_class": int(wrong_cls.sum()), "misclassified_class_flagged": int((wrong_cls & flagged).sum())}


def site_rows(folder: str, model_dirs: list[str], tasks: list[str], comps_cache: dict, progress=print,
              on_study=None) -> dict:
    """{(model_dir, task): [row per study]} for the labelled studies of `folder` (served inference path).
    `on_study(study)`: called with every study read (commissioning takes its intensity statistics there)."""
    from parotid.cohort import load_classification_cohort
    from parotid.classification.predict import classify
    from parotid.classification.checkpoint import load_checkpoint

    models = {}
    for d in model_dirs:
        for t in tasks:
            path = os.path.join(d, f"{t}.pt")
            if os.path.exists(path):
                model, cfg = load_checkpoint(path)
                req = list(subsets.minimum_for(cfg["sequences"]))
                models[(d, t)] = (model, {**cfg, "task": t, "required": req}, get_label_set(cfg["label_set"]))
    out: dict = {k: [] for k in models}
    out["_refused"] = {k: 0 for k in models}
    out["_label_sets"] = {k: v[2] for k, v in models.items()}
    out["_unreadable"] = {}
    recs = load_classification_cohort(folder)
    for n, r in enumerate(recs):
        try:
            study = read_study(r.image, r.study_id)
        except (StudyError, OSError, RuntimeError) as e:  # one broken file is reported, not fatal to the run
            out["_unreadable"][r.study_id] = str(e)[:300]
            continue
        if on_study is not None:
            on_study(study)
        for (d, t), (model, cfg, ls) in models.items():
            if not ls.accepts(r.tumor_class):
                continue
            if any(q not in study.sequences for q in cfg["required"]):
                out["_refused"][(d, t)] += 1  # the server answers 422
                continue
            key = (r.study_id, folder, _check_key(d))
            try:
                if key not in comps_cache:
                    comps_cache[key] = input_check.box_components(study, r.roi, d)
                res, _ = classify(model, cfg, study, r.roi, heatmap=False, input_components=comps_cache[key])
            except StudyError as e:
                out[(d, t)].append({"study_id": r.study_id, "y": ls.index(r.tumor_class), "prob": None,
                                    "check": flagged_result(str(e)), "undetermined": True})
                continue
            ic = res["input_check"]  # kept: the verdict, reasons and which components failed
            out[(d, t)].append({"study_id": r.study_id, "y": ls.index(r.tumor_class),
                                "prob": [p["score"] for p in res["prediction"]],
                                "check": {"in_distribution": ic["in_distribution"], "reasons": ic["reasons"],
                                          "components": {k: {"passed": c["passed"]} for k, c in ic["components"].items()}},
                                "undetermined": bool(res["undetermined"])})
        if (n + 1) % 12 == 0:
            progress(f"{os.path.basename(folder)}: {n + 1}/{len(recs)} studies")
    return out


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "n/a" if not np.isfinite(v[0]) else f"{v[0]:.2f} ({v[1]:.2f}–{v[2]:.2f})"
    return f"{v:.3f}"


def markdown(results: dict, internal: str) -> str:
    lines = []
    for d, tasks in results.items():
        for t, per_site in tasks.items():
            lines += [f"**{t}** — models `{d}`", "",
                      "| Site | n | ROC-AUC (b/m) | Macro-AUC | ECE (top label) | Input check flagged | misclassified b/m "
                      "(flagged) | ROC-AUC unflagged | Macro-AUC unflagged |", "|" + "---|" * 9]
            for site, s in per_site.items():
                a, u = s["all"] or {}, s["unflagged"] or {}
                tag = " (internal)" if site == internal else ""
                lines.append(f"| {site}{tag} | {a.get('n', 0)} | {_fmt(a.get('roc_auc'))} | {_fmt(a.get('macro_auc'))} | "
                             f"{_fmt(a.get('ece_top_label'))} | {s['input_check']['n_flagged']} / "
                             f"{s['input_check']['n_checked']} | {s['misclassified_benign_malignant']} "
                             f"({s['of_which_flagged']}) | {_fmt(u.get('roc_auc'))} | {_fmt(u.get('macro_auc'))} |")
            lines.append("")
    return "\n".join(lines)


def cmd_sites(a) -> dict:
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    comps_cache: dict = {}
    results: dict = {d: {} for d in a.models}
    refused: dict = {}
    for folder in a.cohorts:
        names = set(study_sites(folder).values()) or {os.path.basename(folder.rstrip("/"))}
        site = "+".join(sorted(names))
        rows = site_rows(folder, list(a.models), list(a.tasks), comps_cache)
        for (d, t), rs in ((k, v) for k, v in rows.items() if not isinstance(k, str)):  # "_..." keys: bookkeeping
            ls = rows["_label_sets"][(d, t)]
            rs = [r for r in rs if r["prob"] is not None]
            results[d].setdefault(t, {})[site] = {**evaluate_site(rs, ls, a.n_boot, a.seed),
                                                  "refused_missing_minimum": rows["_refused"][(d, t)],
                                                  "predictions": rs}
        refused[site] = {f"{d}:{t}": n for (d, t), n in rows["_refused"].items()}
        print(f"{site}: done ({time.time() - t0:.0f} s)", flush=True)
    meta = {"command": " ".join(["parotid-eval"] + (sys.argv[1:] if a.argv is None else list(a.argv))),
            "cohorts": [os.path.abspath(f) for f in a.cohorts], "models": list(a.models), "internal": a.internal,
            "targets": TARGETS, "n_boot": a.n_boot, "seed": a.seed, "seconds": round(time.time() - t0, 1),
            "synthetic": True, "checkpoint_sha256": {f"{d}/{t}.pt": sha256_of(os.path.join(d, f"{t}.pt"))
                                                    for d in a.models for t in a.tasks
                                                    if os.path.exists(os.path.join(d, f"{t}.pt"))}}
    md = ("SYNTHETIC cohorts, one per acquisition profile (`parotid-synth --profile`); served inference path; "
          f"calibrated probabilities; 95 % CIs: ROC-AUC DeLong, others percentile bootstrap ({a.n_boot} resamples). "
          "Input check: the served one (all components, incl. the classifier-feature density); misclassified b/m: "
          "P(malignant) >= 0.5 on the wrong side (in brackets: how many of them the input check flags).\n\n"
          + markdown(results, a.internal))
    write_report(a.out, a.name, {"meta": meta, "results": results}, md)
    return results


def add_parser(sub) -> None:
    s = sub.add_parser("sites", help="the served classifiers on cohorts of several sites (acquisition profiles)")
    s.add_argument("--cohorts", nargs="+", required=True, help="cohort folders, one per site (site from cohort.csv)")
    s.add_argument("--models", nargs="+", default=["apps/parotid/model"], help="served model folder(s)")
    s.add_argument("--tasks", nargs="+", default=["classify_malignancy", "classify_subtype"])
    s.add_argument("--internal", default="default", help="the site the models were trained on")
    s.add_argument("--out", default="docs/results")
    s.add_argument("--name", default="sites")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-boot", type=int, default=1000)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=cmd_sites)
