"""The comparison baselines of the CV ablation (parotid.evaluation.cv): a ResNet-18 slice classifier
(ours, inspired by seed 001) and L2-softmax features + Local Outlier Factor (seed 003)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import CropSet
from .liu import class_weights, seed_everything, slice_outputs
from .models import ImageNet, ResNet18SliceClassifier


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



# --------------------------------------------------------------------------- slice classifier (ours, inspired by 001)
def train_slice_resnet(cs: CropSet, train_idx, label_set, seqs: list[str], gland: bool = False, epochs: int = 10,
                       lr: float = 1e-3, seed: int = 0, per_study: int = 2, batch: int = 64, desc="resnet") -> ResNet18SliceClassifier:
    seed_everything(seed)
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

