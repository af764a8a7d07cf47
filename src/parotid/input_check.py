"""Input check (out-of-distribution detection) for every inference result.

The models were trained on one kind of input (multi-sequence head-and-neck MRI of the parotid
region; here: SYNTHETIC phantoms). This module says, for each request, whether the input looks like
that, so that a result on anything else is marked instead of being given with confidence.

Components (each a ``score`` against a ``threshold``; it passes when ``score <= threshold``):

* ``physical`` — physical plausibility: voxel spacing and field of view of the study's reference
  grid inside fixed ranges for head-and-neck MRI (rules, not fitted; see PHYSICAL_RANGES). Score:
  the largest ratio by which a value lies outside its range (<= 1 inside).
* ``intensity`` — per-sequence intensity statistics against the training cohort: for every sequence
  a vector (share of non-zero voxels, quantiles of the p1..p99-normalised histogram; ADC also its
  absolute median and p95 in 1e-6 mm2/s) and, for each pair of sequences, the correlation of their
  voxel values (one series imported as two sequences correlates at 1.0). Mahalanobis distance with
  a Ledoit-Wolf shrunk covariance (scikit-learn) fitted on the training cohort, per entry.
* ``anatomy`` — the whole-study segmentation model must find two parotid regions (gland + tumour,
  connected components) of plausible volume, on the two sides of the neck: robust z-scores of
  log volume of the larger and the smaller region and of their left-right distance (mm) against
  the model's own output on the training cohort.
* ``feature_density`` (classification) — Local Outlier Factor (scikit-learn, novelty mode; seed 003)
  on the classifier's pooled sequence feature (the input of its last layer), fitted on the
  training cohort at training time and stored in the classifier checkpoint (``input_check`` entry:
  the training features, so the checkpoint stays loadable with ``weights_only=True``).
* ``tumor_in_box`` (box requests) — the segmentation model's tumour inside the box; none: "no
  tumour found in the box".

Thresholds are calibrated on a held-out SYNTHETIC cohort (seeds never used for training):
``threshold = MARGIN x the 99th percentile`` of that cohort's scores, per entry. ``python -m
parotid.input_check fit`` (re)fits everything for the shipped models; docs/input-check.md has what
it does and does not catch, with measured rates.

Result contract: ``{"in_distribution", "score", "threshold", "reasons", "components"}`` where
``score`` = max over components of score / threshold and ``threshold`` = 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from parotid.checksums import sha256_of
from parotid.labels import TUMOR
from parotid.study import Study, StudyError

REFERENCE_FILE = "input_check.json"
NO_TUMOUR = "no tumour found in the box"
# Box size: the smallest tumour the models were trained on is 11 mm (parotid-synth, docs/model cards);
# a box shorter than MIN_BOX_MM along any axis cannot hold one, so it is refused (422) rather than
# answered: the user drew a wrong box and should know it, an "undetermined" would hide that.
MIN_BOX_MM = 5.0
# Physical plausibility of the reference grid for head-and-neck MRI (mm). Clinical parotid protocols:
# pixel 0.4-1.0 mm, slices 1.5-10 mm (docs/model cards, seeds 000/001/003); the neck in-plane field of
# view is ~140-260 mm and both glands (~45 mm cranio-caudal) need >= 30 mm coverage.
PHYSICAL_RANGES = {
    "spacing_in_plane_mm": (0.2, 3.0),
    "spacing_through_plane_mm": (0.5, 10.0),
    "fov_in_plane_mm": (100.0, 350.0),
    "fov_through_plane_mm": (30.0, 300.0),
}
MARGIN = 1.25  # calibrated threshold = MARGIN x 99th percentile of held-out in-distribution scores
QUANTILES = (5, 25, 50, 75, 95)
MAX_SCORE = 1e3  # scores are capped (JSON has no infinity)
TUMOUR_IN_BOX_ML = 0.1  # segmentation tumour inside the box below this volume: no tumour found


# ------------------------------------------------------------------------------------ helpers
def _component(score: float, threshold: float, reasons: list[str], **details) -> dict:
    score = float(min(score, MAX_SCORE)) if np.isfinite(score) else MAX_SCORE
    return {"passed": bool(score <= threshold), "score": round(score, 4), "threshold": round(float(threshold), 4),
            "reasons": reasons if score > threshold else [], **details}


def combine(components: Mapping[str, dict | None]) -> dict:
    """The result's ``input_check``: in distribution when every component passes."""
    comps = {k: v for k, v in components.items() if v is not None}
    ratios = [c["score"] / c["threshold"] if c["threshold"] > 0 else MAX_SCORE for c in comps.values()]
    reasons = [r for c in comps.values() for r in c.get("reasons", [])]
    return {"in_distribution": all(c["passed"] for c in comps.values()),
            "score": round(float(max(ratios, default=0.0)), 4), "threshold": 1.0, "reasons": reasons,
            "components": comps}


def mark_classification(result: dict, input_check: dict) -> dict:
    """Attach `input_check` to a classification result; a failed check makes it undetermined (the
    predicted class and probabilities are kept: clients parse them, the flag says "I don't know")."""
    result["input_check"] = input_check
    reasons = list(result.get("undetermined_reasons") or [])
    if not input_check["in_distribution"]:
        result["undetermined"] = True
        reasons += [r for r in input_check["reasons"] if r not in reasons]
    result["undetermined_reasons"] = reasons
    return result


# ------------------------------------------------------------------------------------ physical
def check_box_size(roi: Sequence[int], study: Study) -> None:
    """StudyError (422) for a box shorter than MIN_BOX_MM along any axis."""
    spacing = study.image.GetSpacing()
    ext = [(int(roi[2 * a + 1]) - int(roi[2 * a])) * spacing[a] for a in range(3)]
    if min(ext) < MIN_BOX_MM:
        raise StudyError(f"the box is {' x '.join(f'{e:.1f}' for e in ext)} mm; it must be at least {MIN_BOX_MM:g} mm "
                         f"along each axis to hold a tumour (the smallest tumour the models know is 11 mm): "
                         f"draw the box around the whole tumour")


def physical_check(study: Study) -> dict:
    sp = np.asarray(study.image.GetSpacing(), float)
    fov = sp * np.asarray(study.shape, float)
    values = {"spacing_in_plane_mm": sp[:2], "spacing_through_plane_mm": sp[2:],
              "fov_in_plane_mm": fov[:2], "fov_through_plane_mm": fov[2:]}
    score, reasons = 0.0, []
    for key, vals in values.items():
        lo, hi = PHYSICAL_RANGES[key]
        for v in vals:
            r = max(lo / max(v, 1e-9), v / hi)
            score = max(score, r)
            if r > 1.0:
                what = ("voxel spacing" if key.startswith("spacing") else "field of view") + \
                    (" in-plane" if "in_plane" in key else " through-plane")
                reasons.append(f"{what} {v:.3g} mm outside {lo:g}-{hi:g} mm (head-and-neck MRI)")
    return _component(score, 1.0, reasons, spacing_mm=[round(float(v), 4) for v in sp],
                      fov_mm=[round(float(v), 1) for v in fov])


# ------------------------------------------------------------------------------------ intensity
def intensity_features(study: Study) -> dict[str, list[float]]:
    """Per sequence: [share of non-zero voxels, normalised quantiles (+ ADC: log10 median, log10 p95)];
    per pair of sequences: [Pearson correlation over the voxels both cover]."""
    arr = study.array()
    out: dict[str, list[float]] = {}
    support = arr != 0
    for c, seq in enumerate(study.sequences):
        x = arr[c][support[c]]
        if x.size < 100:
            out[seq] = [float(support[c].mean())] + [0.0] * len(QUANTILES) + ([0.0, 0.0] if seq == "ADC" else [])
            continue
        lo, hi = np.percentile(x, (1, 99))
        q = (np.percentile(x, QUANTILES) - lo) / max(float(hi - lo), 1e-6)
        f = [float(support[c].mean())] + [float(v) for v in q]
        if seq == "ADC":  # quantitative (1e-6 mm2/s): the absolute level is part of what the model knows
            f += [float(np.log10(max(np.median(x), 1e-3))), float(np.log10(max(np.percentile(x, 95), 1e-3)))]
        out[seq] = f
    for i, a in enumerate(study.sequences):
        for b in study.sequences[i + 1:]:
            m = support[i] & support[study.sequences.index(b)]
            xa, xb = arr[i][m], arr[study.sequences.index(b)][m]
            corr = float(np.corrcoef(xa, xb)[0, 1]) if m.sum() > 100 and xa.std() > 0 and xb.std() > 0 else 1.0
            out[f"{a}~{b}"] = [corr]
    return out


def _mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> float:
    d = np.asarray(x, float) - mean
    return float(np.sqrt(max(d @ precision @ d, 0.0)))


def _intensity_verdict(feats: dict[str, list[float]], ref: dict, complete: Iterable[str] = ()) -> dict:
    """Per-entry Mahalanobis distances of `feats` against one intensity reference. An entry the study has
    but the reference lacks is skipped, unless it is in `complete` (a commissioned site's reference must
    cover every entry the training reference has: a site commissioned without DWI does not vouch for DWI)."""
    entries, worst, seq_out, pair_out = {}, 0.0, [], []
    for key, f in feats.items():
        r = ref.get(key)
        if r is None:  # a sequence the reference cohort did not have: nothing to compare with
            if key in complete:
                worst = max(worst, MAX_SCORE)
                entries[key] = None
            continue
        d = _mahalanobis(f, np.asarray(r["mean"]), np.asarray(r["precision"]))
        ratio = d / r["threshold"]
        entries[key] = round(min(d, MAX_SCORE), 3)
        worst = max(worst, ratio)
        if ratio > 1.0 and "~" in key:
            pair_out.append(f"{key.replace('~', '/')} {f[0]:.2f}")
        elif ratio > 1.0:
            seq_out.append(f"{key} ({d:.1f} > {r['threshold']:.1f})")
    return {"worst": worst, "distances": entries, "sequences": seq_out, "pairs": pair_out}


SITE_SPACING_TOLERANCE = 0.10  # a commissioned site's protocol: its cohort's voxel spacings +- 10 %


def sorted_spacing(study: Study) -> list[float]:
    """The reference grid's voxel spacing, smallest first (independent of the slice orientation), mm."""
    return sorted(float(v) for v in study.image.GetSpacing())


def site_geometry(spacings: Sequence[Sequence[float]], tolerance: float = SITE_SPACING_TOLERANCE) -> dict:
    """A site's protocol geometry: the range of its commissioning studies' sorted voxel spacings, widened by
    `tolerance` (a relative margin). Studies outside it are another protocol, which needs its own commissioning."""
    x = np.asarray(spacings, float)
    return {"spacing_mm": {"min": (x.min(0) * (1 - tolerance)).round(4).tolist(),
                           "max": (x.max(0) * (1 + tolerance)).round(4).tolist()}, "tolerance": tolerance}


def _geometry_mismatch(study: Study, geometry: dict | None) -> str | None:
    if not geometry:
        return None
    sp, lo, hi = sorted_spacing(study), geometry["spacing_mm"]["min"], geometry["spacing_mm"]["max"]
    if all(a <= v <= b for v, a, b in zip(sp, lo, hi)):
        return None
    return (f"voxel spacing {'/'.join(f'{v:.2g}' for v in sp)} mm outside its protocol's "
            f"{'/'.join(f'{a:.2g}-{b:.2g}' for a, b in zip(lo, hi))} mm")


def intensity_check(study: Study, ref: dict, sites: Mapping[str, dict] | None = None) -> dict:
    """The study's intensity statistics against the training cohort's reference `ref` and against every
    commissioned site's (`sites`: name -> {"intensity", "geometry", "evidence"}, written by ``parotid-eval
    commission`` after the served models met the bars on that site's labelled cohort). A site matches only
    studies of its protocol (voxel spacing inside its ``geometry``) whose statistics match its reference.
    It passes when the study matches the training cohort or one commissioned site; the score is the best
    match's. The reasons name the training cohort's entries and why no commissioned site matches."""
    feats = intensity_features(study)
    verdicts = {"training": _intensity_verdict(feats, ref)}
    why_not = []
    for name, site in (sites or {}).items():
        v = _intensity_verdict(feats, site["intensity"], complete=ref.keys())
        mismatch = _geometry_mismatch(study, site.get("geometry"))
        if mismatch:
            v["worst"] = MAX_SCORE
        verdicts[f"site:{name}"] = v
        why_not.append(f"{name}: {mismatch or 'intensity statistics'}")
    best = min(verdicts, key=lambda k: verdicts[k]["worst"])
    shown = verdicts[best] if verdicts[best]["worst"] <= 1.0 else verdicts["training"]
    reasons = []
    if verdicts[best]["worst"] > 1.0:
        tail = f"; no commissioned site matches ({'; '.join(why_not)})" if why_not else ""
        if shown["sequences"]:
            reasons.append(f"intensity statistics unlike the training cohort (Mahalanobis distance): "
                           f"{', '.join(shown['sequences'])}{tail}")
        if shown["pairs"]:
            reasons.append(f"sequences correlate unlike the training cohort (one series imported as several?): "
                           f"{', '.join(shown['pairs'])}{tail}")
    details = {"distances": shown["distances"], "reference": best}
    if sites:
        details["reference_scores"] = {k: round(float(min(v["worst"], MAX_SCORE)), 4) for k, v in verdicts.items()}
    return _component(verdicts[best]["worst"], 1.0, reasons, **details)


# ------------------------------------------------------------------------------------ anatomy
ANATOMY_FEATURES = ("larger_region_log_ml", "smaller_region_log_ml", "left_right_distance_mm")


def anatomy_features(label: np.ndarray, study: Study) -> dict[str, float]:
    """The two largest parotid regions (gland + tumour voxels, connected components) of a label map:
    log(1 + volume in ml) of each, and the distance of their centroids along the patient's left-right
    axis (LPS x) in mm (0 when fewer than two regions)."""
    from scipy import ndimage

    comps, n = ndimage.label(label > 0)
    vox_ml = float(np.prod(study.image.GetSpacing())) / 1000.0
    if n == 0:
        return {ANATOMY_FEATURES[0]: 0.0, ANATOMY_FEATURES[1]: 0.0, ANATOMY_FEATURES[2]: 0.0}
    sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
    order = np.argsort(sizes)[::-1][:2]
    cents = ndimage.center_of_mass(np.ones_like(comps), comps, index=[int(i) + 1 for i in order])
    xs = [study.image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])[0] for c in cents]
    vols = [float(sizes[i]) * vox_ml for i in order] + [0.0]
    return {ANATOMY_FEATURES[0]: float(np.log1p(vols[0])), ANATOMY_FEATURES[1]: float(np.log1p(vols[1])),
            ANATOMY_FEATURES[2]: float(abs(xs[0] - xs[1])) if len(xs) == 2 else 0.0}


def anatomy_check(label: np.ndarray, study: Study, ref: dict) -> dict:
    f = anatomy_features(label, study)
    zs = {k: abs(f[k] - ref[k]["median"]) / ref[k]["scale"] for k in ANATOMY_FEATURES}
    worst = max(zs, key=zs.get)
    reasons = []
    if zs[worst] > ref["threshold"]:
        lo, hi = ref[worst]["range"]
        if worst.endswith("_log_ml"):
            reasons.append(f"anatomy: {'larger' if worst.startswith('larger') else 'second'} parotid region "
                           f"{np.expm1(f[worst]):.1f} ml (training {np.expm1(lo):.0f}-{np.expm1(hi):.0f} ml); "
                           "two parotid glands are not found")
        else:
            reasons.append(f"anatomy: parotid regions {f[worst]:.0f} mm apart left-right "
                           f"(training {lo:.0f}-{hi:.0f} mm); two parotid glands are not found")
    volumes = [round(float(np.expm1(f[k])), 2) for k in ANATOMY_FEATURES[:2]]
    return _component(zs[worst], ref["threshold"], reasons, z=dict((k, round(float(v), 3)) for k, v in zs.items()),
                      region_volumes_ml=volumes, left_right_distance_mm=round(f[ANATOMY_FEATURES[2]], 1))


# ------------------------------------------------------------------------------------ boxes
def tumour_in_box(label: np.ndarray, roi: Sequence[int], study: Study) -> dict:
    """Does the segmentation model's tumour reach into the box (>= TUMOUR_IN_BOX_ML)?"""
    i0, i1, j0, j1, k0, k1 = (int(v) for v in roi)
    ml = float((label[i0:i1, j0:j1, k0:k1] == TUMOR).sum()) * float(np.prod(study.image.GetSpacing())) / 1000.0
    found = ml >= TUMOUR_IN_BOX_ML
    return {"passed": found, "score": 0.0 if found else 1.0, "threshold": 0.5, "reasons": [] if found else [NO_TUMOUR],
            "tumor_found": found, "segmented_tumor_in_box_ml": round(ml, 3)}


# ------------------------------------------------------------------------------------ classifier features
def pooled_features(model, slice_feats) -> np.ndarray:
    """(B, D) input of the classifier's last layer: transformer over the slice features, max over
    slices (SequenceModel.forward_features without its head)."""
    import torch

    with torch.no_grad():
        z = model.encoder(slice_feats + model.pos[:, : slice_feats.shape[1]]).max(dim=1).values
    return z.numpy().astype(np.float64)


class FeatureDensity:
    """Local Outlier Factor (novelty) on L2-normalised pooled classifier features. Stored as the
    training features (plain tensors) and refitted on load: milliseconds for a few hundred rows."""

    def __init__(self, features: np.ndarray, n_neighbors: int = 10, threshold: float | None = None,
                 calibration: str = ""):
        from sklearn.neighbors import LocalOutlierFactor

        self.features = np.asarray(features, np.float32)
        self.n_neighbors = int(min(n_neighbors, len(self.features) - 1))
        self.lof = LocalOutlierFactor(n_neighbors=self.n_neighbors, novelty=True).fit(_l2(self.features))
        self.threshold = threshold
        self.calibration = calibration

    def score(self, feats: np.ndarray) -> np.ndarray:
        """LOF (about 1 for inliers, larger for outliers)."""
        return -self.lof.score_samples(_l2(np.atleast_2d(feats)))

    def in_sample_scores(self) -> np.ndarray:
        """Each training row's LOF among the others (LocalOutlierFactor's negative_outlier_factor_)."""
        from sklearn.neighbors import LocalOutlierFactor

        lof = LocalOutlierFactor(n_neighbors=self.n_neighbors).fit(_l2(self.features))
        return -lof.negative_outlier_factor_

    def to_checkpoint(self) -> dict:
        import torch

        return {"method": "local_outlier_factor", "feature": "pooled sequence feature, L2-normalised",
                "features": torch.from_numpy(self.features.astype(np.float16)), "n_neighbors": self.n_neighbors,
                "threshold": float(self.threshold), "calibration": self.calibration}

    @classmethod
    def from_checkpoint(cls, block: dict) -> "FeatureDensity":
        return cls(block["features"].float().numpy(), block["n_neighbors"], block["threshold"],
                   block.get("calibration", ""))


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_feature_density(features: np.ndarray, n_neighbors: int = 10, calibration: np.ndarray | None = None) -> FeatureDensity:
    """Fit on training features; the threshold from held-out `calibration` features when given, else
    from the training rows' own LOF among each other (in-sample)."""
    d = FeatureDensity(features, n_neighbors)
    if calibration is not None and len(calibration):
        d.threshold, d.calibration = _threshold(d.score(calibration)), f"held-out, n={len(calibration)}"
    else:
        d.threshold, d.calibration = _threshold(d.in_sample_scores()), f"in-sample, n={len(features)}"
    return d


def density_of(model) -> FeatureDensity | None:
    """The model's feature density (from its checkpoint), built once per loaded model."""
    block = getattr(model, "input_check", None)
    if not block:
        return None
    if getattr(model, "_density", None) is None:
        model._density = FeatureDensity.from_checkpoint(block)
    return model._density


def feature_density_check(model, slice_feats) -> dict | None:
    d = density_of(model)
    if d is None:
        return None
    s = float(d.score(pooled_features(model, slice_feats))[0])
    reasons = [f"the tumour's image features are unlike the training cohort's (Local Outlier Factor {s:.2f} > "
               f"{d.threshold:.2f})"]
    return _component(s, d.threshold, reasons, method="local_outlier_factor")


def _threshold(scores: np.ndarray) -> float:
    return float(MARGIN * np.percentile(np.asarray(scores, float), 99))


# ------------------------------------------------------------------------------------ study level
_REFS: dict[str, tuple] = {}


def default_segmenter(model_dir: str):
    """Outside the server: the whole-study segmentation checkpoint of `model_dir` (the server passes its
    served segmentation task's segmenter instead)."""
    from parotid.segmentation.checkpoint import StudySegmenter

    return StudySegmenter(os.path.join(model_dir, "segmentation.pt"))


def load_reference(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, REFERENCE_FILE)
    if not os.path.exists(path):
        return None
    mtime = os.path.getmtime(path)
    hit = _REFS.get(path)
    if not hit or hit[0] != mtime:
        with open(path) as f:
            hit = _REFS[path] = (mtime, json.load(f))
    return hit[1]


def study_components(study: Study, model_dir: str, label: np.ndarray | None = None,
                     segmenter=None) -> tuple[dict, np.ndarray | None]:
    """Physical, intensity and anatomy components for a study (+ the segmentation label used).
    `label`: the whole-study segmentation when the caller has it; else `segmenter` (a
    parotid.segmentation.checkpoint.StudySegmenter; default: `default_segmenter`) computes it. Cached per
    study content, reference file and segmentation checkpoint (parotid.study_cache: every classification
    of a study repeated ~1 s of intensity statistics and segmentation); callers get their own copy."""
    import copy

    segmenter = segmenter or default_segmenter(model_dir)
    if label is not None:
        return _study_components(study, model_dir, label, segmenter)
    ref = os.path.join(model_dir, REFERENCE_FILE)
    from parotid.study_cache import study_key

    key = (study_key(study), ref, _mtime(ref), segmenter.identity())
    hit = _components_cache().get_or_compute(key, lambda: _study_components(study, model_dir, None, segmenter))
    return copy.deepcopy(hit[0]), hit[1]


def _mtime(path: str) -> int | None:
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


_COMPONENTS = None


def _components_cache():
    global _COMPONENTS
    if _COMPONENTS is None:
        from parotid.study_cache import ByteLRU, budget_mib

        _COMPONENTS = ByteLRU(budget_mib("PAROTID_CHECK_CACHE_MB", 128) * 2**20,
                              lambda v: 4096 + (v[1].nbytes if v[1] is not None else 0))
    return _COMPONENTS


def _study_components(study: Study, model_dir: str, label: np.ndarray | None,
                      segmenter) -> tuple[dict, np.ndarray | None]:
    """study_components, uncached."""
    ref = load_reference(model_dir)
    comps: dict[str, Any] = {"physical": physical_check(study)}
    if ref is None:
        comps["reference"] = {"passed": True, "score": 0.0, "threshold": 1.0, "reasons": [],
                              "note": f"no {REFERENCE_FILE} next to the models: intensity and anatomy not checked"}
        return comps, label
    comps["intensity"] = intensity_check(study, ref["intensity"], ref.get("sites"))
    if label is None and segmenter.identity() is not None:
        try:
            label = segmenter.label_of(study)
        except StudyError as e:  # lacks a sequence the segmentation model needs (a classifier may not)
            comps["anatomy"] = {"passed": True, "score": 0.0, "threshold": 1.0, "reasons": [],
                                "note": f"anatomy not checked: {e}"}
    if label is not None:
        comps["anatomy"] = anatomy_check(label, study, ref["anatomy"])
    return comps, label


def box_components(study: Study, roi: Sequence[int], model_dir: str, segmenter=None) -> dict:
    """Study components + ``tumor_in_box`` for a box request (box checked first: 422 if invalid or too small)."""
    from parotid.study import check_roi

    check_roi(roi, study.shape)
    roi = [int(v) for v in roi]
    check_box_size(roi, study)
    comps, label = study_components(study, model_dir, segmenter=segmenter)
    if label is not None:
        comps["tumor_in_box"] = tumour_in_box(label, roi, study)
    return comps


# ------------------------------------------------------------------------------------ fitting
def _cohort(folder: str) -> list:
    from parotid.cohort import load_classification_cohort

    return load_classification_cohort(folder)


def study_rows(folder: str, seg_path: str, progress: bool = True) -> list[dict]:
    """Intensity and anatomy features of every labelled study of a cohort folder."""
    from tqdm import tqdm

    from parotid.segmentation.checkpoint import StudySegmenter
    from parotid.study import read_study

    segmenter = StudySegmenter(seg_path)
    rows = []
    for r in tqdm(_cohort(folder), desc=f"input check {os.path.basename(folder)}", disable=not progress, mininterval=10):
        s = read_study(r.image, r.study_id)
        try:
            anatomy = anatomy_features(segmenter.label_of(s), s)
        except StudyError:  # lacks a sequence the segmentation model needs: no anatomy row
            anatomy = None
        rows.append({"study_id": r.study_id, "intensity": intensity_features(s), "anatomy": anatomy})
    return rows


def fit_reference(train: list[dict], calibration: list[dict]) -> dict:
    """Reference statistics from training rows; thresholds from held-out calibration rows."""
    from sklearn.covariance import LedoitWolf

    intensity = {}
    keys = sorted({k for r in train for k in r["intensity"]})
    for key in keys:
        x = np.array([r["intensity"][key] for r in train if key in r["intensity"]], float)
        if len(x) < 10:
            continue
        lw = LedoitWolf().fit(x)
        cal = [_mahalanobis(r["intensity"][key], lw.location_, lw.precision_) for r in calibration if key in r["intensity"]]
        own = [_mahalanobis(v, lw.location_, lw.precision_) for v in x]
        intensity[key] = {"mean": lw.location_.tolist(), "precision": lw.precision_.tolist(), "n_train": len(x),
                          "threshold": _threshold(cal if len(cal) >= 10 else own), "n_calibration": len(cal)}
    scale_familywise(intensity, [r["intensity"] for r in calibration])
    anatomy: dict[str, Any] = {}
    train = [r for r in train if r["anatomy"] is not None]
    calibration = [r for r in calibration if r["anatomy"] is not None]
    for key in ANATOMY_FEATURES:
        x = np.array([r["anatomy"][key] for r in train], float)
        q25, q75 = np.percentile(x, (25, 75))
        anatomy[key] = {"median": float(np.median(x)), "scale": float(max((q75 - q25) / 1.349, 1e-3 + 0.02 * abs(np.median(x)))),
                        "range": [float(v) for v in np.percentile(x, (1, 99))]}
    zmax = [max(abs(r["anatomy"][k] - anatomy[k]["median"]) / anatomy[k]["scale"] for k in ANATOMY_FEATURES)
            for r in calibration]
    anatomy["threshold"] = _threshold(zmax)
    anatomy["n_train"], anatomy["n_calibration"] = len(train), len(calibration)
    return {"intensity": intensity, "anatomy": anatomy}


def scale_familywise(intensity: dict, calibration: list[dict]) -> float:
    """The intensity component fails when ANY of its entries (each sequence, each sequence pair: ~20)
    exceeds its threshold, so per-entry 99th percentiles alone let the union fail far more often than
    1 % (measured: 4 of 47 held-out SYNTHETIC studies, seed 303). Scale every entry threshold by
    f = max(1, MARGIN x 99th percentile of the calibration studies' worst entry ratio): the component
    score is then calibrated as a whole. In place; returns f (1.0 when already calibrated: idempotent)."""
    worst = [max((_mahalanobis(row[k], np.asarray(r["mean"]), np.asarray(r["precision"])) / r["threshold"]
                  for k, r in intensity.items() if k in row), default=0.0) for row in calibration]
    f = max(1.0, MARGIN * float(np.percentile(worst, 99))) if len(worst) >= 10 else 1.0
    for r in intensity.values():
        r["threshold"] = float(r["threshold"] * f)
        r["familywise_scale"] = float(r.get("familywise_scale", 1.0) * f)
    return f


def fit_site_intensity(rows: list[dict[str, list[float]]], min_rows: int = 10) -> dict:
    """Intensity reference of one site from its studies' ``intensity_features`` (a commissioning cohort:
    tens of studies, no separate calibration cohort). Mean and shrunk covariance (Ledoit-Wolf) from all rows;
    each entry's threshold from leave-one-out distances (each study against the fit of the others: the
    held-out distances an in-sample fit would understate), MARGIN x their 99th percentile, then scaled
    family-wise over the entries as ``scale_familywise`` does, with the same leave-one-out ratios. Entries
    with fewer than `min_rows` studies are left out (the site then does not vouch for them)."""
    from sklearn.covariance import LedoitWolf

    out, loo = {}, {}
    for key in sorted({k for r in rows for k in r}):
        x = np.array([r[key] for r in rows if key in r], float)
        if len(x) < min_rows:
            continue
        d = []
        for i in range(len(x)):
            lw = LedoitWolf().fit(np.delete(x, i, axis=0))
            d.append(_mahalanobis(x[i], lw.location_, lw.precision_))
        lw = LedoitWolf().fit(x)
        out[key] = {"mean": lw.location_.tolist(), "precision": lw.precision_.tolist(), "n_train": len(x),
                    "threshold": _threshold(d), "n_calibration": len(x), "calibration": "leave-one-out"}
        loo[key] = dict(zip([i for i, r in enumerate(rows) if key in r], d))
    worst = [max((loo[k][i] / out[k]["threshold"] for k in out if i in loo[k]), default=0.0) for i in range(len(rows))]
    f = max(1.0, MARGIN * float(np.percentile(worst, 99))) if len(worst) >= min_rows else 1.0
    for r in out.values():
        r["threshold"] = float(r["threshold"] * f)
        r["familywise_scale"] = float(f)
    return out


def commissioned_sites(models: str) -> dict:
    """For ``/info``: each commissioned site's date, cohort size, protocol geometry and the metrics it was
    accepted on (point values; the full evidence is in input_check.json)."""
    out = {}
    for name, site in ((load_reference(models) or {}).get("sites") or {}).items():
        ev = site.get("evidence") or {}
        metrics = {}
        for task, v in (ev.get("tasks") or {}).items():
            m = v.get("metrics") or {}
            metrics[task] = {k: round(float(m[k][0]), 3) for k in ("roc_auc", "macro_auc") if m.get(k)}
        out[name] = {"date": ev.get("date"), "n_studies": ev.get("n_studies"), "geometry": site.get("geometry"),
                     "accepted_on": metrics}
    return out


def require_site_evidence(comps: dict, task: str, checkpoint: str, models: str) -> dict:
    """A study whose intensity matched a commissioned site (not the training cohort) is accepted for `task` only
    with the checkpoint the site was commissioned with: the site's evidence is about those weights. After a
    retrained classifier is promoted (or another classifier added) the component fails until the site is
    commissioned again. In place; returns `comps`."""
    from parotid.checksums import cached_sha256

    ic = comps.get("intensity")
    ref = str((ic or {}).get("reference", ""))
    if not ic or not ic.get("passed") or not ref.startswith("site:"):
        return comps
    site = ref[5:]
    ev = ((((load_reference(models) or {}).get("sites") or {}).get(site) or {}).get("evidence") or {})
    want = ((ev.get("tasks") or {}).get(task) or {}).get("sha256")
    if want and checkpoint and os.path.exists(checkpoint) and want == cached_sha256(checkpoint):
        return comps
    what = "another version of" if want else "other models than"
    reason = (f"the images match commissioned site {site}, but the site was commissioned ({ev.get('date', '?')}) for "
              f"{what} {task}: its results there are not validated; an admin must commission the site again")
    training = float((ic.get("reference_scores") or {}).get("training", MAX_SCORE))
    comps["intensity"] = {**ic, "passed": False, "score": round(max(training, 1.0 + 1e-4), 4), "reference": "training",
                          "reasons": [reason], "site_evidence": {"site": site, "task": task, "commissioned_sha256": want}}
    return comps


def write_reference(models: str, ref: dict) -> str:
    """Replace ``<models>/input_check.json`` atomically (the server rereads it by modification time)."""
    path = os.path.join(models, REFERENCE_FILE)
    tmp = path + ".part"
    with open(tmp, "w") as fh:
        json.dump(ref, fh, indent=1)
    os.replace(tmp, path)
    return path


def set_site(models: str, site: str, intensity: dict | None, evidence: dict | None = None,
             geometry: dict | None = None) -> str:
    """Add (or, with `intensity` None, remove) a commissioned site in ``<models>/input_check.json``. Read, change
    and replace under an exclusive lock on ``<models>/.input_check.lock``: two admins commissioning at once
    (or a commissioning and a withdrawal) each keep their change."""
    import fcntl

    path = os.path.join(models, REFERENCE_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"no {REFERENCE_FILE} in {models}: fit the input check first (python -m parotid.input_check fit)")
    with open(os.path.join(models, ".input_check.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as fh:
            ref = json.load(fh)
        sites = ref.setdefault("sites", {})
        if intensity is None:
            if site not in sites:
                raise SystemExit(f"site '{site}' is not commissioned in {path} (commissioned: {', '.join(sites) or 'none'})")
            del sites[site]
        else:
            sites[site] = {"intensity": intensity, "geometry": geometry, "evidence": evidence or {}}
        return write_reference(models, ref)


def recalibrate_command(models: str, cal_folder: str) -> dict:
    """Apply `scale_familywise` to a fitted reference (input_check.json) with a calibration cohort's
    intensity features only (no model runs): for references fitted before the family-wise step."""
    from parotid.study import read_study

    path = os.path.join(models, REFERENCE_FILE)
    with open(path) as fh:
        ref = json.load(fh)
    rows = [intensity_features(read_study(r.image, r.study_id)) for r in _cohort(cal_folder)]
    f = scale_familywise(ref["intensity"], rows)
    write_reference(models, ref)
    return {"reference": path, "calibration_studies": len(rows), "familywise_scale": f}


def classifier_features_cropset(model, cfg: dict, cs, idx, drop=()) -> np.ndarray:
    """Pooled features of cohort crops (the training path: `CropSet` of parotid.classification.data), from
    the sequences each study has, minus `drop` (as if missing: zero channel, absent branch)."""
    import torch

    from parotid.classification.missing import cropset_presence

    seqs = [s for g in cfg["groups"] for s in g]
    chans = cs.channels(seqs)
    out = []
    for b in range(0, len(idx), 16):
        ii = np.asarray(idx)[b:b + 16]
        x = torch.from_numpy(cs.slices[ii][:, :, chans].astype(np.float32))
        for q in drop:
            if q in seqs:
                x[:, :, seqs.index(q)] = 0.0
        with torch.no_grad():
            out.append(pooled_features(model, model.slice_features(x, torch.from_numpy(cs.box[ii]),
                                                                   cropset_presence(cs, cfg["groups"], ii, drop))))
    return np.concatenate(out)


def classifier_features_study(model, cfg: dict, study: Study, roi) -> np.ndarray:
    """Pooled feature of one study and box (the inference path: parotid.classification.predict.prepare)."""
    import torch

    from parotid.classification.predict import prepare

    from parotid.classification.missing import presence_tensor

    x, box, _ = prepare(study, [int(v) for v in roi], cfg)
    with torch.no_grad():
        return pooled_features(model, model.slice_features(x, box, presence_tensor(cfg["groups"], study.sequences)))[0]


def stamp_checkpoint(path: str, density: FeatureDensity) -> None:
    """Write the density into a classifier checkpoint; every other entry (weights, config, keys added by
    other tools) is kept as loaded, so the weights stay bit-identical."""
    from parotid.classification.checkpoint import stamp_input_check

    stamp_input_check(path, density.to_checkpoint())


def _ensure_cohort(folder: str, seed: int, n: int) -> str:
    if not os.path.exists(os.path.join(folder, "datastore_v2.json")):
        from parotid.synth.cohort import write_cohort

        print(f"generating SYNTHETIC cohort seed {seed} n {n} in {folder}", flush=True)
        write_cohort(folder, n, seed, raw=False, progress=False)
    return folder


def fit_command(models: str, work: str, train_seed: int = 101, train_n: int = 240, cal_seed: int = 202,
                cal_n: int = 60, n_neighbors: int = 10, classifiers_only: bool = False, reference_only: bool = False) -> dict:
    """Fit the reference file and the classifier densities for the models in `models` (idempotent).
    `classifiers_only`: keep input_check.json (it depends on the segmentation model only);
    `reference_only`: refit input_check.json only (after retraining the segmentation model)."""
    import glob

    import torch

    from parotid.classification.data import build_cropset
    from parotid.classification.missing import SUBSETS
    from parotid.classification.checkpoint import load_checkpoint
    from parotid.classification.task_model import subset_features
    from parotid.study import read_study, study_from_array

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    train_dir = _ensure_cohort(os.path.join(work, f"c{train_seed}"), train_seed, train_n)
    cal_dir = _ensure_cohort(os.path.join(work, f"cal{cal_seed}"), cal_seed, cal_n)
    seg_path = os.path.join(models, "segmentation.pt")
    summary = {"reference": os.path.join(models, REFERENCE_FILE), "classifiers": {}}
    if not classifiers_only:
        summary["reference_fitted"] = _fit_reference_file(models, train_dir, cal_dir, seg_path, train_seed, train_n,
                                                          cal_seed, cal_n)
    if reference_only:
        return summary
    cal_recs = _cohort(cal_dir)
    cal_studies = [read_study(r.image, r.study_id) for r in cal_recs]
    for path in sorted(glob.glob(os.path.join(models, "classify_*.pt"))):
        model, cfg = load_checkpoint(path)
        cs = build_cropset(train_dir, size=int(cfg["size"]), n_slices=int(cfg["n_slices"]))
        keep = _usable(cs, cfg)
        train_f = subset_features(model, cfg["groups"], cs, keep)  # every served sequence subset (missing.py)
        req = cfg.get("required", cfg["sequences"])
        cal_f = []
        for s, r in zip(cal_studies, cal_recs):
            for drop in SUBSETS.values():
                have = [q for q in s.sequences if q not in drop]
                if all(q in have for q in req) and (not drop or any(q in s.sequences for q in drop)):
                    sub = s if len(have) == len(s.sequences) else study_from_array(s.array(have), have, s.reference)
                    cal_f.append(classifier_features_study(model, cfg, sub, r.roi))
        cal_f = np.array(cal_f)
        d = fit_feature_density(train_f, n_neighbors, cal_f)
        stamp_checkpoint(path, d)
        summary["classifiers"][os.path.basename(path)] = {"n_train": len(train_f), "n_calibration": len(cal_f),
                                                           "threshold": round(d.threshold, 4)}
    return summary


def _fit_reference_file(models, train_dir, cal_dir, seg_path, train_seed, train_n, cal_seed, cal_n) -> bool:
    ref = fit_reference(study_rows(train_dir, seg_path), study_rows(cal_dir, seg_path))
    ref["fitted"] = {"command": "python -m parotid.input_check fit", "train_cohort": f"parotid-synth --seed {train_seed} --n {train_n}",
                     "calibration_cohort": f"parotid-synth --seed {cal_seed} --n {cal_n}", "margin": MARGIN,
                     "segmentation_checkpoint_sha256": sha256_of(seg_path), "synthetic": True}
    old = load_reference(models) or {}
    if old.get("sites"):  # commissioned sites depend on the scanners, not on the models: kept (their evidence
        ref["sites"] = old["sites"]  # names the checkpoints it was measured with; docs/input-check.md)
    write_reference(models, ref)
    return True


def _usable(cs, cfg: dict) -> list[int]:
    """Cohort rows the classifier was trained on: class in its label set, required sequences present."""
    from parotid.labels import get_label_set

    ls = get_label_set(cfg["label_set"])
    req = cs.channels(cfg.get("required", cfg["sequences"]))
    return [i for i, c in enumerate(cs.tumor_class) if ls.accepts(c) and all(cs.avail[i, req])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parotid.input_check",
                                 description="Fit the input check (out-of-distribution detection) for the served models.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="reference statistics (input_check.json) + classifier feature densities (in classify_*.pt)")
    f.add_argument("--models", default="apps/parotid/model", help="model folder (segmentation.pt, classify_*.pt)")
    f.add_argument("--work", default="/tmp/parotid-train", help="where the SYNTHETIC cohorts are (generated when absent)")
    f.add_argument("--train-seed", type=int, default=101, help="training cohort of the classifiers (scripts/train_models.sh)")
    f.add_argument("--train-n", type=int, default=240)
    f.add_argument("--cal-seed", type=int, default=202, help="held-out calibration cohort (a seed never used for training)")
    f.add_argument("--cal-n", type=int, default=60)
    f.add_argument("--neighbors", type=int, default=10, help="Local Outlier Factor n_neighbors")
    f.add_argument("--classifiers-only", action="store_true",
                   help="refit only the classifier densities (after retraining classifiers; keeps input_check.json)")
    f.add_argument("--reference-only", action="store_true",
                   help="refit only input_check.json (after retraining the segmentation model; keeps classify_*.pt)")
    rc = sub.add_parser("recalibrate", help="family-wise intensity thresholds for an already fitted input_check.json")
    rc.add_argument("--models", default="apps/parotid/model")
    rc.add_argument("--calibration", required=True, help="the held-out calibration cohort folder (seed 202, n 60)")
    ls_ = sub.add_parser("sites", help="list the commissioned sites (parotid-eval commission) with their evidence")
    ls_.add_argument("--models", default="apps/parotid/model")
    rm = sub.add_parser("remove-site", help="withdraw a commissioned site (its studies are compared with the training "
                                            "cohort only again)")
    rm.add_argument("--models", default="apps/parotid/model")
    rm.add_argument("--site", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "sites":
        ref = load_reference(a.models) or {}
        print(json.dumps({k: v.get("evidence", {}) for k, v in (ref.get("sites") or {}).items()}, indent=1))
        return 0
    if a.cmd == "remove-site":
        print(json.dumps({"removed": a.site, "reference": set_site(a.models, a.site, None)}))
        return 0
    if a.cmd == "recalibrate":
        print(json.dumps(recalibrate_command(a.models, a.calibration), indent=1))
        return 0
    print(json.dumps(fit_command(a.models, a.work, a.train_seed, a.train_n, a.cal_seed, a.cal_n, a.neighbors,
                                        a.classifiers_only, a.reference_only), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
