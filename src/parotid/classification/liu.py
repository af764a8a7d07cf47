"""Two-stage training of Liu et al.'s sequence model: stage 1 image networks (slice classifier + RoI-Align on
the box, one per sequence group), stage 2 transformer head over the frozen slice features; both on MONAI's
SupervisedTrainer (``engine``). Used by the served models (``task_model``) and the evaluation (CV, external)."""

from __future__ import annotations

import numpy as np
import torch

from . import engine
from .data import CropSet
from .defaults import DEFAULT_STAGE2_LR
from .missing import cropset_presence, dropout_masks
from .models import ImageNet, SequenceModel


def seed_everything(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)


def class_weights(y: np.ndarray, n: int) -> torch.Tensor:
    cnt = np.bincount(y, minlength=n).astype(np.float64)
    w = np.where(cnt > 0, cnt.sum() / np.maximum(cnt, 1) / n, 0.0)
    return torch.tensor(w, dtype=torch.float32)


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
    seed_everything(seed)
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
                        epochs: int = 60, lr: float = DEFAULT_STAGE2_LR, seed: int = 0, batch: int = 32,
                        val_feats: torch.Tensor | None = None, val_y: np.ndarray | None = None,
                        val_clinical: torch.Tensor | None = None, patience: int = 0,
                        stats: dict | None = None, optimizer_fn=None) -> SequenceModel:
    """Liu stage 2: transformer + max-pool + FC over frozen slice features (branches untouched), on
    MONAI's SupervisedTrainer; with validation features the best validation epoch's weights are kept.
    `optimizer_fn(params) -> optimizer` replaces AdamW(lr, weight decay 1e-4)."""
    seed_everything(seed)
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
                       optional: tuple = (), branch_dropout: float = 0.0, patience1: int = 4, patience2: int = 15,
                       lr2: float = DEFAULT_STAGE2_LR):
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
                        None if clin is None else torch.cat([clin] * len(copies)), epochs2, lr=lr2, seed=seed,
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

