"""The network part of a classification, for a batch of requests to one model (issue 11).

``run_network(model, request, batched)`` is what parotid.classification.predict.classify calls: with
``batched=True`` the request goes through the model's micro-batcher (parotid.batching), so concurrent
requests share one forward pass of the slice CNN and one Grad-CAM backward pass; otherwise it runs
as a batch of one. Per request and batch-independent (eval mode: BatchNorm uses running statistics,
RoI-Align reads each crop's own box, the transformer attends within one study):

* calibrated probabilities softmax(logits / T) of the request's own checkpoint temperature;
* MC dropout: the request's own ``passes`` forward passes of the sequence head, seeded per request
  (``predict.mc_dropout``), so its dropout masks do not depend on the other requests of the batch;
* the classifier-feature density check;
* Grad-CAM for the request's own predicted class (``monai.visualize.GradCAM`` over the batch: the
  wrapped network returns each study's score for its own class, so the summed backward pass gives
  every study the gradient of its own score) and, in mode "gradcam_x_readout", the RoI-Align read-out
  weight normalised per request; late fusion: per branch, combined by the study's branch shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from monai.visualize import GradCAM

from parotid.batching import batcher_for

from .models import SequenceModel
from .predict import _GRADCAM_LOCK, _hooks_removed_after, _identity, mc_dropout


@dataclass
class NetworkRequest:
    x: torch.Tensor  # (1, N, C, S, S) slice crops
    box: torch.Tensor  # (1, 4) box on the crop
    temperature: float
    passes: int  # MC dropout passes
    clinical: Optional[torch.Tensor] = None  # (1, n_clinical) or None
    heatmap_mode: Optional[str] = None  # "gradcam_x_readout" | "gradcam" | None: no heatmap
    seed: int = 0  # MC dropout seed
    present: Optional[torch.Tensor] = None  # (1, branches) bool: absent branches drop out (missing.py)


@dataclass
class NetworkResult:
    prob: np.ndarray  # (classes,) float64, sums to 1
    mc: np.ndarray  # (passes, classes)
    feats: torch.Tensor  # (1, N, D) slice features
    density: Optional[dict]  # parotid.input_check feature-density component (None: no density model)
    maps: Optional[np.ndarray]  # (N, S, S) Grad-CAM slice maps for the top class, or None
    weights: Optional[np.ndarray] = None  # (branches,) each branch's share of the class score (heatmap only)


class _OwnClassScore(torch.nn.Module):
    """For ``monai.visualize.GradCAM`` over a batch of studies: (B, N*C, S, S), slices folded into
    channels, -> (B, 1), each study's logit of its own class (so ``class_idx=0`` selects it)."""

    def __init__(self, model: SequenceModel, n_slices: int, box: torch.Tensor, classes: torch.Tensor, clinical=None,
                 present: Optional[torch.Tensor] = None):
        super().__init__()
        self.model, self.n_slices, self.box, self.classes = model, n_slices, box, classes
        self.clinical, self.present = clinical, present

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        logits = self.model(x.reshape(B, self.n_slices, -1, *x.shape[-2:]), self.box, self.clinical, self.present)
        return logits.gather(1, self.classes[:, None])


def gradcam_slice_maps(model: SequenceModel, x: torch.Tensor, box: torch.Tensor, classes: List[int],
                       clinical=None, mode: str = "gradcam_x_readout", present: Optional[torch.Tensor] = None,
                       weights: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """Grad-CAM on every branch's ``layer2`` for a batch `x` (B, N, C, S, S): one (N, S, S) array of
    slice maps per study (see predict.gradcam_volume for the modes). Each branch's maps are scaled to
    maximum 1 per study and combined with `weights` (B, branches) (predict.branch_weights; default:
    equal); a branch with weight 0 (missing sequence) is skipped."""
    B, N = x.shape[:2]
    nb = len(model.branches)
    w = np.ones((B, nb)) if weights is None else np.asarray(weights, dtype=float).reshape(B, nb)
    # eval(): MONAI's ModelWithHooks restores the wrapper's training flag after its pass, and a new module
    # is in training mode: that would leave the served network in training mode, so that the next pass
    # without model.eval() (e.g. branch_weights) updates BatchNorm running statistics, i.e. changes the
    # served model (seen: probabilities of later requests moved by up to 2.5e-3).
    wrapper = _OwnClassScore(model, N, box, torch.as_tensor(classes, dtype=torch.long), clinical, present).eval()
    xf = x.reshape(B, -1, *x.shape[-2:])
    total = None
    for b in range(nb):
        if not (w[:, b] > 0).any():
            continue  # missing branch or no contribution to any study's class score
        layer = f"model.branches.{b}.trunk.layer2"
        with _GRADCAM_LOCK, _hooks_removed_after(model), torch.enable_grad():
            cam = GradCAM(nn_module=wrapper, target_layers=layer, postprocessing=_identity)
            m = cam(xf, class_idx=0)  # (B*N, 1, S, S), >= 0 (ReLU inside GradCAM)
            grads = cam.nn_module.gradients[layer].detach()
            model.zero_grad(set_to_none=True)  # drop the parameter gradients the backward pass left
            # break the reference cycle through torch's backward-hook closure (see predict.gradcam_volume)
            cam.nn_module.activations.clear()
            cam.nn_module.gradients.clear()
            cam.nn_module.score = None
        m = m.detach()
        if mode == "gradcam_x_readout":
            g = grads.abs().sum(1, keepdim=True)
            g = torch.nn.functional.interpolate(g, size=m.shape[-2:], mode="bilinear", align_corners=False)
            g = g.reshape(B, N, *g.shape[1:])
            g = g / g.flatten(1).max(1).values.clamp_min(1e-12).reshape(B, 1, 1, 1, 1)  # per study
            m = m * g.reshape(B * N, *g.shape[2:])
        m = m.reshape(B, N, *m.shape[1:])
        m = m / m.flatten(1).max(1).values.clamp_min(1e-12).reshape(B, 1, 1, 1, 1)  # per study, maximum 1
        m = (m * torch.as_tensor(w[:, b], dtype=m.dtype).reshape(B, 1, 1, 1, 1)).reshape(B * N, *m.shape[2:])
        total = m if total is None else total + m
    if total is None:
        total = torch.zeros(B * N, 1, *x.shape[-2:])
    maps = total[:, 0].numpy()
    return [maps[i * N:(i + 1) * N] for i in range(B)]


def run_network_batch(model: SequenceModel, requests: List[NetworkRequest]) -> List[NetworkResult]:
    """All network work for `requests` (same model): one forward pass for the batch, per-request MC
    dropout and density check, one Grad-CAM pass per heatmap mode."""
    from parotid.input_check import feature_density_check

    from .predict import branch_weights

    shapes = {tuple(r.x.shape[1:]) for r in requests}
    if (len(shapes) > 1 or len({r.clinical is None for r in requests}) > 1
            or len({r.present is None for r in requests}) > 1):  # not stackable: one by one
        return [run_network_batch(model, [r])[0] for r in requests]
    model.eval()
    x = torch.cat([r.x for r in requests])
    box = torch.cat([r.box for r in requests])
    clinical = None if requests[0].clinical is None else torch.cat([r.clinical for r in requests])
    present = None if requests[0].present is None else torch.cat([r.present for r in requests])
    with torch.no_grad():
        feats = model.slice_features(x, box, present)
        logits = model.forward_features(feats, clinical)
    out: List[NetworkResult] = []
    for i, r in enumerate(requests):
        prob = torch.softmax(logits[i:i + 1] / r.temperature, 1)[0].numpy().astype(np.float64)
        f = feats[i:i + 1]
        c = None if clinical is None else clinical[i:i + 1]
        mc = mc_dropout(model, f, r.temperature, r.passes, seed=r.seed, clinical=c)
        out.append(NetworkResult(prob / prob.sum(), mc, f, feature_density_check(model, f), None))
    for mode in {r.heatmap_mode for r in requests} - {None}:
        idx = [i for i, r in enumerate(requests) if r.heatmap_mode == mode]
        tops = [int(np.argmax(out[i].prob)) for i in idx]
        for i, top in zip(idx, tops):  # each study's branch shares of its own class score
            out[i].weights = branch_weights(model, x[i:i + 1], box[i:i + 1], top,
                                            None if clinical is None else clinical[i:i + 1],
                                            None if present is None else present[i:i + 1])
        maps = gradcam_slice_maps(model, x[idx], box[idx], tops, None if clinical is None else clinical[idx], mode,
                                  None if present is None else present[idx], np.stack([out[i].weights for i in idx]))
        for i, m in zip(idx, maps):
            out[i].maps = m
    return out


def run_network(model: SequenceModel, request: NetworkRequest, batched: bool = False) -> NetworkResult:
    """`request` alone, or (``batched``) through the model's micro-batcher with concurrent requests."""
    if not batched:
        return run_network_batch(model, [request])[0]
    return batcher_for(model, run_network_batch).submit(request)
