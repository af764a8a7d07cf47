"""Simple hand-made tumour statistics per sequence, used to check the phantom's class structure.

For each sequence: tumour mean (relative to the parotid gland; ADC in absolute units), tumour
coefficient of variation, and margin sharpness (contrast across the 1-voxel boundary rings
relative to the contrast between tumour core and surroundings). Computed from a study array
(C, I, J, K) and its label map on the reference grid. Synthetic-data sanity check only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from parotid.labels import GLAND, TUMOR
from parotid.study import mask_box

FEATURES = ("mean", "cv", "margin")


def _signed_distance(tumour: np.ndarray, spacing) -> np.ndarray:
    """Signed distance (mm) to the tumour boundary: < 0 inside, > 0 outside."""
    sp = tuple(float(v) for v in spacing)
    out = ndimage.distance_transform_edt(~tumour, sampling=sp)
    inside = ndimage.distance_transform_edt(tumour, sampling=sp)
    return np.where(tumour, -inside, out).astype(np.float32)


def tumour_features(array: np.ndarray, label: np.ndarray, sequences, spacing=(1.5, 1.5, 3.0)) -> dict[str, float]:
    """``{f"{seq}_{feature}": value}`` for every sequence of the study.

    mean: tumour mean / gland mean (ADC: tumour mean in 1e-3 mm²/s); cv: tumour std / mean;
    margin: mean intensity derivative across the boundary (along the outward normal of the
    label, within 2 mm of it) times 4 mm, divided by the contrast between the tumour just
    inside (2-5 mm) and its surroundings (2-5 mm outside): ~1 for a sharp edge, small for an
    ill-defined one.
    """
    tumour = label == TUMOR
    gland = label == GLAND
    start, end = mask_box(tumour, margin=7)
    bb = tuple(slice(lo, hi) for lo, hi in zip(start, end))
    t = tumour[bb]
    sp = [float(v) for v in spacing]
    d = _signed_distance(t, sp)
    nrm = [g / s for g, s in zip(np.gradient(d), sp)]
    nlen = np.sqrt(nrm[0] ** 2 + nrm[1] ** 2 + nrm[2] ** 2) + 1e-6
    band = np.abs(d) <= 2.0
    near = (d < -2.0) & (d >= -5.0)
    if near.sum() < 4:
        near = t
    far = (d > 2.0) & (d <= 5.0)
    out = {}
    for c, seq in enumerate(sequences):
        x = array[c]
        v = x[tumour]
        mt = float(v.mean())
        if seq == "ADC":
            mean = mt / 1000.0
        else:
            mean = mt / max(float(x[gland].mean()) if gland.any() else 1.0, 1.0)
        cv = float(v.std() / max(abs(mt), 1.0))
        xs = x[bb]
        gx = [g / s for g, s in zip(np.gradient(xs), sp)]
        radial = -(gx[0] * nrm[0] + gx[1] * nrm[1] + gx[2] * nrm[2]) / nlen  # decrease outwards
        contrast = float(xs[near].mean() - xs[far].mean())
        margin = 4.0 * float(radial[band].mean()) / contrast if abs(contrast) > 1e-3 else 0.0
        out[f"{seq}_mean"] = mean
        out[f"{seq}_cv"] = cv
        out[f"{seq}_margin"] = float(np.clip(margin, -3.0, 3.0))
    return out


def separability(rows: list[dict], classes, sequences, seed: int = 0, folds: int = 5) -> dict:
    """Cross-validated logistic regression on per-sequence features vs. all-sequence fusion.

    `rows`: dicts with "tumor_class" and the feature keys. Returns macro one-vs-rest AUCs per
    single sequence and for the fusion, and the fusion's benign-vs-malignant AUC.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.array([list(classes).index(r["tumor_class"]) for r in rows])
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

    def fit(cols):
        X = np.array([[r[c] for c in cols] for r in rows], dtype=np.float64)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
        p = cross_val_predict(model, X, y, cv=cv, method="predict_proba")
        return p

    res = {"single": {}, "n": len(rows)}
    for s in sequences:
        p = fit([f"{s}_{f}" for f in FEATURES])
        res["single"][s] = float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    cols = [f"{s}_{f}" for s in sequences for f in FEATURES]
    p = fit(cols)
    res["fusion"] = float(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    mal = list(classes).index("malignant")
    res["fusion_benign_vs_malignant"] = float(roc_auc_score(y == mal, p[:, mal]))
    res["single_benign_vs_malignant"] = {}
    for s in sequences:
        ps = fit([f"{s}_{f}" for f in FEATURES])
        res["single_benign_vs_malignant"][s] = float(roc_auc_score(y == mal, ps[:, mal]))
    return res
