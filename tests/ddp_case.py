"""The training case that the DDP equivalence checks share (tests/test_classification_ddp.py on CPU/gloo,
benchmarks/ddp_gpu_check.py on a GPU machine): both classifier stages for a few iterations on a crop set,
seeded, dropout off, SGD. Imports nothing that reads files, so it also runs where SimpleITK is absent."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

GLOBAL_BATCH = 8


def no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def no_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm -> Identity: without SyncBatchNorm (CPU, gloo) BatchNorm statistics are per process,
    which is not the global batch's statistics."""
    for name, m in model.named_children():
        if isinstance(m, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            no_batchnorm(m)
    return model


def sgd(params):
    """SGD, linear in the gradients: float rounding of the all-reduce stays ~1e-7 (Adam's first steps
    are ~lr * sign(gradient), which turns rounding noise on near-zero gradients into lr-sized steps)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def class_labels(n: int) -> np.ndarray:
    """Unbalanced labels: class weights differ, so do per-process weight sums."""
    return np.minimum(np.arange(n) * 7 % 5, 3)


def image_net(keep_batchnorm: bool = False) -> nn.Module:
    from parotid.classification.models import ImageNet

    torch.manual_seed(0)
    net = no_dropout(ImageNet(2, 4))
    return net if keep_batchnorm else no_batchnorm(net)


def sequence_model(cs) -> nn.Module:
    from parotid.classification.models import SequenceModel

    torch.manual_seed(1)
    return no_dropout(SequenceModel([[0, 1]], 4, cs.slices.shape[1], "spl"))


def train_both_stages(cs, keep_batchnorm: bool = False, one_step: bool = False) -> dict:
    """Stage 1 (image network via the engine) and stage 2 (train_sequence_head) for 2 epochs each;
    returns both state dicts (on the CPU: the engine moves models back after training). `one_step`:
    stage 1 takes a single SGD step on one global batch (4 studies x 2 slices), so that float rounding
    has no iterations to grow in (BatchNorm over small batches amplifies it)."""
    from parotid.classification import engine
    from parotid.classification.liu import class_weights, train_sequence_head

    y = class_labels(len(cs))
    ch = cs.channels(["T2", "CET1"])
    net = image_net(keep_batchnorm)
    idx = np.arange(GLOBAL_BATCH // 2 if one_step else len(cs))
    ds = engine.TumourSliceDataset(cs, idx, ch, y, per_study=2, seed=0, drop_channels=[1], p_drop=0.5)
    engine.run_supervised(net, ds, None, engine.WeightedCrossEntropy(class_weights(y, 4)),
                          lambda m: sgd(m.parameters()), 1 if one_step else 2, GLOBAL_BATCH,
                          engine.prepare_image_box, seed=0)
    model = sequence_model(cs)
    feats = torch.randn(len(cs), cs.slices.shape[1], model.d_model, generator=torch.Generator().manual_seed(2))
    train_sequence_head(model, feats, y, epochs=2, batch=GLOBAL_BATCH, seed=0, optimizer_fn=sgd)
    return {"stage1": net.state_dict(), "stage2": model.state_dict()}


def initial_state(stage: str, cs, keep_batchnorm: bool = False) -> dict:
    return (image_net(keep_batchnorm) if stage == "stage1" else sequence_model(cs)).state_dict()


def max_differences(a: dict, b: dict) -> dict[str, dict]:
    """Per stage, over the floating-point tensors of two results: the largest absolute difference, the
    largest relative one (max |a - b| / max |b| of a tensor; BatchNorm's running variance is large, so
    absolute differences alone mislead) and the tensor where the relative one is."""
    out = {}
    for stage in a:
        worst = {"abs": 0.0, "rel": 0.0, "at": ""}
        for k, v in a[stage].items():
            if not v.is_floating_point():
                continue
            d = float((v.float() - b[stage][k].float()).abs().max())
            rel = d / max(float(b[stage][k].float().abs().max()), 1e-12)
            worst["abs"] = max(worst["abs"], d)
            if rel > worst["rel"]:
                worst["rel"], worst["at"] = rel, k
        out[stage] = worst
    return out
