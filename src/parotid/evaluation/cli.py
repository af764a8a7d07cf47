"""``parotid-eval``: cross-validated ablation and held-out evaluation of the classifiers (SYNTHETIC cohorts).

    parotid-eval cv --cohort /tmp/cohort101 --out docs/results          # 5-fold CV ablation (000 Tables II/III)
    parotid-eval holdout --cohort /tmp/cohort202 --models apps/parotid/model --out docs/results
    parotid-eval external --train /tmp/siteA --test /tmp/siteB --out docs/results     # train on sites, test on another
    parotid-eval external --leave-one-site-out --cohorts /tmp/siteA /tmp/siteB /tmp/siteC
    parotid-eval sites --cohorts /tmp/s600_default /tmp/s600_siteB_1.5T --models apps/parotid/model   # served, per site
    parotid-eval subsets --cohort /tmp/cohort500 --models apps/parotid/model --write-tables   # per sequence subset
    parotid-eval commission --cohort /data/siteB --site siteB --models ~/.parotid/model   # accept a site, gated

Both write ``<out>/<name>.json`` (all numbers), PNG plots (ROC/PR, reliability, confusion) and a
markdown table ``<out>/<name>.md`` that docs/results.md includes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from parotid.labels import get_label_set
from parotid.sequences import CLASSIFIER_SEQUENCES

from .metrics import (binary_report, bootstrap_ci, expected_calibration_error, multiclass_metrics, per_class_prf,
                      prf_report, youden_threshold)
from .plots import confusion_plot, reliability_plot, roc_pr_plot
from .report import write_report


def _fmt(t):
    v, lo, hi = t
    return "n/a" if not np.isfinite(v) else f"{v:.2f} ({lo:.2f}–{hi:.2f})"


def _summarise(name, y, label_set, r, n_boot, seed):
    mal = label_set.malignant_indices
    yb = np.isin(y, mal).astype(int)
    score = r["score"]
    prob = r["prob"]
    out = {}
    if r.get("threshold") == "youden":  # a score without probabilities (LOF): 003's Youden operating point
        thr = youden_threshold(yb, score)
        pred_bin = (score >= thr).astype(int)
        out["threshold"] = {"method": "Youden index on these (pooled out-of-fold) predictions, as in seed 003",
                            "value": thr}
        if r["pred_bin"] is not None:
            out["binary_default_offset"] = binary_report(yb, score, r["pred_bin"], n_boot=n_boot, seed=seed)
    elif prob is not None:
        pred_bin = (score >= 0.5).astype(int)
    elif r["pred_bin"] is not None:
        pred_bin = r["pred_bin"]
    else:
        pred_bin = (score >= np.median(score)).astype(int)
    out["binary"] = binary_report(yb, score, pred_bin, n_boot=n_boot, seed=seed)
    if r.get("pred_bin") is not None and prob is not None:
        out["binary_rule_001"] = binary_report(yb, score, r["pred_bin"], n_boot=n_boot, seed=seed)
    if prob is not None:  # seed 004's measures on the predicted (argmax) class
        out["prf"] = prf_report(y, prob.argmax(1), list(label_set.classes), n_boot=n_boot, seed=seed)
    if r.get("pred_cls") is not None:
        out["prf_rule_001"] = prf_report(y, r["pred_cls"], list(label_set.classes), n_boot=n_boot, seed=seed)
    if r.get("slice") is not None:
        out["slice_level"] = slice_level_metrics(r["slice"]["y"], r["slice"]["prob"], label_set)
    if prob is not None and prob.shape[1] > 2:
        mc = multiclass_metrics(y, prob)
        out["multiclass"] = {
            "accuracy": bootstrap_ci(lambda a, b: multiclass_metrics(a, b)["accuracy"], y, prob, n_boot=n_boot, seed=seed),
            "macro_auc": bootstrap_ci(lambda a, b: multiclass_metrics(a, b)["macro_auc"], y, prob, n_boot=n_boot, seed=seed),
            "micro_auc": bootstrap_ci(lambda a, b: multiclass_metrics(a, b)["micro_auc"], y, prob, n_boot=n_boot, seed=seed),
            "per_class_auc": {label_set.classes[k]: v for k, v in mc["per_class_auc"].items()},
        }
        from sklearn.metrics import confusion_matrix
        out["multiclass"]["confusion_matrix"] = confusion_matrix(y, prob.argmax(1), labels=list(range(prob.shape[1]))).tolist()
    if prob is not None:
        out["ece_top_label"] = expected_calibration_error(y, prob)
        out["ece_binary"] = expected_calibration_error(yb, score)
    if r.get("subsets"):
        out["subsets"] = {sub: _sequence_subset_summary(y, label_set, p, n_boot, seed) for sub, p in r["subsets"].items()}
    return out


def _sequence_subset_summary(y, label_set, prob, n_boot, seed) -> dict:
    """Out-of-fold figures of one sequence subset: benign vs malignant (P(malignant), 0.5) and, for more
    than two classes, macro-AUC and class accuracy."""
    yb = np.isin(y, label_set.malignant_indices).astype(int)
    score = prob[:, label_set.malignant_indices].sum(1)
    out = {"binary": binary_report(yb, score, (score >= 0.5).astype(int), n_boot=n_boot, seed=seed)}
    if prob.shape[1] > 2:
        out["macro_auc"] = bootstrap_ci(lambda a, b: multiclass_metrics(a, b)["macro_auc"], y, prob, n_boot=n_boot, seed=seed)
        out["accuracy_classes"] = bootstrap_ci(lambda a, b: multiclass_metrics(a, b)["accuracy"], y, prob, n_boot=n_boot, seed=seed)
    return out


def _subsets_table(summary) -> str:
    rows = [(k, sub, v) for k, s in summary.items() for sub, v in s.get("subsets", {}).items()]
    if not rows:
        return ""
    mc = any("macro_auc" in v for _, _, v in rows)
    head = "| Variant | Sequences | ROC-AUC (b/m) | Accuracy (b/m) |" + (" Macro-AUC | Accuracy (classes) |" if mc else "")
    lines = ["\n\nOut-of-fold predictions of the same folds' test studies with sequences removed as the server does "
             "(zero channels / absent late-fusion branches):\n", head, "|" + "---|" * (head.count("|") - 1)]
    for k, sub, v in rows:
        b = v["binary"]
        row = f"| {k} | {sub} | {_fmt(b['roc_auc'])} | {_fmt(b['accuracy'])} |"
        if mc:
            row += f" {_fmt(v['macro_auc'])} | {_fmt(v['accuracy_classes'])} |" if "macro_auc" in v else " – | – |"
        lines.append(row)
    return "\n".join(lines)


def slice_level_metrics(y, prob, label_set) -> dict:
    """001's slice-level figures (point values; slices of one patient are not independent, so no CIs):
    accuracy, micro/macro one-vs-rest AUC and confusion matrix over the label set's classes + tumour-free,
    benign-vs-malignant accuracy on tumour slices, per-class precision/recall/F1."""
    from sklearn.metrics import confusion_matrix

    classes = list(label_set.classes) + ["tumour_free"]
    y, prob = np.asarray(y).astype(int), np.asarray(prob, float)
    mc = multiclass_metrics(y, prob)
    pred = prob.argmax(1)
    tumour = y < len(label_set.classes)
    mal = label_set.malignant_indices
    bm = float((np.isin(pred[tumour], mal) == np.isin(y[tumour], mal)).mean()) if tumour.any() else float("nan")
    return {"n_slices": int(len(y)), "n_tumour_slices": int(tumour.sum()), "classes": classes,
            "accuracy": mc["accuracy"], "micro_auc": mc["micro_auc"], "macro_auc": mc["macro_auc"],
            "benign_vs_malignant_accuracy_tumour_slices": bm,
            "confusion_matrix": confusion_matrix(y, pred, labels=list(range(len(classes)))).tolist(),
            "prf": per_class_prf(y, pred, classes)}


def _table(summary, label_set, multiclass=True):
    head = "| Training input | Accuracy | ROC-AUC | PR-AUC | Sensitivity | Specificity |"
    if multiclass:
        head += " Macro-AUC | Micro-AUC | ECE |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in summary.items():
        b = s["binary"]
        row = f"| {name} | {_fmt(b['accuracy'])} | {_fmt(b['roc_auc'])} | {_fmt(b['pr_auc'])} | {_fmt(b['sensitivity'])} | {_fmt(b['specificity'])} |"
        if multiclass:
            m = s.get("multiclass")
            ece = s.get("ece_top_label")
            row += (f" {_fmt(m['macro_auc'])} | {_fmt(m['micro_auc'])} |" if m else " – | – |")
            row += f" {ece:.3f} |" if ece is not None else " – |"
        lines.append(row)
    return "\n".join(lines)


def _notes(summary) -> str:
    """Lines under the CV table: macro precision/recall/F1 (004), 001's rule and slice level, LOF's threshold."""
    md = "\n\nMacro precision / recall / F1 on the predicted class (seed 004's measures; per class in the JSON):\n"
    for k, s in summary.items():
        if "prf" in s:
            m = s["prf"]["macro"]
            md += f"\n- {k}: {_fmt(m['precision'])} / {_fmt(m['recall'])} / {_fmt(m['f1'])}"
    for k, s in summary.items():
        if "binary_rule_001" in s:
            b, m = s["binary_rule_001"], s["prf_rule_001"]["macro"]
            md += (f"\n\n{k}, 001's decision rule on unique tumour slices (> 2 malignant slices): accuracy "
                   f"{_fmt(b['accuracy'])}, sensitivity {_fmt(b['sensitivity'])}, specificity {_fmt(b['specificity'])}, "
                   f"macro F1 {_fmt(m['f1'])}")
        if "slice_level" in s:
            sl = s["slice_level"]
            md += (f"\n\n{k}, slice level (001; {sl['n_tumour_slices']} unique tumour slices + "
                   f"{sl['n_slices'] - sl['n_tumour_slices']} tumour-free slices, point values): accuracy "
                   f"{sl['accuracy']:.2f}, micro-AUC {sl['micro_auc']:.2f}, macro-AUC {sl['macro_auc']:.2f}, "
                   f"benign vs malignant on tumour slices {sl['benign_vs_malignant_accuracy_tumour_slices']:.2f}")
        if "threshold" in s:
            b, d = s["binary"], s.get("binary_default_offset")
            md += (f"\n\n{k}: sensitivity / specificity at the Youden threshold ({s['threshold']['value']:.3g}, chosen on "
                   f"these predictions as in 003, hence optimistic): {_fmt(b['sensitivity'])} / {_fmt(b['specificity'])}")
            if d:
                md += (f"; at scikit-learn's default LOF offset: {_fmt(d['sensitivity'])} / {_fmt(d['specificity'])}")
    return md


def cmd_cv(a):
    from parotid.classification.data import build_cropset
    from parotid.classification.defaults import SERVED_TRAINING
    from .cv import run_ablation

    torch.set_num_threads(a.threads)
    ls = get_label_set(a.label_set)
    train_kw = None
    if not a.server_settings:
        a.epochs1 = 8 if a.epochs1 is None else a.epochs1
        a.epochs2 = 40 if a.epochs2 is None else a.epochs2
    else:  # the shipped checkpoints' recipe (defaults.SERVED_TRAINING), per-subset figures too
        a.epochs1 = SERVED_TRAINING["epochs1"] if a.epochs1 is None else a.epochs1
        a.epochs2 = SERVED_TRAINING["epochs2"] if a.epochs2 is None else a.epochs2
        a.subsets = True
        train_kw = {k: SERVED_TRAINING[k] for k in ("val_frac", "patience1", "patience2", "branch_dropout")}
        train_kw["optional"] = tuple(q for q in a.fusion if q not in SERVED_TRAINING["required"])
    cs = build_cropset(a.cohort, size=a.size)
    seqs = list(a.single or cs.sequences)
    need = cs.channels(sorted(set(seqs) | set(a.fusion)))
    # studies with every sequence of the ablation (synthetic cohorts lack one sequence in ~10 % of studies)
    keep = [i for i, c in enumerate(cs.tumor_class) if ls.accepts(c) and cs.avail[i, need].all()]
    cs = cs.subset(keep)
    t0 = time.time()
    res = run_ablation(cs, ls, seqs, a.fusion, folds=a.folds, seed=a.seed, epochs1=a.epochs1, epochs2=a.epochs2,
                       resnet_epochs=a.resnet_epochs, gland=a.gland,
                       variants=set(a.variants) if a.variants else None, train_kw=train_kw, subsets=a.subsets)
    y = res.pop("_y")
    timing = res.pop("_timing_s")
    order = [f"{s} {k}" for s in seqs for k in ("single image", "single sequence")]
    order += [k for k in res if k not in order]
    summary = {k: _summarise(k, y, ls, res[k], a.n_boot, a.seed) for k in order if k in res}
    os.makedirs(a.out, exist_ok=True)
    name = a.name
    yb = np.isin(y, ls.malignant_indices).astype(int)
    roc_pr_plot({k: (yb, res[k]["score"]) for k in summary if "single image" not in k}, os.path.join(a.out, f"{name}_roc_pr.png"),
                "benign vs malignant (CV)")
    reliability_plot({k: (y, res[k]["prob"]) for k in summary if res[k]["prob"] is not None and "single" not in k},
                     os.path.join(a.out, f"{name}_reliability.png"))
    meta = {"command": " ".join(["parotid-eval"] + sys.argv[1:]), "cohort": os.path.abspath(a.cohort), "n": len(y),
            "class_counts": {c: int((y == i).sum()) for i, c in enumerate(ls.classes)}, "label_set": ls.name,
            "folds": a.folds, "seed": a.seed, "epochs1": a.epochs1, "epochs2": a.epochs2,
            "training": ({**train_kw, "optional": list(train_kw["optional"])} if train_kw else "plain (no validation split, "
                         "no early stopping, no branch dropout)"),
            "seconds": round(time.time() - t0, 1), "train_seconds_per_variant": {k: round(v, 1) for k, v in timing.items()},
            "synthetic": True}
    md = (f"SYNTHETIC cohort `{os.path.basename(os.path.abspath(a.cohort))}` (n = {len(y)}, {meta['class_counts']}), "
          f"{a.folds}-fold stratified CV (seed {a.seed}), label set `{ls.name}`; values: pooled out-of-fold estimate "
          f"(95 % CI: ROC-AUC DeLong, others percentile bootstrap, {a.n_boot} resamples). Benign/malignant columns use "
          f"P(malignant).\n\n"
          + _table(summary, ls, multiclass=len(ls.classes) > 2))
    if train_kw:
        md = (f"Training as the served checkpoints ({a.epochs1}/{a.epochs2} epochs, {train_kw['val_frac']:.0%} of each fold's "
              f"training patients validate (best epoch, early stopping after {train_kw['patience1']}/{train_kw['patience2']} "
              f"epochs), optional sequences {'+'.join(train_kw['optional'])} dropped in training, branch dropout "
              f"{train_kw['branch_dropout']}). " + md)
    md += _subsets_table(summary)
    md += _notes(summary)
    write_report(a.out, name, {"meta": meta, "results": summary}, md)
    print(f"\n[{meta['seconds']} s]")


def cmd_holdout(a):
    from parotid.classification.data import build_cropset
    from parotid.classification.predict import mc_dropout
    from parotid.classification.checkpoint import load_checkpoint
    from parotid.classification.liu import predict_logits

    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    all_out, md = {}, []
    cs_cache = {}
    for task in a.tasks:
        path = os.path.join(a.models, f"{task}.pt")
        if not os.path.exists(path):
            print(f"{task}: no checkpoint, skipped")
            continue
        model, cfg = load_checkpoint(path)
        ls = get_label_set(cfg["label_set"])
        if cfg["size"] not in cs_cache:
            cs_cache[cfg["size"]] = build_cropset(a.cohort, size=cfg["size"], n_slices=cfg["n_slices"])
        cs = cs_cache[cfg["size"]]
        req = cs.channels(cfg.get("required", cfg["sequences"]))
        # as the server: studies lacking a required sequence are refused (422), optional ones are zero channels
        keep = [i for i, c in enumerate(cs.tumor_class) if ls.accepts(c) and cs.avail[i, req].all()]
        sub = cs.subset(keep)
        y = sub.labels(ls)
        t0 = time.time()
        logits = predict_logits(model, sub, np.arange(len(sub)), cfg["groups"])
        dt = (time.time() - t0) / len(sub)
        T = cfg["temperature"]
        raw = torch.softmax(logits, 1).numpy()
        prob = torch.softmax(logits / T, 1).numpy()
        r = {"prob": prob, "score": prob[:, ls.malignant_indices].sum(1), "pred_bin": None}
        s = _summarise(task, y, ls, r, a.n_boot, a.seed)
        s["ece_top_label_uncalibrated"] = expected_calibration_error(y, raw)
        s["temperature"] = T
        s["model_seconds_per_study"] = dt
        # MC-dropout "undetermined" rate and accuracy on determined studies
        unc = cfg.get("uncertainty", {})
        und = []
        with torch.no_grad():
            for i in range(len(sub)):
                x = torch.from_numpy(sub.slices[i:i + 1][:, :, sub.channels([q for g in cfg["groups"] for q in g])].astype(np.float32))
                feats = model.slice_features(x, torch.from_numpy(sub.box[i:i + 1]))
                mc = mc_dropout(model, feats, T, int(unc.get("passes", 20)))
                ms = float(mc[:, ls.malignant_indices].sum(1).std()) if ls.malignant_indices else 0.0
                und.append(mc.mean(0).max() < unc.get("max_top_prob_below", 0.6) or ms > unc.get("max_std_above", 0.15))
        und = np.array(und)
        det = ~und
        s["undetermined_rate"] = float(und.mean())
        s["accuracy_determined"] = float((prob.argmax(1)[det] == y[det]).mean()) if det.any() else float("nan")
        s["accuracy_undetermined"] = float((prob.argmax(1)[und] == y[und]).mean()) if und.any() else float("nan")
        all_out[task] = s
        yb = np.isin(y, ls.malignant_indices).astype(int)
        roc_pr_plot({task: (yb, r["score"])}, os.path.join(a.out, f"{a.name}_{task}_roc_pr.png"), f"{task} held-out")
        reliability_plot({f"{task} T={T:.2f}": (y, prob), f"{task} uncalibrated": (y, raw)},
                         os.path.join(a.out, f"{a.name}_{task}_reliability.png"))
        cm = s["multiclass"]["confusion_matrix"] if "multiclass" in s else s["binary"]["confusion_matrix"]
        confusion_plot(cm, list(ls.classes), os.path.join(a.out, f"{a.name}_{task}_confusion.png"), task)
        b = s["binary"]
        line = (f"| {task} | {ls.name} | {len(y)} | {_fmt(b['accuracy'])} | {_fmt(b['roc_auc'])} | {_fmt(b['pr_auc'])} | "
                f"{_fmt(b['sensitivity'])} | {_fmt(b['specificity'])} | "
                + (f"{_fmt(s['multiclass']['macro_auc'])} | {_fmt(s['multiclass']['micro_auc'])} | {_fmt(s['multiclass']['accuracy'])} | " if "multiclass" in s else "– | – | – | ")
                + f"{s['ece_top_label']:.3f} (uncal. {s['ece_top_label_uncalibrated']:.3f}) | {s['undetermined_rate']:.2f} |")
        md.append(line)
    head = ("| Model | Label set | n | Accuracy (b/m) | ROC-AUC (b/m) | PR-AUC | Sensitivity | Specificity | Macro-AUC | Micro-AUC | Accuracy (classes) | ECE (top label) | Undetermined |\n"
            "|" + "---|" * 13)
    text = (f"SYNTHETIC held-out cohort `{os.path.basename(os.path.abspath(a.cohort))}` (seed not used for training); "
            f"calibrated probabilities; 95 % CIs: ROC-AUC DeLong, others percentile bootstrap ({a.n_boot} resamples, seed {a.seed}).\n\n" + head + "\n" + "\n".join(md)
            + _notes(all_out))
    write_report(a.out, a.name, {"meta": {"command": " ".join(["parotid-eval"] + sys.argv[1:]), "synthetic": True},
                                 "results": all_out}, text)


def _served_model_dir() -> str | None:
    """The repository's served model folder (apps/parotid/model), when this is a checkout."""
    d = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "apps", "parotid", "model"))
    return d if os.path.isdir(d) else None


def _rows_summary(y, prob, ls, idx, a):
    """_summarise on the rows `idx` of (y, prob), or None when they lack a benign or a malignant study."""
    yb = np.isin(y[idx], ls.malignant_indices)
    if len(idx) < 2 or yb.all() or not yb.any():
        return None
    r = {"prob": prob[idx], "score": prob[idx][:, ls.malignant_indices].sum(1), "pred_bin": None}
    return _summarise("unflagged", y[idx], ls, r, a.n_boot, a.seed)


def _split_result(name, cs, ls, sites, split, a, checks=None):
    """Internal vs external summaries of one split, the drop, the input check's flags on the external
    studies (with the metrics of the unflagged ones) and per-study predictions."""
    y = cs.labels(ls)
    out = {}
    for part in ("internal", "external"):
        if split[part] is None:
            out[part] = None
            continue
        idx, prob = split[part]
        r = {"prob": prob, "score": prob[:, ls.malignant_indices].sum(1), "pred_bin": None}
        out[part] = _summarise(part, y[idx], ls, r, a.n_boot, a.seed)
        out[part]["n"] = int(len(idx))
        out[part]["sites"] = sorted(set(sites[idx]))
    if out["internal"] is not None:
        drop = {k: out["internal"]["binary"][k][0] - out["external"]["binary"][k][0]
                for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity")}
        if "multiclass" in out["external"] and "multiclass" in out["internal"]:
            for k in ("macro_auc", "micro_auc", "accuracy"):
                drop[f"{k}_classes"] = out["internal"]["multiclass"][k][0] - out["external"]["multiclass"][k][0]
        drop["ece_top_label"] = out["external"]["ece_top_label"] - out["internal"]["ece_top_label"]  # increase
        out["drop"] = drop
    ext_idx, ext_prob = split["external"]
    if checks is not None:
        from .flags import flag_summary

        ids = [cs.study_ids[i] for i in ext_idx]
        mine = {sid: checks[sid] for sid in ids}
        out["input_check"] = flag_summary(mine)
        ok = np.array([mine[sid]["in_distribution"] for sid in ids], bool)
        out["external_unflagged"] = _rows_summary(y[ext_idx], ext_prob, ls, np.nonzero(ok)[0], a)
        if out["external_unflagged"] is not None:
            out["external_unflagged"]["n"] = int(ok.sum())
    out["predictions"] = [{"study_id": cs.study_ids[i], "site": str(sites[i]), "part": part, "y": int(y[i]),
                           "prob": [float(v) for v in p],
                           **({"flagged": not checks[cs.study_ids[i]]["in_distribution"]}
                              if checks is not None and part == "external" else {})}
                          for part in ("internal", "external") if split[part] is not None for i, p in zip(*split[part])]
    curves = {f"external ({'+'.join(out['external']['sites'])})": (y[ext_idx], ext_prob)}
    if split["internal"] is not None:
        curves = {f"internal ({'+'.join(out['internal']['sites'])}, CV)": (y[split["internal"][0]], split["internal"][1]),
                  **curves}
    reliability_plot(curves, os.path.join(a.out, f"{a.name}_{name}_reliability.png"))
    return out


def _measures_of(a):
    from .external import Measures

    if a.ablation:  # each measure alone, none and all (issue 14 item 3)
        return [Measures(), Measures(intensity="histogram"), Measures(augment=True, augment_copies=a.augment_copies),
                Measures(physical_spacing=True),
                Measures("histogram", True, True, a.augment_copies)]
    return [Measures(a.intensity, a.acq_augment, a.physical_spacing, a.augment_copies)]


def _external_pool(a, folders_train, folders_test, spacing, measures):
    """(cs, sites, is_test, folder of each study) with the measures' standardisation applied."""
    from .external import concat, histogram_standardise, load_pool

    parts = [(f, False) for f in folders_train] + [(f, True) for f in folders_test]
    sets, sites, is_test, folder_of = [], [], [], []
    for f, te in parts:
        cs_f, s_f = load_pool([f], size=a.size, spacing=spacing)
        sets.append(cs_f)
        sites.append(s_f)
        is_test += [te] * len(cs_f)
        folder_of += [f] * len(cs_f)
    cs = concat(sets)
    if measures.intensity == "histogram":
        cs = histogram_standardise(cs)
    return cs, np.concatenate(sites), np.array(is_test, bool), folder_of


def _external_runs(a, ls, measures, check_cache) -> dict:
    """One measures configuration: {test site: split result}."""
    from .external import run_split, training_spacing_of
    from .flags import served_input_checks

    pools: dict = {}

    def pool(spacing):
        key = None if spacing is None else tuple(spacing)
        if key not in pools:
            pools[key] = _external_pool(a, list(a.train), list(a.test or []), spacing, measures)
        return pools[key]

    def checks_for(cs, folder_of, idx):
        if check_cache is None:
            return None
        missing: dict = {}
        for i in idx:
            if (folder_of[i], cs.study_ids[i]) not in check_cache:
                missing.setdefault(folder_of[i], []).append(cs.study_ids[i])
        for f, ids in missing.items():
            for sid, c in served_input_checks(f, a.input_check, ids).items():
                check_cache[(f, sid)] = c
        return {cs.study_ids[i]: check_cache[(folder_of[i], cs.study_ids[i])] for i in idx}

    need_of = lambda cs: cs.channels(a.fusion)  # noqa: E731
    results = {}
    if a.test:  # one model trained on the --train cohorts; each site of the --test cohorts is a test site
        spacing = training_spacing_of(list(a.train)) if measures.physical_spacing else None
        cs, sites, is_test, folder_of = pool(spacing)
        keep = np.array([ls.accepts(c) and bool(cs.avail[i, need_of(cs)].all()) for i, c in enumerate(cs.tumor_class)])
        tr, te = np.where(keep & ~is_test)[0], np.where(keep & is_test)[0]
        if len(tr) == 0 or len(te) == 0:
            raise SystemExit(f"{len(tr)} training / {len(te)} test studies with {a.fusion}")
        split = run_split(cs, ls, tr, te, a.fusion, folds=a.folds, epochs1=a.epochs1, epochs2=a.epochs2, seed=a.seed,
                          measures=measures)
        idx, prob = split["external"]
        for name in sorted(set(sites[te])):
            m = sites[idx] == name
            sub = {"internal": split["internal"], "external": (idx[m], prob[m])}
            results[name] = _split_result(f"{measures.name}_{name}" if a.ablation else name, cs, ls, sites, sub, a,
                                          checks_for(cs, folder_of, idx[m]))
        results["_excluded"] = int((~keep).sum())
        return results
    cs0, sites0, _, _ = pool(None)
    keep0 = np.array([ls.accepts(c) and bool(cs0.avail[i, need_of(cs0)].all()) for i, c in enumerate(cs0.tumor_class)])
    names = sorted(set(sites0[keep0]))
    if len(names) < 2:
        raise SystemExit(f"--leave-one-site-out needs at least two sites; found {names}")
    for name in names:
        spacing = training_spacing_of(list(a.train), sites_excluded=[name]) if measures.physical_spacing else None
        cs, sites, _, folder_of = pool(spacing)
        keep = np.array([ls.accepts(c) and bool(cs.avail[i, need_of(cs)].all()) for i, c in enumerate(cs.tumor_class)])
        tr, te = np.where(keep & (sites != name))[0], np.where(keep & (sites == name))[0]
        if len(tr) == 0 or len(te) == 0:
            raise SystemExit(f"split {name}: {len(tr)} training / {len(te)} test studies with {a.fusion}")
        split = run_split(cs, ls, tr, te, a.fusion, folds=a.folds, epochs1=a.epochs1, epochs2=a.epochs2, seed=a.seed,
                          measures=measures)
        results[name] = _split_result(f"{measures.name}_{name}" if a.ablation else name, cs, ls, sites, split, a,
                                      checks_for(cs, folder_of, te))
        results["_excluded"] = int((~keep).sum())
    return results


def _signed(d, k) -> str:
    return f"{d[k]:+.2f}" if d and k in d else "–"


def _external_table(results, ls, checked: bool) -> str:
    mc = len(ls.classes) > 2
    head = ("| Test site | Training sites | n train / test | ROC-AUC (b/m) internal | external | drop |"
            + (" Macro-AUC internal | external | drop |" if mc else "") + " Accuracy internal | external | ECE internal | ECE external |"
            + (" Input check flagged | ROC-AUC unflagged |" + (" Macro-AUC unflagged |" if mc else "") if checked else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dash = " – |"
    for name, r in results.items():
        i, e, d = r["internal"], r["external"], r.get("drop")
        row = (f"| {name} | {'+'.join(i['sites']) if i else '(no CV)'} | {i['n'] if i else '–'} / {e['n']} | "
               f"{_fmt(i['binary']['roc_auc']) if i else '–'} | {_fmt(e['binary']['roc_auc'])} | "
               f"{_signed(d, 'roc_auc')} |")
        if mc:
            if "multiclass" in e:
                row += (f" {_fmt(i['multiclass']['macro_auc']) if i and 'multiclass' in i else '–'} | "
                        f"{_fmt(e['multiclass']['macro_auc'])} | "
                        f"{_signed(d, 'macro_auc_classes')} |")
            else:
                row += dash * 3
        row += (f" {_fmt(i['binary']['accuracy']) if i else '–'} | {_fmt(e['binary']['accuracy'])} | "
                f"{'–' if not i else format(i['ece_top_label'], '.3f')} | {e['ece_top_label']:.3f} |")
        if checked:
            ic, u = r["input_check"], r["external_unflagged"]
            row += f" {ic['n_flagged']} / {ic['n_checked']} |"
            row += f" {_fmt(u['binary']['roc_auc'])} (n {u['n']}) |" if u else " n/a |"
            if mc:
                row += f" {_fmt(u['multiclass']['macro_auc'])} |" if u and "multiclass" in u else dash
        lines.append(row)
    return "\n".join(lines)


def _ablation_table(all_results, ls) -> str:
    """Rows: measures configuration; columns: external ROC-AUC (and macro-AUC) per test site, and their mean."""
    mc = len(ls.classes) > 2
    sites = [s for s in next(iter(all_results.values()))]
    head = "| Measures | " + " | ".join(f"{s} ROC-AUC" + (f" | {s} macro-AUC" if mc else "") for s in sites) + \
        " | mean ROC-AUC |" + (" mean macro-AUC |" if mc else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cfg, res in all_results.items():
        row, aucs, maucs = f"| {cfg} |", [], []
        for s in sites:
            e = res[s]["external"]
            row += f" {_fmt(e['binary']['roc_auc'])} |"
            aucs.append(e["binary"]["roc_auc"][0])
            if mc:
                m = e.get("multiclass")
                row += f" {_fmt(m['macro_auc'])} |" if m else " – |"
                maucs.append(m["macro_auc"][0] if m else np.nan)
        row += f" {np.nanmean(aucs):.3f} |" + (f" {np.nanmean(maucs):.3f} |" if mc else "")
        lines.append(row)
    return "\n".join(lines)


def cmd_external(a):
    """Train on some sites, test on others (``--train/--test``) or each site in turn (``--leave-one-site-out``);
    with ``--ablation`` once per measures configuration (parotid.evaluation.external.Measures)."""
    if a.leave_one_site_out == bool(a.test):
        raise SystemExit("parotid-eval external: give either --test COHORT.. or --leave-one-site-out")
    folders = list(a.train) + list(a.test or [])
    torch.set_num_threads(a.threads)
    ls = get_label_set(a.label_set)
    if a.no_input_check:
        a.input_check = None
    elif a.input_check is None:
        a.input_check = _served_model_dir()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    check_cache = None if a.input_check is None else {}
    all_results, excluded = {}, 0
    for m in _measures_of(a):
        res = _external_runs(a, ls, m, check_cache)
        excluded = res.pop("_excluded")
        all_results[m.name] = res
        if a.ablation:  # each finished configuration is kept, should a long ablation be stopped
            with open(os.path.join(a.out, f"{a.name}.partial.json"), "w") as f:
                json.dump({"results": all_results, "seconds": round(time.time() - t0, 1)}, f, default=float)
    meta = {"command": " ".join(["parotid-eval"] + (sys.argv[1:] if a.argv is None else a.argv)),
            "cohorts": [os.path.abspath(f) for f in folders], "label_set": ls.name, "fusion": a.fusion, "folds": a.folds,
            "epochs1": a.epochs1, "epochs2": a.epochs2, "seed": a.seed, "n_boot": a.n_boot,
            "measures": {k: vars(m) | {"name": m.name} for k, m in zip(all_results, _measures_of(a))},
            "excluded_missing_sequence": excluded, "seconds": round(time.time() - t0, 1),
            "calibration": "uncalibrated softmax (no temperature)",
            "input_check": None if a.input_check is None else {
                "model_dir": os.path.abspath(a.input_check),
                "components": "physical, intensity, anatomy, tumour_in_box (the served reference and segmentation "
                              "model, as the classify task); no classifier-feature density (the model evaluated here "
                              "is trained by this command)"}}
    results = all_results if a.ablation else next(iter(all_results.values()))
    m0 = _measures_of(a)[0]
    intro = (f"External validation (label set `{ls.name}`, early fusion {'+'.join(a.fusion)}, {a.epochs1}/{a.epochs2} "
             f"epochs, seed {a.seed}). Internal: {a.folds}-fold CV inside the training sites" +
             (" (not run: --folds 0)" if a.folds == 0 else "") + "; external: trained on all training-site studies, "
             f"tested on each test site. 95 % CIs: ROC-AUC DeLong, others percentile bootstrap ({a.n_boot} resamples). "
             f"Drop = internal − external. {excluded} studies lacking a fusion sequence excluded." +
             ("" if a.input_check is None else " Input check: the served one (study + box components, "
              f"`{os.path.relpath(a.input_check)}`); unflagged = studies it passes."))
    if a.ablation:
        md = intro + "\n\nAblation of the measures (external ROC-AUC benign/malignant and macro-AUC):\n\n" + \
            _ablation_table(all_results, ls)
        for k, res in all_results.items():
            md += f"\n\nMeasures `{k}`:\n\n" + _external_table(res, ls, a.input_check is not None)
    else:
        md = intro + f" Measures: `{m0.name}`.\n\n" + _external_table(results, ls, a.input_check is not None)
    write_report(a.out, a.name, {"meta": meta, "results": results}, md)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(prog="parotid-eval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cv", help="stratified k-fold CV ablation (Liu Tables II/III shape)")
    c.add_argument("--cohort", required=True)
    c.add_argument("--out", default="docs/results")
    c.add_argument("--name", default="ablation_cv")
    c.add_argument("--label-set", default="subtype4")
    c.add_argument("--single", nargs="*", default=None, help="sequences for the single-sequence rows (default: all present)")
    c.add_argument("--fusion", nargs="+", default=list(CLASSIFIER_SEQUENCES))
    c.add_argument("--variants", nargs="*", default=None, help="subset of: single late early clinical resnet lof")
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--epochs1", type=int, default=None, help="default 8 (--server-settings: the served recipe's)")
    c.add_argument("--epochs2", type=int, default=None, help="default 40 (--server-settings: the served recipe's)")
    c.add_argument("--resnet-epochs", type=int, default=8)
    c.add_argument("--server-settings", action="store_true",
                   help="train the sequence models as the shipped checkpoints (defaults.SERVED_TRAINING: epochs unless "
                        "given, validation split, early stopping, branch dropout) and report per-subset figures")
    c.add_argument("--subsets", action="store_true",
                   help="also predict each fold's test studies without CE-T1 / DWI+ADC / all but T2 (fusion variants)")
    c.add_argument("--gland", choices=["both", "with", "without"], default="with",
                   help="ResNet rows with / without the gland-mask channel")
    c.add_argument("--size", type=int, default=48)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--n-boot", type=int, default=1000)
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(fn=cmd_cv)
    h = sub.add_parser("holdout", help="evaluate the server checkpoints on a held-out cohort")
    h.add_argument("--cohort", required=True)
    h.add_argument("--models", default="apps/parotid/model")
    h.add_argument("--tasks", nargs="+", default=["classify_malignancy", "classify_subtype"])
    h.add_argument("--out", default="docs/results")
    h.add_argument("--name", default="holdout")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--n-boot", type=int, default=1000)
    h.add_argument("--threads", type=int, default=1)
    h.set_defaults(fn=cmd_holdout)
    e = sub.add_parser("external", help="external validation: train on some sites, test on another (or leave one site out)")
    e.add_argument("--train", "--cohorts", nargs="+", required=True, dest="train",
                   help="training cohort folder(s); with --leave-one-site-out: every cohort of the pool")
    e.add_argument("--test", nargs="+", default=None,
                   help="test cohort folder(s): one model trained on --train, tested on each of their sites")
    e.add_argument("--leave-one-site-out", action="store_true",
                   help="each site of the pooled cohorts in turn is the test site (site: cohort.csv / label info "
                        "'site', else the folder name)")
    e.add_argument("--out", default="docs/results")
    e.add_argument("--name", default="external")
    e.add_argument("--label-set", default="subtype4")
    e.add_argument("--fusion", nargs="+", default=list(CLASSIFIER_SEQUENCES))
    e.add_argument("--folds", type=int, default=5, help="CV folds for the internal (same-site) figures; 0: none")
    e.add_argument("--epochs1", type=int, default=8)
    e.add_argument("--epochs2", type=int, default=40)
    e.add_argument("--size", type=int, default=48)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--n-boot", type=int, default=1000)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--input-check", default=None, metavar="MODEL_DIR",
                   help="served model folder whose input check counts the flagged external studies "
                        "(default: this checkout's apps/parotid/model)")
    e.add_argument("--no-input-check", action="store_true", help="do not run the input check")
    g = e.add_argument_group("measures that make a model travel (parotid.evaluation.external)")
    g.add_argument("--intensity", choices=["percentile", "histogram"], default="percentile",
                   help="per-sequence standardisation: p1/p99 scaling (served models) or histogram (MONAI HistogramNormalize)")
    g.add_argument("--acq-augment", action="store_true",
                   help="acquisition augmentation (MONAI noise, contrast, scale, bias field, smoothing) of the training studies")
    g.add_argument("--augment-copies", type=int, default=1, help="augmented copies per training study")
    g.add_argument("--physical-spacing", action="store_true",
                   help="resample every study to the training studies' median spacing before cutting crops")
    g.add_argument("--ablation", action="store_true",
                   help="run once per configuration: none, each measure alone, all")
    e.set_defaults(fn=cmd_external)
    from .commission import add_parser as add_commission
    from .sites import add_parser as add_sites
    from .subsets import add_parser as add_subsets

    add_subsets(sub)
    add_sites(sub)
    add_commission(sub)
    a = ap.parse_args(argv)
    a.argv = argv
    res = a.fn(a)
    return res if argv is not None else 0  # the console script exits 0; callers with argv get the results


if __name__ == "__main__":
    main()
