"""Held-out metrics of served classifiers per available-sequence subset (issue 15), SYNTHETIC cohorts.

The same studies (those with every sequence of the model) are classified with all sequences and with
the subsets of ``parotid.classification.missing.SUBSETS`` removed, exactly as the server does (zero
channel, absent late-fusion branch). ``served`` says whether the server answers that subset at all
(the model's ``required`` sequences present); a model that does not is still evaluated zero-filled,
to show what it would have said.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from parotid.classification.missing import SUBSETS
from parotid.labels import get_label_set


def subset_metrics(model, cfg: dict, cs, n_boot: int = 1000, seed: int = 0) -> dict:
    from parotid.classification.train import predict_logits

    from .cli import _summarise

    ls = get_label_set(cfg["label_set"])
    seqs = [s for g in cfg["groups"] for s in g]
    keep = [i for i, c in enumerate(cs.tumor_class) if ls.accepts(c) and cs.avail[i, cs.channels(seqs)].all()]
    sub = cs.subset(keep)
    y = sub.labels(ls)
    T = float(cfg.get("temperature", 1.0))
    req = cfg.get("required", cfg["sequences"])
    out = {}
    for name, drop in SUBSETS.items():
        drop = tuple(q for q in drop if q in seqs)
        logits = predict_logits(model, sub, np.arange(len(sub)), cfg["groups"], drop=drop)
        prob = torch.softmax(logits / T, 1).numpy()
        r = {"prob": prob, "score": prob[:, ls.malignant_indices].sum(1), "pred_bin": None}
        s = _summarise(name, y, ls, r, n_boot, seed)
        s["n"] = len(y)
        s["sequences_used"] = [q for q in seqs if q not in drop]
        s["served"] = all(q not in drop for q in req)
        out[name] = s
    return out


def cmd_subsets(a):
    import json
    import sys

    from parotid.classification.data import build_cropset
    from parotid.classification.train import load_checkpoint

    from .cli import _fmt

    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    results, lines = {}, []
    for label, folder in (("before", a.before), ("after", a.models)):
        if not folder:
            continue
        for task in a.tasks:
            path = os.path.join(folder, f"{task}.pt")
            model, cfg = load_checkpoint(path)
            cs = build_cropset(a.cohort, size=cfg["size"], n_slices=cfg["n_slices"])
            res = subset_metrics(model, cfg, cs, a.n_boot, a.seed)
            results.setdefault(label, {})[task] = {"model": f"{cfg.get('fusion_mode', 'early')} fusion "
                                                            f"{'+'.join(cfg['sequences'])}, requires {cfg.get('required')}",
                                                   "subsets": res}
            for name, s in res.items():
                b = s["binary"]
                mc = _fmt(s["multiclass"]["macro_auc"]) if "multiclass" in s else "–"
                lines.append(f"| {label} | {task} | {cfg.get('fusion_mode', 'early')} | {name} | {s['n']} | "
                             f"{'yes' if s['served'] else 'no (422)'} | {_fmt(b['roc_auc'])} | {mc} | {_fmt(b['accuracy'])} |")
    head = ("| Checkpoints | Model | Fusion | Sequences | n | Served | ROC-AUC (b/m) | Macro-AUC | Accuracy (b/m) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    md = (f"SYNTHETIC held-out cohort `{os.path.basename(os.path.abspath(a.cohort))}` (seed never used for training); "
          "the same studies (all model sequences present) with sequences removed as the server does; calibrated "
          f"probabilities; 95 % CIs: percentile bootstrap ({a.n_boot} resamples). 'Served: no' = the server refuses "
          "that subset (422); its figures are what the model says zero-filled.\n\n" + head + "\n" + "\n".join(lines))
    with open(os.path.join(a.out, f"{a.name}.json"), "w") as f:
        json.dump({"meta": {"command": " ".join(["parotid-eval"] + sys.argv[1:]), "cohort": os.path.abspath(a.cohort),
                            "synthetic": True}, "results": results}, f, indent=1, default=float)
    with open(os.path.join(a.out, f"{a.name}.md"), "w") as f:
        f.write(md + "\n")
    print(md)


def add_parser(sub):
    p = sub.add_parser("subsets", help="held-out metrics per available-sequence subset (before/after checkpoints)")
    p.add_argument("--cohort", required=True)
    p.add_argument("--models", default="apps/parotid/model")
    p.add_argument("--before", default=None, help="another checkpoint folder to compare (e.g. the previous models)")
    p.add_argument("--tasks", nargs="+", default=["classify_malignancy", "classify_subtype"])
    p.add_argument("--out", default="docs/results")
    p.add_argument("--name", default="holdout_subsets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(fn=cmd_subsets)
