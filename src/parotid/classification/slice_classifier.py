"""Patient decisions of the slice classifier ("ours, inspired by 001": see ``models.ResNet18SliceClassifier``).

Xia et al. (seed 001) classify every slice, then decide per patient: more than two malignant slices ->
malignant, otherwise the benign class with the most slices. Here the slices are the crops of
``crops.extract_crop``: ``n_slices`` positions spread over the tumour's k-range, with REPEATS when the
tumour has fewer slices. Every decision, average and slice-level metric below uses each tumour slice
once (``crops.unique_slices``): a 2-slice tumour with one malignant slice has one malignant slice, not
four.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .crops import unique_slices
from .data import CropSet


@dataclass
class PatientPredictions:
    prob: np.ndarray  # (n, classes): mean probability over unique tumour slices, tumour classes renormalised
    rule: np.ndarray  # (n,): class index by 001's rule on unique tumour slices
    slice_y: np.ndarray  # (m,): slice labels: the patient's class on tumour slices, `classes` (= tumour-free) on others
    slice_prob: np.ndarray  # (m, classes + 1): slice probabilities (tumour-free last)
    slice_patient: np.ndarray  # (m,): the position in `idx` of each slice's patient


def decision_rule_001(slice_pred: np.ndarray, label_set, min_malignant: int = 3) -> int:
    """Xia et al. (seed 001): > 2 malignant slices -> malignant; otherwise the benign class with the most
    slices (tumour-free slices, index = n_classes, are ignored). `slice_pred` holds the predicted class
    of each UNIQUE slice once."""
    n_classes = len(label_set.classes)
    mal = set(label_set.malignant_indices)
    slice_pred = np.asarray(slice_pred)
    counts = np.bincount(slice_pred[slice_pred < n_classes], minlength=n_classes)
    n_mal = sum(counts[i] for i in mal)
    benign = [i for i in range(n_classes) if i not in mal]
    if (n_mal >= min_malignant and mal) or not benign:
        return max(mal, key=lambda i: counts[i]) if mal else int(np.argmax(counts))
    return max(benign, key=lambda i: counts[i])


def _input(cs: CropSet, s: int, chans, gland: bool, free: bool = False) -> np.ndarray:
    x = (cs.free if free else cs.slices)[s][:, chans].astype(np.float32)
    if gland:
        x = np.concatenate([x, (cs.free_gland if free else cs.gland)[s].astype(np.float32)], 1)
    return x


@torch.no_grad()
def predict_patients_001(net: torch.nn.Module, cs: CropSet, idx, seqs, gland: bool, label_set) -> PatientPredictions:
    """Patient decisions (probability averaging and 001's rule) and slice-level outputs for studies `idx`:
    unique tumour slices plus the study's tumour-free slices (``cs.free_valid``)."""
    if cs.ks is None:
        raise ValueError("this crop set has no slice indices (ks); rebuild it with build_cropset")
    net.eval()
    chans = cs.channels(seqs)
    n_classes = len(label_set.classes)
    y = cs.labels(label_set)
    probs, rule, sy, sp, spat = [], [], [], [], []
    for j, s in enumerate(np.asarray(idx)):
        keep = unique_slices(cs.ks[s])
        p = torch.softmax(net(torch.from_numpy(_input(cs, s, chans, gland)[keep])), 1).numpy()  # (u, classes + 1)
        pt = p[:, :n_classes].mean(0)
        probs.append(pt / max(pt.sum(), 1e-8))
        rule.append(decision_rule_001(p.argmax(1), label_set))
        sy += [y[s]] * len(p)
        sp.append(p)
        if cs.free_valid[s].any():
            pf = torch.softmax(net(torch.from_numpy(_input(cs, s, chans, gland, free=True)[cs.free_valid[s]])), 1).numpy()
            sy += [n_classes] * len(pf)
            sp.append(pf)
        spat += [j] * (len(sy) - len(spat))
    return PatientPredictions(np.array(probs), np.array(rule), np.array(sy), np.concatenate(sp), np.array(spat))
