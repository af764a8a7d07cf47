"""Inference for one study: calibrated probabilities, MC-dropout uncertainty and a Grad-CAM volume.

Used by the MONAI Label infer task (apps/parotid/lib/infers/classify.py) and by tests; no server code.

* probabilities: softmax(logits / T), T fitted by temperature scaling on a validation split at
  training time and stored in the checkpoint;
* uncertainty (``undetermined``): MC dropout — the dropout layers of the sequence head are kept
  active for `passes` forward passes over the (deterministic) slice features; the study is
  undetermined when the mean top-class probability is below ``max_top_prob_below`` or the standard
  deviation of the malignancy probability exceeds ``max_std_above`` (both in the checkpoint);
* heatmap, one of :data:`HEATMAP_METHODS` for the predicted class, one map per slice, pasted back onto
  the reference grid and normalised JOINTLY over the volume (divided by the global maximum; MONAI's
  default normaliser would rescale every slice to 0..1 separately):
  ``gradcam_x_readout`` (default) is OUR hybrid map, Grad-CAM multiplied by the RoI-Align read-out
  weight (see ``gradcam_volume``); ``gradcam`` is plain Grad-CAM (``monai.visualize.GradCAM`` on the
  CNN's ``layer2``).
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch

from parotid.input_check import combine, mark_classification
from parotid.model_space import checkpoint_spacing, to_model_space
from parotid.study import Study, StudyError, check_roi

from .crops import Crop, extract_crop, paste_heatmap
from .missing import presence_tensor, used_and_missing
from .models import SequenceModel


def prepare(study: Study, roi, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, Crop]:
    check_roi(roi, study.shape)
    study.require(cfg.get("required", cfg["sequences"]))
    seqs = [s for g in cfg["groups"] for s in g]
    present = [s for s in seqs if s in study.sequences]
    full = study.array(present)
    arr = np.zeros((len(seqs),) + tuple(study.shape), np.float32)  # optional missing sequence -> zero channel
    for c, s in enumerate(seqs):
        if s in present:
            arr[c] = full[present.index(s)]
    if not np.isfinite(arr).all():
        raise StudyError("study contains NaN or infinite voxels")
    crop = extract_crop(arr, roi, cfg["size"], cfg["n_slices"], cfg.get("margin", 0.25))
    return torch.from_numpy(crop.slices)[None], torch.from_numpy(crop.box)[None], crop


# params.heatmap -> what the map is (result["heatmap"]["method"], /info, Slicer). "roi" is the old name of
# the hybrid map, still accepted.
HEATMAP_METHODS = {
    "gradcam_x_readout": "Grad-CAM x RoI-Align read-out weight (layer2; hybrid map, not plain Grad-CAM)",
    "gradcam": "Grad-CAM (plain, layer2)",
}
HEATMAP_ALIASES = {"roi": "gradcam_x_readout"}


def _identity(x):
    return x


# Grad-CAM hooks the SHARED served network; one Grad-CAM at a time (hooks fire on every forward of the
# module, so two concurrent ones would record each other's activations). Other forwards on the same
# network must not overlap either: the server serialises inference per model (pacs/sr_policy.py).
_GRADCAM_LOCK = threading.Lock()


@contextlib.contextmanager
def _hooks_removed_after(module: torch.nn.Module):
    """Remove, on exit, every forward/backward hook registered on `module`'s submodules inside the block.
    Hand-written because MONAI's ModelWithHooks registers hooks without keeping the handles
    (issue 11: one hook pair per branch per request used to stay on the cached network)."""
    before = {m: (set(m._forward_hooks), set(m._backward_hooks)) for m in module.modules()}
    try:
        yield
    finally:
        for m, (fwd, bwd) in before.items():
            for k in set(m._forward_hooks) - fwd:
                del m._forward_hooks[k]
            for k in set(m._backward_hooks) - bwd:
                del m._backward_hooks[k]


def branch_weights(model: SequenceModel, x: torch.Tensor, box: torch.Tensor, class_idx: int, clinical=None,
                   present: torch.Tensor | None = None) -> np.ndarray:
    """Share of each branch in the class score at the fusion layer: ReLU(sum over slices and features of
    feature x d score / d feature) per branch (gradient x input on the fused slice features), normalised
    to sum 1; a missing branch gets 0. One branch (early fusion): [1.0]."""
    if len(model.branches) == 1:
        return np.ones(1)
    with torch.no_grad():
        feats = model.branch_features(x, box, present)
    with torch.enable_grad():
        feats = [f.detach().requires_grad_(True) for f in feats]
        score = model.forward_features(model.fuse(feats), clinical)[0, class_idx]
        grads = torch.autograd.grad(score, feats)
    w = np.array([max(float((f.detach() * g).sum()), 0.0) for f, g in zip(feats, grads)])
    if present is not None:
        w = w * present[0].numpy()
    if w.sum() <= 0:  # no branch raises the score: the available branches alike
        w = np.ones(len(w)) if present is None else present[0].numpy().astype(float)
    return w / w.sum()


def gradcam_volume(model: SequenceModel, x: torch.Tensor, box: torch.Tensor, crop: Crop, shape, roi,
                   class_idx: int, clinical=None, mode: str = "gradcam_x_readout", present: torch.Tensor | None = None,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Grad-CAM for `class_idx` as a (I, J, K) float32 volume in 0..1. Several branches (late fusion):
    one map per branch (missing branches skipped), each scaled to maximum 1 and combined with
    `weights` (default ``branch_weights``: each branch's share of the class score at the fusion layer).

    mode "gradcam": plain ``monai.visualize.GradCAM`` on ``layer2`` (ReLU of the gradient-weighted
    channel sum). mode "gradcam_x_readout" (default, a hybrid of ours): the same map multiplied by the spatial read-out weight of
    the RoI-Align head, sum_c |d score / d A_c| at each layer2 position (from the same backward pass),
    because the classifier pools layer2 only through roi_align on the box: plain Grad-CAM spreads
    over the whole crop window (measured: no more mass in the box than a uniform map).
    """
    from .batched import gradcam_slice_maps  # one implementation, batched or not

    if weights is None:
        weights = branch_weights(model, x, box, class_idx, clinical, present)
    maps = gradcam_slice_maps(model, x, box, [class_idx], clinical, mode, present, np.asarray(weights)[None])[0]
    return heatmap_volume(maps, crop, shape, roi)


def heatmap_volume(maps: np.ndarray, crop: Crop, shape, roi) -> np.ndarray:
    """(N, S, S) slice maps pasted onto the (I, J, K) grid, divided by the volume maximum (float32 0..1)."""
    vol = paste_heatmap(maps, crop, shape, roi)
    mx = float(vol.max())
    return (vol / mx).astype(np.float32) if mx > 0 else vol


@torch.no_grad()
def mc_dropout(model: SequenceModel, feats: torch.Tensor, temperature: float, passes: int, seed: int = 0,
               clinical=None) -> np.ndarray:
    """(passes, classes) calibrated probabilities with the head's dropout active."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model.encoder.train()
        model.head.train()
        out = [torch.softmax(model.forward_features(feats, clinical) / temperature, 1)[0] for _ in range(passes)]
        model.eval()
    return torch.stack(out).numpy()


def classify(model: SequenceModel, cfg: dict, study: Study, roi, heatmap: bool = True, clinical=None,
             heatmap_mode: str = "gradcam_x_readout", input_components: dict | None = None,
             batched: bool = False) -> tuple[dict, np.ndarray | None]:
    """Returns (result JSON, heatmap volume (I, J, K) or None), both on the STUDY grid.

    The study is resampled to the checkpoint's training spacing (``cfg["spacing"]``, see
    parotid.model_space) and the box mapped onto that grid; the heatmap comes back linearly. The result's
    ``input_check`` combines `input_components` (study and box checks of parotid.input_check, computed by
    the caller) with the classifier-feature density check; a failed check makes the result undetermined.
    ``batched``: the network part goes through the model's micro-batcher (parotid.classification.batched),
    shared with concurrent calls on the same model (the server); same results within float tolerance."""
    roi = [int(v) for v in roi]
    check_roi(roi, study.shape)  # errors name the study's grid, not the model's
    space = to_model_space(study, checkpoint_spacing(cfg))
    mroi = space.roi_to_model(roi)
    x, box, crop = prepare(space.model_study, mroi, cfg)
    present = presence_tensor(cfg["groups"], study.sequences)  # absent branches drop out (missing.py)
    used, missing = used_and_missing(cfg["groups"], study.sequences)
    heatmap_mode = HEATMAP_ALIASES.get(heatmap_mode, heatmap_mode)
    if heatmap_mode not in HEATMAP_METHODS:
        raise StudyError(f"heatmap must be one of {sorted(HEATMAP_METHODS)}, got {heatmap_mode!r}")
    T = float(cfg.get("temperature", 1.0))
    unc = cfg.get("uncertainty", {})
    passes = int(unc.get("passes", 20))
    from .batched import NetworkRequest, run_network  # the network part, micro-batched when `batched`

    net = run_network(model, NetworkRequest(x, box, T, passes, clinical, heatmap_mode if heatmap else None,
                                            present=present), batched)
    prob, mc = net.prob, net.mc
    classes = cfg["classes"]
    mal_idx = [i for i, c in enumerate(classes) if c in cfg.get("malignant", [])]
    top = int(np.argmax(prob))
    mc_mean = mc.mean(0)
    mal_std = float(mc[:, mal_idx].sum(1).std()) if mal_idx else 0.0
    undetermined = bool(mc_mean.max() < unc.get("max_top_prob_below", 0.6) or mal_std > unc.get("max_std_above", 0.15))
    reasons = [f"uncertain (MC dropout: top-class probability {mc_mean.max():.2f}, malignancy std {mal_std:.2f})"] if undetermined else []
    result = {
        "prediction": [{"idx": i, "label": c, "score": float(p)} for i, (c, p) in enumerate(zip(classes, prob))],
        "predicted_class": classes[top],
        "malignancy_probability": float(prob[mal_idx].sum()) if mal_idx else None,
        "undetermined": undetermined,
        "undetermined_reasons": reasons,
        "uncertainty": {"method": "mc_dropout", "passes": passes, "mc_top_probability": float(mc_mean.max()),
                        "malignancy_std": mal_std,
                        "thresholds": {"max_top_prob_below": unc.get("max_top_prob_below", 0.6),
                                       "max_std_above": unc.get("max_std_above", 0.15)}},
        "model": cfg.get("task", ""),
        "version": cfg.get("version", ""),
        "trained_at": cfg.get("trained", {}).get("date"),
        "roi": roi,
        "label_set": cfg["label_set"],
        "sequences": cfg["sequences"],
        "missing_sequences": missing,
        "sequences_used": used,
        "sequences_missing": missing,
        "fusion": cfg["fusion"],
        "temperature": T,
        "synthetic_training_data": bool(cfg.get("trained", {}).get("synthetic", False)),
        **space.params,
    }
    if space.resampled:
        result["model_roi"] = mroi  # the box on the model's grid (same physical region)
    mark_classification(result, combine({**(input_components or {}), "feature_density": net.density}))
    weights = net.weights
    result["heatmap"] = {"method": HEATMAP_METHODS[heatmap_mode]
                         + (", per branch, combined by the branches' shares of the class score" if len(model.branches) > 1 else ""),
                         "mode": heatmap_mode, "class": classes[top], "normalisation": "joint (volume maximum)",
                         "branch_weights": {"+".join(g): round(float(w), 4) for g, w in zip(cfg["groups"], weights)}} if heatmap else None
    vol = heatmap_volume(net.maps, crop, space.model_study.shape, mroi) if heatmap else None
    if vol is not None and space.resampled:
        vol = space.values_to_study(vol)
        mx = float(vol.max())
        vol = vol / mx if mx > 0 else vol  # joint normalisation again, on the study grid
    return result, vol
