"""Stratified k-fold cross-validated ablation shaped like Liu et al. (seed 000) Tables II/III.

All variants are trained on the SAME folds (``StratifiedKFold(shuffle=True, random_state=seed)``)
with the fold's training studies only, and predict the fold's test studies; metrics are computed on
the pooled out-of-fold predictions with percentile-bootstrap 95 % CIs.

Variants (label set ``--label-set``, default subtype4; benign/malignant metrics use
P(malignant) = sum of the malignant classes' probabilities):

* ``<SEQ> single image``   — Liu stage-1 image network on one sequence, central slice only;
* ``<SEQ> single sequence`` — Liu two-stage sequence model on one sequence;
* ``early fusion``          — sequences as channels of one CNN branch (two-stage);
* ``late fusion Add/Spl``   — one branch per sequence (the single-sequence image networks, frozen),
  slice features added / concatenated before the transformer;
* ``early fusion + clinical variables, ours inspired by 002`` — early fusion with age/sex/smoker
  concatenated to the pooled feature. In seed 002 the radiologists, not the model, used clinical data;
  feeding them to the network is our variant;
* ``ResNet-18 slice classifier (+ gland mask), ours inspired by 001`` — ``ResNet18SliceClassifier``
  (conv1..layer3, 48 px box crops, our sequences + a binary gland mask as channels, a tumour-free class)
  where 001 used a 2-block ResNet-18 on 224 px T1/CE-T1/T2 + gland-image channels; patient probabilities by
  averaging over UNIQUE tumour slices, patient classes also by 001's rule on unique slices
  (``classification.slice_classifier``), and slice-level outputs (unique tumour slices + tumour-free slices)
  for 001's slice-level metrics;
* ``L2-softmax + LOF, ours after 003`` — image network (ResNet-18 conv1..layer2 + RoI-Align, not 003's
  VGG16; no CURET texture class) with L2-constrained softmax (alpha 80), LOF (k = 5, novelty) fitted on
  benign training patients' features; malignancy score = LOF outlier score; operating point: Youden
  threshold on the ROC (as 003), scikit-learn's default LOF offset kept for comparison.

``train_kw`` (``parotid-eval cv --server-settings``): the sequence models are trained as the served
checkpoints are (``defaults.SERVED_TRAINING``: a validation part of each fold's training patients picks the
best epoch and stops early, optional sequences dropped in training, branch dropout); with ``subsets`` the
fusion variants also predict each fold's test studies with sequences removed as the server does
(``parotid.subsets.named_subsets``: all, no CE-T1, no DWI/ADC, T2 only).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from parotid.classification.data import CropSet
from parotid.classification.slice_classifier import predict_patients_001
from parotid.classification.baselines import lof_scores, train_slice_resnet
from parotid.classification.liu import fit_sequence_model, predict_logits, slice_outputs, train_image_net
from parotid.subsets import named_subsets


def run_ablation(cs: CropSet, label_set, single_seqs, fusion_seqs, folds: int = 5, seed: int = 0,
                 epochs1: int = 8, epochs2: int = 40, resnet_epochs: int = 8, gland: str = "with",
                 variants: set[str] | None = None, train_kw: dict | None = None, subsets: bool = False,
                 log=print) -> dict:
    """Returns {variant: {"prob": (n, C) or None, "score": (n,) malignancy score, "pred_bin": (n,) or None,
    "pred_cls": (n,) or None, "threshold": "youden" (score variants), "slice": {"y", "prob"} (slice classifier),
    "subsets": {subset name: (n, C)} (fusion variants, with `subsets`)}} on out-of-fold predictions, plus "_y"
    and timing. Variants: single, late, early, clinical, resnet, lof (None: all). `train_kw`: extra
    ``fit_sequence_model`` arguments of every sequence model (val_frac, patience1/2, branch_dropout, optional)."""
    y = cs.labels(label_set)
    n, C = len(y), len(label_set.classes)
    mal = label_set.malignant_indices
    res: dict = {}

    def put(name, idx, prob=None, score=None, pred_bin=None, pred_cls=None):
        r = res.setdefault(name, {"prob": np.full((n, C), np.nan) if prob is not None else None,
                                  "score": np.full(n, np.nan), "pred_bin": None, "pred_cls": None})
        if prob is not None:
            r["prob"][idx] = prob
            score = prob[:, mal].sum(1) if score is None else score
        r["score"][idx] = score
        if pred_bin is not None:
            if r["pred_bin"] is None:
                r["pred_bin"] = np.zeros(n, int)
            r["pred_bin"][idx] = pred_bin
        if pred_cls is not None:
            if r["pred_cls"] is None:
                r["pred_cls"] = np.zeros(n, int)
            r["pred_cls"][idx] = pred_cls

    want = (lambda v: True) if variants is None else (lambda v: v in variants)
    kw = dict(train_kw or {})
    subset_drops = {name: [q for q in fusion_seqs if q not in used] for name, used in named_subsets(fusion_seqs).items()}

    def put_subsets(name, model, te, groups, clinical=False):
        """Out-of-fold probabilities of the test studies with each subset's sequences removed."""
        if not subsets:
            return
        for sub, drop in subset_drops.items():
            p = res[name].setdefault("subsets", {}).setdefault(sub, np.full((n, C), np.nan))
            p[te] = torch.softmax(predict_logits(model, cs, te, groups, clinical, drop=drop), 1).numpy()
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    timing = {}
    for f, (tr, te) in enumerate(tqdm(list(skf.split(np.zeros(n), y)), desc="folds")):
        nets: dict = {}
        mid = cs.slices.shape[1] // 2

        def timed(name, fn):
            t = time.time()
            out = fn()
            timing[name] = timing.get(name, 0.0) + time.time() - t
            return out

        for s in single_seqs:
            if not (want("single") or want("late")):
                break
            m, _ = timed(f"{s} single sequence", lambda: fit_sequence_model(
                cs, tr, label_set, [[s]], "spl", epochs1, epochs2, seed + f, nets=nets, desc=f"f{f} {s}", **kw))
            put(f"{s} single sequence", te, torch.softmax(predict_logits(m, cs, te, [[s]]), 1).numpy())
            net = next(v for k, v in nets.items() if k[:2] == ((s,), None))  # (+ validation ids with val_frac)
            lg = slice_outputs(net, cs, te, cs.channels([s]))[1][:, mid]
            put(f"{s} single image", te, torch.softmax(lg, 1).numpy())
        if want("late") and all(any(k[:2] == ((s,), None) for k in nets) for s in fusion_seqs):
            for fu in ("add", "spl"):
                name = f"late fusion {'Add' if fu == 'add' else 'Spl'} ({'+'.join(fusion_seqs)})"
                m, _ = timed(name, lambda: fit_sequence_model(cs, tr, label_set, [[s] for s in fusion_seqs], fu,
                                                              epochs1, epochs2, seed + f, nets=nets,
                                                              desc=f"f{f} late {fu}", **kw))
                put(name, te, torch.softmax(predict_logits(m, cs, te, [[s] for s in fusion_seqs]), 1).numpy())
                put_subsets(name, m, te, [[s] for s in fusion_seqs])
        if want("early"):
            name = f"early fusion ({'+'.join(fusion_seqs)})"
            m, _ = timed(name, lambda: fit_sequence_model(cs, tr, label_set, [list(fusion_seqs)], "spl", epochs1,
                                                          epochs2, seed + f, nets=nets, desc=f"f{f} early", **kw))
            put(name, te, torch.softmax(predict_logits(m, cs, te, [list(fusion_seqs)]), 1).numpy())
            put_subsets(name, m, te, [list(fusion_seqs)])
        if want("clinical"):
            name = f"early fusion + clinical variables, ours inspired by 002 ({'+'.join(fusion_seqs)})"
            m, _ = timed(name, lambda: fit_sequence_model(cs, tr, label_set, [list(fusion_seqs)], "spl", epochs1,
                                                          epochs2, seed + f, nets=nets, clinical=True, **kw))
            put(name, te, torch.softmax(predict_logits(m, cs, te, [list(fusion_seqs)], clinical=True), 1).numpy())
        if want("resnet"):
            for g in {"both": [False, True], "with": [True], "without": [False]}[gland]:
                name = f"ResNet-18 slice classifier{' + gland mask' if g else ''}, ours inspired by 001 ({'+'.join(fusion_seqs)})"
                net = timed(name, lambda: train_slice_resnet(cs, tr, label_set, list(fusion_seqs), g, resnet_epochs,
                                                             seed=seed + f, desc=f"f{f} resnet"))
                out = predict_patients_001(net, cs, te, list(fusion_seqs), g, label_set)
                put(name, te, out.prob, pred_bin=np.isin(out.rule, mal).astype(int), pred_cls=out.rule)
                sl = res[name].setdefault("slice", {"y": [], "prob": []})
                sl["y"].append(out.slice_y)
                sl["prob"].append(out.slice_prob)
        if want("lof") and mal:
            name = f"L2-softmax + LOF, ours after 003 ({'+'.join(fusion_seqs)})"

            def lof():
                ch = cs.channels(fusion_seqs)
                net = train_image_net(cs, tr, ch, y, C, epochs1, seed=seed + f, l2_alpha=80.0, desc=f"f{f} l2")
                return lof_scores(net, cs, tr, te, ch, label_set, n_neighbors=5)

            score, outlier = timed(name, lof)
            put(name, te, score=score, pred_bin=outlier.astype(int))  # pred_bin: scikit-learn's default offset
            res[name]["threshold"] = "youden"
        log(f"fold {f + 1}/{folds} done")
    for r in res.values():
        if "slice" in r:
            r["slice"] = {k: np.concatenate(v) for k, v in r["slice"].items()}
    res["_y"] = y
    res["_timing_s"] = timing
    return res
