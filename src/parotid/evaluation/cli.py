"""``parotid-eval``: cross-validated ablation and held-out evaluation of the classifiers (SYNTHETIC cohorts).

    parotid-eval cv --cohort /tmp/cohort101 --out docs/results          # 5-fold CV ablation (000 Tables II/III)
    parotid-eval holdout --cohort /tmp/cohort202 --models apps/parotid/model --out docs/results
    parotid-eval external --train /tmp/siteA --test /tmp/siteB --out docs/results     # train on sites, test on another
    parotid-eval external --leave-one-site-out --cohorts /tmp/siteA /tmp/siteB /tmp/siteC
    parotid-eval subsets --cohort /tmp/cohort500 --models apps/parotid/model --write-tables   # per sequence subset

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

from .metrics import (binary_report, bootstrap_ci, expected_calibration_error, multiclass_metrics, per_class_prf,
                      prf_report, youden_threshold)
from .plots import confusion_plot, reliability_plot, roc_pr_plot


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
        out["subsets"] = {sub: _subset_summary(y, label_set, p, n_boot, seed) for sub, p in r["subsets"].items()}
    return out


def _subset_summary(y, label_set, prob, n_boot, seed) -> dict:
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
    from parotid.classification.train import SERVED_TRAINING
    from .cv import run_ablation

    torch.set_num_threads(a.threads)
    ls = get_label_set(a.label_set)
    train_kw = None
    if not a.server_settings:
        a.epochs1 = 8 if a.epochs1 is None else a.epochs1
        a.epochs2 = 40 if a.epochs2 is None else a.epochs2
    else:  # the shipped checkpoints' recipe (train.SERVED_TRAINING), per-subset figures too
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
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "results": summary}, f, indent=1, default=float)
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
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"\n[{meta['seconds']} s]")


def cmd_holdout(a):
    from parotid.classification.data import build_cropset
    from parotid.classification.predict import mc_dropout
    from parotid.classification.train import load_checkpoint, predict_logits

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
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump({"meta": {"command": " ".join(["parotid-eval"] + sys.argv[1:]), "synthetic": True}, "results": all_out}, f, indent=1, default=float)
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def _split_result(name, cs, ls, sites, split, a):
    """Internal vs external summaries of one split, the drop, and per-study predictions."""
    y = cs.labels(ls)
    out = {}
    for part in ("internal", "external"):
        idx, prob = split[part]
        r = {"prob": prob, "score": prob[:, ls.malignant_indices].sum(1), "pred_bin": None}
        out[part] = _summarise(part, y[idx], ls, r, a.n_boot, a.seed)
        out[part]["n"] = int(len(idx))
        out[part]["sites"] = sorted(set(sites[idx]))
    drop = {k: out["internal"]["binary"][k][0] - out["external"]["binary"][k][0]
            for k in ("roc_auc", "pr_auc", "accuracy", "sensitivity", "specificity")}
    if "multiclass" in out["external"] and "multiclass" in out["internal"]:
        for k in ("macro_auc", "micro_auc", "accuracy"):
            drop[f"{k}_classes"] = out["internal"]["multiclass"][k][0] - out["external"]["multiclass"][k][0]
    drop["ece_top_label"] = out["external"]["ece_top_label"] - out["internal"]["ece_top_label"]  # increase
    out["drop"] = drop
    out["predictions"] = [{"study_id": cs.study_ids[i], "site": str(sites[i]), "part": part, "y": int(y[i]),
                           "prob": [float(v) for v in p]}
                          for part in ("internal", "external") for i, p in zip(*split[part])]
    reliability_plot({f"internal ({'+'.join(out['internal']['sites'])}, CV)": (y[split['internal'][0]], split["internal"][1]),
                      f"external ({'+'.join(out['external']['sites'])})": (y[split["external"][0]], split["external"][1])},
                     os.path.join(a.out, f"{a.name}_{name}_reliability.png"))
    return out


def cmd_external(a):
    """Train on some sites, test on another (``--train/--test``) or each site in turn (``--leave-one-site-out``)."""
    from .external import concat, load_pool, run_split

    if a.leave_one_site_out == bool(a.test):
        raise SystemExit("parotid-eval external: give either --test COHORT or --leave-one-site-out")
    folders = list(a.train) + ([a.test] if a.test else [])
    torch.set_num_threads(a.threads)
    ls = get_label_set(a.label_set)
    cs, sites = load_pool(list(a.train), size=a.size)
    is_test = np.zeros(len(cs), bool)
    if a.test:  # every study of the --test folder is a test study, whatever its site
        cs_te, sites_te = load_pool([a.test], size=a.size)
        cs, sites = concat([cs, cs_te]), np.concatenate([sites, sites_te])
        is_test = np.r_[is_test, np.ones(len(cs_te), bool)]
    need = cs.channels(a.fusion)
    keep = np.array([ls.accepts(c) and bool(cs.avail[i, need].all()) for i, c in enumerate(cs.tumor_class)])
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if a.test:
        splits = {"+".join(sorted(set(sites[is_test]))): (np.where(keep & ~is_test)[0], np.where(keep & is_test)[0])}
    else:
        names = sorted(set(sites[keep]))
        if len(names) < 2:
            raise SystemExit(f"--leave-one-site-out needs at least two sites; found {names}")
        splits = {s: (np.where(keep & (sites != s))[0], np.where(keep & (sites == s))[0]) for s in names}
    results = {}
    for name, (tr, te) in splits.items():
        if len(tr) == 0 or len(te) == 0:
            raise SystemExit(f"split {name}: {len(tr)} training / {len(te)} test studies with {a.fusion}")
        split = run_split(cs, ls, tr, te, a.fusion, folds=a.folds, epochs1=a.epochs1, epochs2=a.epochs2, seed=a.seed)
        results[name] = _split_result(name, cs, ls, sites, split, a)
    meta = {"command": " ".join(["parotid-eval"] + (sys.argv[1:] if a.argv is None else a.argv)),
            "cohorts": [os.path.abspath(f) for f in folders], "label_set": ls.name, "fusion": a.fusion, "folds": a.folds,
            "epochs1": a.epochs1, "epochs2": a.epochs2, "seed": a.seed, "n_boot": a.n_boot,
            "excluded_missing_sequence": int((~keep).sum()), "seconds": round(time.time() - t0, 1),
            "calibration": "uncalibrated softmax (no temperature)", "input_check": None}
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=float)
    mc = len(ls.classes) > 2
    head = ("| Test site | Training sites | n train / test | ROC-AUC (b/m) internal | external | drop |"
            + (" Macro-AUC internal | external | drop |" if mc else "") + " Accuracy internal | external | ECE internal | ECE external |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        i, e, d = r["internal"], r["external"], r["drop"]
        row = (f"| {name} | {'+'.join(i['sites'])} | {i['n']} / {e['n']} | {_fmt(i['binary']['roc_auc'])} | "
               f"{_fmt(e['binary']['roc_auc'])} | {d['roc_auc']:+.2f} |")
        if mc:
            row += (f" {_fmt(i['multiclass']['macro_auc'])} | {_fmt(e['multiclass']['macro_auc'])} | "
                    f"{d['macro_auc_classes']:+.2f} |" if "multiclass" in e and "multiclass" in i else " – | – | – |")
        row += (f" {_fmt(i['binary']['accuracy'])} | {_fmt(e['binary']['accuracy'])} | {i['ece_top_label']:.3f} | "
                f"{e['ece_top_label']:.3f} |")
        lines.append(row)
    md = (f"External validation (label set `{ls.name}`, early fusion {'+'.join(a.fusion)}, {a.epochs1}/{a.epochs2} epochs, "
          f"seed {a.seed}). Internal: {a.folds}-fold CV inside the training sites; external: trained on all training-site "
          f"studies, tested on the test site. 95 % CIs: ROC-AUC DeLong, others percentile bootstrap ({a.n_boot} resamples). Drop = internal − external. "
          f"{meta['excluded_missing_sequence']} studies lacking a fusion sequence excluded.\n\n" + "\n".join(lines))
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(md + "\n")
    print(md)
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
    c.add_argument("--fusion", nargs="+", default=["T2", "CET1", "DWI_B1000", "ADC"])
    c.add_argument("--variants", nargs="*", default=None, help="subset of: single late early clinical resnet lof")
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--epochs1", type=int, default=None, help="default 8 (--server-settings: the served recipe's)")
    c.add_argument("--epochs2", type=int, default=None, help="default 40 (--server-settings: the served recipe's)")
    c.add_argument("--resnet-epochs", type=int, default=8)
    c.add_argument("--server-settings", action="store_true",
                   help="train the sequence models as the shipped checkpoints (train.SERVED_TRAINING: epochs unless "
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
    e.add_argument("--test", default=None, help="test cohort folder (another site)")
    e.add_argument("--leave-one-site-out", action="store_true",
                   help="each site of the pooled cohorts in turn is the test site (site: cohort.csv / label info "
                        "'site', else the folder name)")
    e.add_argument("--out", default="docs/results")
    e.add_argument("--name", default="external")
    e.add_argument("--label-set", default="subtype4")
    e.add_argument("--fusion", nargs="+", default=["T2", "CET1", "DWI_B1000", "ADC"])
    e.add_argument("--folds", type=int, default=5, help="CV folds for the internal (same-site) figures")
    e.add_argument("--epochs1", type=int, default=8)
    e.add_argument("--epochs2", type=int, default=40)
    e.add_argument("--size", type=int, default=48)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--n-boot", type=int, default=1000)
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(fn=cmd_external)
    from .subsets import add_parser as add_subsets

    add_subsets(sub)
    a = ap.parse_args(argv)
    a.argv = argv
    return a.fn(a)


if __name__ == "__main__":
    main()
