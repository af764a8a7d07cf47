"""Training of the classification models (two-stage Liu model; ours: ResNet-18 slice classifier inspired by 001, L2-softmax + LOF after 003).

Reproduce the committed server checkpoints (synthetic cohort, CPU)::

    parotid-synth --n 240 --seed 101 --out /tmp/cohort101
    python -m parotid.classification.train --cohort /tmp/cohort101 --out apps/parotid/model

which writes ``classify_subtype.pt`` and ``classify_malignancy.pt`` (+ ``classify_*.json`` with the
training statistics). ``--label-sets`` selects other label sets (e.g. ``sinonasal3`` for a cohort
labelled with that set).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from parotid.labels import get_label_set
from parotid.model_space import SPACING_KEY, file_spacing, training_spacing

from . import engine
from .data import CropSet, build_cropset, read_cohort
from .missing import cropset_presence, dropout_masks
from .models import ImageNet, ResNet18SliceClassifier, SequenceModel, fit_temperature

VERSION = "0.1.0"
# The sequences of Liu et al.'s best model (T2, CE-T1, DWI b1000; they fused them LATE, one branch per
# sequence) + ADC. How they are fused is `train_task_model(fusion=...)`, recorded as the checkpoint's
# `fusion_mode`.
DEFAULT_SEQS = ("T2", "CET1", "DWI_B1000", "ADC")
# Served variant: late fusion Spl, the winner of the CV ablation at the server's settings (docs/results.md).
DEFAULT_FUSION = "spl"
DEFAULT_REQUIRED = ("T2",)  # the others may be missing: their branches drop out (late) / zero channels (early)
DEFAULT_BRANCH_DROPOUT = 0.5  # stage 2 also sees the training studies with optional branches removed
TASK_LABEL_SETS = {"classify_subtype": "subtype4", "classify_malignancy": "benign_malignant"}
# The training settings of the shipped checkpoints (``train_task_model``'s defaults, the recipe of
# scripts/train_models.sh): what ``parotid-eval cv --server-settings`` cross-validates.
SERVED_TRAINING = {"epochs1": 12, "epochs2": 60, "val_frac": 0.2, "patience1": 4, "patience2": 15,
                   "branch_dropout": DEFAULT_BRANCH_DROPOUT, "required": DEFAULT_REQUIRED}


def _seed(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def class_weights(y: np.ndarray, n: int) -> torch.Tensor:
    cnt = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(cnt > 0, cnt.sum() / np.maximum(cnt, 1) / n, 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _augment(x: torch.Tensor, box: torch.Tensor, rng: np.random.Generator):
    """Random left-right flip (J axis, box flipped too) and per-channel gain 0.9..1.1."""
    x = x.clone()
    box = box.clone()
    S = x.shape[-1]
    flip = torch.from_numpy(rng.random(x.shape[0]) < 0.5)
    if flip.any():
        x[flip] = x[flip].flip(-1)
        b = box[flip]
        box[flip] = torch.stack([S - b[:, 2], b[:, 1], S - b[:, 0], b[:, 3]], 1)
    gain = torch.from_numpy(rng.uniform(0.9, 1.1, (x.shape[0], x.shape[1], 1, 1)).astype(np.float32))
    return x * gain, box


# --------------------------------------------------------------------------- stage 1 (image network)
def train_image_net(cs: CropSet, idx, channels: list[int], y: np.ndarray, n_classes: int, epochs: int = 12,
                    lr: float = 1e-3, seed: int = 0, per_study: int = 2, batch: int = 64,
                    l2_alpha: float | None = None, desc: str = "stage1", drop_channels=(), p_drop: float = 0.1,
                    val_idx=(), patience: int = 0, dropout: float = 0.5, augment: bool = True,
                    stats: dict | None = None) -> ImageNet:
    """Liu stage 1: slice classifier (crop + roi_align on the box) on tumour slices, label = patient class.
    Trained on MONAI's SupervisedTrainer (parotid.classification.engine); with `val_idx` (studies) the
    weights of the best validation epoch are kept and training stops after `patience` epochs without
    improvement. `stats` (a dict) receives MONAI Label-style training statistics."""
    _seed(seed)
    idx = np.asarray(idx)
    net = ImageNet(len(channels), n_classes, l2_alpha=l2_alpha, dropout=dropout)
    train_ds = engine.TumourSliceDataset(cs, idx, channels, y, per_study, seed, augment, drop_channels, p_drop)
    val_ds = engine.AllSlicesDataset(cs, val_idx, channels, y) if len(val_idx) else None
    st = engine.run_supervised(
        net, train_ds, val_ds, engine.WeightedCrossEntropy(class_weights(y[idx], n_classes)),
        lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-4), epochs, batch,
        engine.prepare_image_box, seed=seed, patience=patience,
        scheduler_fn=lambda opt, steps: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps),
        desc=desc, min_epochs=int(np.ceil(0.3 * epochs)))  # early stopping after one-cycle's warm-up (30 %)
    st["study_ids"] = {"train": [str(cs.study_ids[i]) for i in train_ds.idx],
                       "validation": [str(cs.study_ids[i]) for i in (val_ds.idx if val_ds else [])]}
    if stats is not None:
        stats.update(st)
    return net


@torch.no_grad()
def slice_outputs(net: ImageNet, cs: CropSet, idx, channels: list[int], flip: bool = False, batch: int = 256):
    """Features (n, N, D) and logits (n, N, classes) of every slice of the studies `idx`."""
    net.eval()
    idx = np.asarray(idx)
    N, S = cs.slices.shape[1], cs.slices.shape[-1]
    feats, logits = [], []
    for b in range(0, len(idx), max(1, batch // N)):
        ii = idx[b:b + max(1, batch // N)]
        x = torch.from_numpy(cs.slices[ii][:, :, channels].astype(np.float32)).reshape(len(ii) * N, len(channels), S, S)
        box = torch.from_numpy(cs.box[ii]).repeat_interleave(N, 0)
        if flip:
            x = x.flip(-1)
            box = torch.stack([S - box[:, 2], box[:, 1], S - box[:, 0], box[:, 3]], 1)
        f = net.features(x, box)
        feats.append(f.reshape(len(ii), N, -1))
        logits.append(net.head(f).reshape(len(ii), N, -1))
    return torch.cat(feats), torch.cat(logits)


# --------------------------------------------------------------------------- stage 2 (sequence network)
def train_sequence_head(model: SequenceModel, feats: torch.Tensor, y: np.ndarray, clinical: torch.Tensor | None = None,
                        epochs: int = 60, lr: float = 1e-3, seed: int = 0, batch: int = 32,
                        val_feats: torch.Tensor | None = None, val_y: np.ndarray | None = None,
                        val_clinical: torch.Tensor | None = None, patience: int = 0,
                        stats: dict | None = None, optimizer_fn=None) -> SequenceModel:
    """Liu stage 2: transformer + max-pool + FC over frozen slice features (branches untouched), on
    MONAI's SupervisedTrainer; with validation features the best validation epoch's weights are kept.
    `optimizer_fn(params) -> optimizer` replaces AdamW(lr, weight decay 1e-4)."""
    _seed(seed)
    n_classes = model.head[-1].out_features
    head = engine.SequenceHead(model)
    frozen = [p for p in model.branches.parameters() if p.requires_grad]
    for p in frozen:  # branches are not trained in stage 2 (and DDP must not wait for their gradients)
        p.requires_grad_(False)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    val_ds = engine.FeatureDataset(val_feats, val_y, val_clinical) if val_feats is not None and len(val_feats) else None
    try:
        st = engine.run_supervised(
            head, engine.FeatureDataset(feats, y, clinical), val_ds,
            engine.WeightedCrossEntropy(class_weights(y, n_classes)),
            lambda m: (optimizer_fn or (lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=1e-4)))(params(m)), epochs, batch,
            engine.prepare_features, seed=seed, patience=patience, desc="stage2")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if stats is not None:
        stats.update(st)
    model.eval()
    return model


def sequence_features(model: SequenceModel, nets: list[ImageNet], cs: CropSet, idx, chans: list[list[int]], flip=False,
                      present: torch.Tensor | None = None, branch_feats: list[torch.Tensor] | None = None):
    """Fused slice features; `present` (n, branches): absent branches contribute zeros (missing.py).
    `branch_feats`: the branches' slice features when already computed."""
    fs = branch_feats if branch_feats is not None else [slice_outputs(n, cs, idx, c, flip)[0] for n, c in zip(nets, chans)]
    if present is not None:
        fs = [f * present[:, b].to(f.dtype)[:, None, None] for b, f in enumerate(fs)]
    return model.fuse(fs)


def patient_split(idx, y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) of the study indices `idx`: a stratified `frac` of the studies (one study per
    patient in these cohorts, so a patient-level split); stratification is dropped when a class has
    a single study."""
    from sklearn.model_selection import train_test_split

    idx = np.asarray(idx)
    if frac <= 0 or len(idx) < 4:
        return idx, np.array([], int)
    counts = np.bincount(y[idx])
    try:
        rest, part = train_test_split(idx, test_size=frac, random_state=seed,
                                      stratify=y[idx] if counts[counts > 0].min() >= 2 else None)
    except ValueError:  # fewer test studies than classes
        rest, part = train_test_split(idx, test_size=frac, random_state=seed)
    return np.sort(rest), np.sort(part)


def fit_sequence_model(cs: CropSet, train_idx, label_set, groups: list[list[str]], fusion: str = "spl",
                       epochs1: int = 12, epochs2: int = 60, seed: int = 0, clinical: bool = False,
                       l2_alpha: float | None = None, nets: dict | None = None, val_frac: float = 0.0, desc="",
                       optional: tuple = (), branch_dropout: float = 0.0, patience1: int = 4, patience2: int = 15):
    """Two-stage training. `nets` caches stage-1 image networks by group (for ablations: the late-fusion
    branches ARE the single-sequence image networks). Returns (model, info). With `val_frac` > 0 a
    stratified part of `train_idx` is the validation set of both stages (best-epoch weights, early
    stopping after `patience1`/`patience2` epochs); its studies are not trained on but do select the
    model, so they are no calibration set (``train_task_model`` calibrates on other patients).
    A single-sequence branch is trained on the studies that have its sequence; stage 2 zeroes missing
    branches and, with `branch_dropout` > 0, adds copies of the studies with optional branches dropped
    (missing.py)."""
    y_all = cs.labels(label_set)
    train_idx = np.asarray(train_idx)
    n_classes = len(label_set.classes)
    chans = [cs.channels(g) for g in groups]
    nets = {} if nets is None else nets
    fit_idx, val_idx = patient_split(train_idx, y_all, val_frac, seed)
    branch_nets, stats = [], {"stage1": {}, "stage2": {}}
    for g, c in zip(groups, chans):
        key = (tuple(g), l2_alpha) + ((tuple(val_idx),) if len(val_idx) else ())
        if key not in nets:
            has = fit_idx[cs.avail[fit_idx][:, c].all(1)] if len(g) == 1 else fit_idx
            has = has if len(has) else fit_idx  # no study has it: the branch only ever sees zeros
            st: dict = {}
            nets[key] = train_image_net(cs, has, c, y_all, n_classes, epochs1, seed=seed, l2_alpha=l2_alpha,
                                        desc=f"{desc} stage1 {'+'.join(g)}", val_idx=val_idx, patience=patience1,
                                        drop_channels=[i for i, q in enumerate(g) if q in optional and len(g) > 1],
                                        stats=st)
            stats["stage1"]["+".join(g)] = st
        branch_nets.append(nets[key])
    model = SequenceModel([list(range(sum(map(len, chans[:i])), sum(map(len, chans[:i + 1])))) for i in range(len(chans))],
                          n_classes, cs.slices.shape[1], fusion, n_clinical=3 if clinical else 0, l2_alpha=l2_alpha)
    for br, n in zip(model.branches, branch_nets):
        br.load_state_dict(n.state_dict())
    pres = cropset_presence(cs, groups, fit_idx)
    copies = [pres, pres]
    if branch_dropout > 0 and len(groups) > 1:
        rng = np.random.default_rng(seed + 7)
        copies += [pres & dropout_masks(groups, [q for g in groups for q in g if q not in optional], len(fit_idx),
                                        branch_dropout, rng) for _ in range(2)]
    per_branch = [[slice_outputs(n, cs, fit_idx, c, flip)[0] for n, c in zip(branch_nets, chans)] for flip in (False, True)]
    feats = [sequence_features(model, branch_nets, cs, fit_idx, chans, present=m, branch_feats=per_branch[k % 2])
             for k, m in enumerate(copies)]
    clin = torch.from_numpy(cs.clinical[fit_idx]) if clinical else None
    vf = (sequence_features(model, branch_nets, cs, val_idx, chans, present=cropset_presence(cs, groups, val_idx))
          if len(val_idx) else None)
    train_sequence_head(model, torch.cat(feats), np.concatenate([y_all[fit_idx]] * len(copies)),
                        None if clin is None else torch.cat([clin] * len(copies)), epochs2, seed=seed,
                        val_feats=vf, val_y=y_all[val_idx], patience=patience2, stats=stats["stage2"],
                        val_clinical=torch.from_numpy(cs.clinical[val_idx]) if clinical and len(val_idx) else None)
    stats["stage2"]["study_ids"] = {"train": [str(cs.study_ids[i]) for i in fit_idx],
                                    "validation": [str(cs.study_ids[i]) for i in val_idx]}
    return model, {"temperature": 1.0, "fit_idx": fit_idx, "val_idx": val_idx, "branch_nets": branch_nets,
                   "stats": stats}


@torch.no_grad()
def predict_logits(model: SequenceModel, cs: CropSet, idx, groups: list[list[str]], clinical: bool = False,
                   drop=()) -> torch.Tensor:
    """Logits of cohort rows `idx` from the sequences they have (minus `drop`: as if those were missing)."""
    model.eval()
    chans = [c for g in groups for c in cs.channels(g)]
    out = []
    for b in range(0, len(idx), 16):
        ii = np.asarray(idx)[b:b + 16]
        x = torch.from_numpy(cs.slices[ii][:, :, chans].astype(np.float32))
        for q in drop:  # as the server: a missing sequence is a zero channel and an absent branch
            if q in cs.sequences and q in [s for g in groups for s in g]:
                x[:, :, [s for g in groups for s in g].index(q)] = 0.0
        clin = torch.from_numpy(cs.clinical[ii]) if clinical else None
        out.append(model(x, torch.from_numpy(cs.box[ii]), clin, cropset_presence(cs, groups, ii, drop)))
    return torch.cat(out)


# --------------------------------------------------------------------------- slice classifier (ours, inspired by 001)
def train_slice_resnet(cs: CropSet, train_idx, label_set, seqs: list[str], gland: bool = False, epochs: int = 10,
                       lr: float = 1e-3, seed: int = 0, per_study: int = 2, batch: int = 64, desc="resnet") -> ResNet18SliceClassifier:
    _seed(seed)
    rng = np.random.default_rng(seed)
    y_all = cs.labels(label_set)
    n_classes = len(label_set.classes)
    chans = cs.channels(seqs)
    net = ResNet18SliceClassifier(len(chans) + int(gland), n_classes)
    train_idx = np.asarray(train_idx)
    steps = epochs * int(np.ceil(len(train_idx) * (per_study + 1) / batch))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    yy = np.concatenate([y_all[train_idx], np.full(len(train_idx), n_classes)])
    crit = nn.CrossEntropyLoss(weight=class_weights(yy, n_classes + 1))
    N, M = cs.slices.shape[1], cs.free.shape[1]
    net.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False, mininterval=10):
        items = [(s, k, 0) for s in train_idx for k in rng.choice(N, per_study, replace=False)]
        items += [(s, int(rng.choice(np.nonzero(cs.free_valid[s])[0])), 1) for s in train_idx if cs.free_valid[s].any()]
        items = np.array(items)
        rng.shuffle(items)
        for b in range(0, len(items), batch):
            it = items[b:b + batch]
            x, y = _slice_batch(cs, it, chans, gland, y_all, n_classes)
            x, _ = _augment(x, torch.zeros(len(x), 4), rng)
            loss = crit(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    return net


def _slice_batch(cs, items, chans, gland, y_all, n_classes):
    xs, ys = [], []
    for s, k, free in items:
        if free:
            x = cs.free[s, k][chans].astype(np.float32)
            g = cs.free_gland[s, k].astype(np.float32)
            ys.append(n_classes)
        else:
            x = cs.slices[s, k][chans].astype(np.float32)
            g = cs.gland[s, k].astype(np.float32)
            ys.append(y_all[s])
        xs.append(np.concatenate([x, g]) if gland else x)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


# --------------------------------------------------------------------------- L2-softmax + LOF (seed 003)
def lof_scores(net: ImageNet, cs: CropSet, train_idx, test_idx, channels, label_set, n_neighbors: int = 5):
    """LocalOutlierFactor(novelty) fitted on benign training patients' mean L2-normalised features;
    returns (malignancy score = -score_samples, predicted malignant = outlier) for `test_idx`."""
    from sklearn.neighbors import LocalOutlierFactor

    def feats(idx):
        f = slice_outputs(net, cs, idx, channels)[0]
        f = F.normalize(f, dim=-1).mean(1)
        return F.normalize(f, dim=-1).numpy()

    y = cs.labels(label_set)
    mal = np.isin(y, label_set.malignant_indices)
    tr = np.asarray(train_idx)
    lof = LocalOutlierFactor(n_neighbors=n_neighbors, novelty=True).fit(feats(tr[~mal[tr]]))
    ft = feats(test_idx)
    return -lof.score_samples(ft), lof.predict(ft) == -1


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str, model: SequenceModel, config: dict) -> None:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    tmp = path + ".part"
    ck = {"config": config, "state_dict": sd}
    if getattr(model, "input_check", None):  # feature density of parotid.input_check (plain tensors)
        ck["input_check"] = model.input_check
    torch.save(ck, tmp)
    os.replace(tmp, path)  # atomic: the server reloads on mtime change


def load_checkpoint(path: str) -> tuple[SequenceModel, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only, no pickled code
    cfg = ck["config"]
    nseq = [len(g) for g in cfg["groups"]]
    groups = [list(range(sum(nseq[:i]), sum(nseq[:i + 1]))) for i in range(len(nseq))]
    model = SequenceModel(groups, len(cfg["classes"]), cfg["n_slices"], cfg["fusion"],
                          n_clinical=cfg.get("n_clinical", 0))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    model.eval()
    model.input_check = ck.get("input_check")  # None for checkpoints from before the input check
    return model, cfg


def train_task_model(cs: CropSet, label_set_name: str, seqs=DEFAULT_SEQS, fusion: str = DEFAULT_FUSION,
                     epochs1: int = 12, epochs2: int = 60, seed: int = 0, val_frac: float = 0.2, desc="",
                     required=DEFAULT_REQUIRED, spacing=None, holdout: CropSet | None = None,
                     cal_frac: float = 0.2, patience1: int = 4, patience2: int = 15,
                     branch_dropout: float = DEFAULT_BRANCH_DROPOUT) -> tuple[SequenceModel, dict]:
    """The server model: Liu's sequence model (late 'spl' fusion with one branch per sequence by default,
    'add', or 'early' fusion of `seqs` as channels) + temperature + MC-dropout settings. Studies need the
    `required` sequences; the others may be missing (missing.py). `spacing`: the training studies'
    spacing (`cohort_spacing`), recorded so inference resamples to it.

    Patients: the temperature and the undetermined threshold are fitted on patients excluded from
    every training stage: the `holdout` CropSet when given (the app passes the datastore's
    ``cohort.split_holdout`` part), else a stratified `cal_frac` of `cs` (none when that would be fewer
    than ``calibration.MIN_CALIBRATION`` patients: T = 1, default thresholds). Of the rest, `val_frac`
    validates both stages (best-epoch weights, early stopping). ``cfg["split"]`` records the study
    ids of each role."""
    ls = get_label_set(label_set_name)
    required = [q for q in required if q in seqs]

    def usable(c: CropSet) -> list[int]:
        return [i for i, t in enumerate(c.tumor_class) if ls.accepts(t) and all(c.avail[i, c.channels(required)])]

    keep = usable(cs)
    y = cs.labels(ls)
    if holdout is not None:
        shared = set(holdout.study_ids) & {cs.study_ids[i] for i in keep}
        if shared:
            raise ValueError(f"holdout studies are also training studies: {sorted(shared)[:5]}")
        train_idx, cal_cs, cal_idx, source = np.asarray(keep), holdout, usable(holdout), "holdout"
    else:
        from .calibration import MIN_CALIBRATION

        cal_cs, source = cs, "calibration split"
        train_idx, cal_idx = np.asarray(keep), np.array([], int)
        if np.ceil(cal_frac * len(keep)) >= MIN_CALIBRATION:  # else too few to fit anything: train on all
            train_idx, cal_idx = patient_split(keep, y, cal_frac, seed + 1)
    if len(train_idx) < 10:
        raise SystemExit(f"only {len(train_idx)} studies usable for training label set {label_set_name}")
    groups = [list(seqs)] if fusion == "early" else [[s] for s in seqs]
    t0 = time.time()
    model, info = fit_sequence_model(cs, train_idx, ls, groups, "spl" if fusion == "early" else fusion, epochs1, epochs2,
                                     seed, val_frac=val_frac, desc=desc, patience1=patience1, patience2=patience2,
                                     optional=tuple(q for q in seqs if q not in required), branch_dropout=branch_dropout)
    stats = info["stats"]
    split = {"stage1": sorted({i for st in stats["stage1"].values() for i in st.pop("study_ids")["train"]}),
             "stage2": stats["stage2"].pop("study_ids")["train"],
             "early_stopping": [str(cs.study_ids[i]) for i in info["val_idx"]]}
    from .calibration import calibrate

    cal = calibrate(model, groups, cal_cs, cal_idx, ls, source, seed=seed)
    split["calibration"] = cal["calibration"].pop("study_ids")
    counts = {c: int(np.sum(y[train_idx] == i)) for i, c in enumerate(ls.classes)}
    # input check: Local Outlier Factor on the training studies' pooled features, saved with the weights;
    # threshold in-sample here, recalibrated on a held-out cohort by `python -m parotid.input_check fit`
    from parotid.input_check import fit_feature_density

    density = fit_feature_density(subset_features(model, groups, cs, train_idx))
    model.input_check = density.to_checkpoint()
    s2 = stats["stage2"]
    cfg = {"kind": "sequence", "label_set": ls.name, "classes": list(ls.classes), "malignant": list(ls.malignant),
           "sequences": list(seqs), "required": list(required), "groups": groups, "fusion": model.fusion, "fusion_mode": fusion,
           "size": int(cs.slices.shape[-1]), "n_slices": int(cs.slices.shape[1]), "margin": 0.25, "n_clinical": 0,
           "temperature": cal["temperature"], "version": VERSION, "branch_dropout": branch_dropout, "uncertainty": cal["uncertainty"],
           "calibration": cal["calibration"],
           "trained": {"n_train": len(info["fit_idx"]), "n_val": len(info["val_idx"]), "n_calibration": len(split["calibration"]),
                       "class_counts": counts, "epochs_stage1": epochs1, "epochs_stage2": epochs2, "seed": seed,
                       "seconds": round(time.time() - t0, 1), "synthetic": True, "engine": "monai.engines.SupervisedTrainer",
                       "world_size": int(s2.get("world_size", 1)),
                       # MONAI Label's train stats (stage 2 = the served head), per stage below
                       "best_metric": s2.get("best_metric"), "best_metric_epoch": s2.get("best_metric_epoch"),
                       "epochs": s2.get("epochs"), "total_time": s2.get("total_time"),
                       "key_metric": "val_loss (class-weighted cross-entropy, lower is better)",
                       "stages": {"stage1": stats["stage1"], "stage2": s2},
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "split": split}
    if spacing is not None:
        cfg[SPACING_KEY] = [float(v) for v in spacing]
    return model, cfg


def subset_features(model: SequenceModel, groups, cs: CropSet, idx) -> np.ndarray:
    """Pooled features of cohort rows under every sequence subset the model serves (missing.SUBSETS; a
    subset that removes a branch of a one-branch model is skipped): the input check's feature density
    then knows what a study without, e.g., CE-T1 looks like."""
    from parotid.input_check import classifier_features_cropset

    from .missing import SUBSETS

    from parotid.input_check import pooled_features

    seqs = [s for g in groups for s in g]
    late = all(len(g) == 1 for g in groups)
    if late:  # branch features once; a subset = a presence mask on them
        chans = cs.channels(seqs)
        with torch.no_grad():
            parts = [model.branch_features(torch.from_numpy(cs.slices[ii][:, :, chans].astype(np.float32)),
                                           torch.from_numpy(cs.box[ii]))
                     for ii in np.array_split(np.asarray(idx), max(1, len(idx) // 16))]
        bf = [torch.cat([p[b] for p in parts]) for b in range(len(groups))]
    rows = []
    for drop in SUBSETS.values():
        if all(q not in seqs for q in drop) and rows:
            continue  # same as "all"
        if late:
            m = cropset_presence(cs, groups, idx, drop)
            rows.append(pooled_features(model, model.fuse([f * m[:, b].to(f.dtype)[:, None, None] for b, f in enumerate(bf)])))
        else:
            rows.append(classifier_features_cropset(model, {"groups": groups}, cs, idx, drop=drop))
    return np.concatenate(rows)


def cohort_spacing(images) -> list[float]:
    """Training spacing [sx, sy, sz] mm (I, J, K) of the study files `images`: the per-axis median.
    Crops are cut on each study's own grid (all synthetic cohorts share one spacing)."""
    return training_spacing(file_spacing(p) for p in images)


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _train_tasks(a) -> None:
    """Train every task of the parsed CLI arguments `a`; under DDP only rank 0 writes."""
    rank, size = engine.world()
    torch.set_num_threads(a.threads)
    sets = a.label_sets or [TASK_LABEL_SETS.get(t, "subtype4") for t in a.tasks]
    cs = build_cropset(a.cohort, size=a.size)
    holdout = build_cropset(a.holdout_cohort, size=a.size) if a.holdout_cohort else None
    spacing = cohort_spacing(r.image for r in read_cohort(a.cohort))
    os.makedirs(a.out, exist_ok=True)
    for task, ls in zip(a.tasks, sets):
        model, cfg = train_task_model(cs, ls, a.sequences, a.fusion, a.epochs1, a.epochs2, a.seed, a.val_frac, desc=task,
                                      required=a.required, spacing=spacing, holdout=holdout, cal_frac=a.cal_frac,
                                      patience1=a.patience1, patience2=a.patience2,
                                      branch_dropout=a.branch_dropout)
        if rank != 0:
            continue
        cfg["task"] = task
        cfg["trained"]["cohort"] = os.path.basename(os.path.abspath(a.cohort))
        path = os.path.join(a.out, f"{task}.pt")
        save_checkpoint(path, model, cfg)
        with open(os.path.join(a.out, f"{task}.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        c = cfg["calibration"]
        print(f"{task}: {path} ({os.path.getsize(path) / 1e6:.1f} MB) T={cfg['temperature']:.2f} "
              f"(ECE on {c['n']} calibration patients {c.get('ece_before', float('nan')):.3f} -> {c.get('ece_after', float('nan')):.3f}) "
              f"{cfg['trained']['seconds']} s, {size} process(es)")


def _spawned_worker(rank: int, world_size: int, init_file: str, a) -> None:
    import torch.distributed as dist

    if _backend() == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(_backend(), init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _train_tasks(a)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the parotid classification checkpoints (two-stage Liu model).")
    ap.add_argument("--cohort", required=True, help="cohort folder (parotid-synth output)")
    ap.add_argument("--out", default="apps/parotid/model")
    ap.add_argument("--tasks", nargs="+", default=list(TASK_LABEL_SETS), help="task names (classify_<name>)")
    ap.add_argument("--label-sets", nargs="+", default=None, help="label set per task (default: subtype4, benign_malignant)")
    ap.add_argument("--sequences", nargs="+", default=list(DEFAULT_SEQS))
    ap.add_argument("--required", nargs="+", default=list(DEFAULT_REQUIRED), help="sequences a study must have")
    ap.add_argument("--fusion", choices=["early", "add", "spl"], default=DEFAULT_FUSION)
    ap.add_argument("--branch-dropout", type=float, default=DEFAULT_BRANCH_DROPOUT,
                    help="late fusion: drop probability of each optional branch in the extra stage-2 copies (0: none)")
    ap.add_argument("--epochs1", type=int, default=12)
    ap.add_argument("--epochs2", type=int, default=60)
    ap.add_argument("--patience1", type=int, default=4, help="stage-1 early stopping (epochs without improvement; 0: off)")
    ap.add_argument("--patience2", type=int, default=15, help="stage-2 early stopping (0: off)")
    ap.add_argument("--val-frac", type=float, default=0.2, help="validation part of the training patients (best epoch, early stopping)")
    ap.add_argument("--cal-frac", type=float, default=0.2, help="calibration patients, excluded from training (without --holdout-cohort)")
    ap.add_argument("--holdout-cohort", default=None, help="calibrate on this cohort instead of a split of --cohort")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--nproc", type=int, default=1,
                    help="distributed data parallel over N processes (torch.multiprocessing.spawn; nccl with one "
                         "GPU each when CUDA is available, else gloo on CPU). Under torchrun leave it at 1.")
    a = ap.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: env:// rendezvous
        import torch.distributed as dist

        if _backend() == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(_backend(), init_method="env://")
        try:
            _train_tasks(a)
        finally:
            dist.destroy_process_group()
    elif a.nproc > 1:
        import tempfile

        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:  # file:// rendezvous, as MONAI Label's multi_gpu on Windows
            mp.spawn(_spawned_worker, args=(a.nproc, os.path.join(d, "rendezvous"), a), nprocs=a.nproc, join=True)
    else:
        _train_tasks(a)


if __name__ == "__main__":
    main()
