"""Distributed data parallel (torch.distributed, gloo on CPU): 2 processes with DistributedSampler
end with the same weights as 1 process trained on the same global batches.

Same init (seeded), dropout off. Stage 1's ResNet BatchNorm is replaced by Identity here: on CPU
BatchNorm statistics are per process (SyncBatchNorm needs GPUs; the engine converts to it under
nccl), which is not the global batch's statistics."""

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from parotid.classification import engine  # noqa: F401  (imported before forking: the workers inherit it)
from toy_cohort import write_toy_cohort

GLOBAL_BATCH = 8


def _no_dropout(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    return model


def _no_batchnorm(model: nn.Module) -> nn.Module:
    for name, m in model.named_children():
        if isinstance(m, nn.BatchNorm2d):
            setattr(model, name, nn.Identity())
        else:
            _no_batchnorm(m)
    return model


def _sgd(params):
    """SGD, linear in the gradients: float rounding of the all-reduce stays ~1e-7 (Adam's first steps
    are ~lr * sign(gradient), which turns rounding noise on near-zero gradients into lr-sized steps)."""
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def train_both_stages(cs) -> dict:
    """Stage 1 (image network via the engine) and stage 2 (train_sequence_head) for a few iterations."""
    from parotid.classification import engine
    from parotid.classification.models import ImageNet, SequenceModel
    from parotid.classification.liu import class_weights, train_sequence_head

    y = np.minimum(np.arange(len(cs)) * 7 % 5, 3)  # unbalanced: class weights differ, so do per-process weight sums
    ch = cs.channels(["T2", "CET1"])
    torch.manual_seed(0)
    net = _no_batchnorm(_no_dropout(ImageNet(2, 4)))
    idx = np.arange(len(cs))
    ds = engine.TumourSliceDataset(cs, idx, ch, y, per_study=2, seed=0, drop_channels=[1], p_drop=0.5)
    engine.run_supervised(net, ds, None, engine.WeightedCrossEntropy(class_weights(y, 4)),
                          lambda m: _sgd(m.parameters()), 2, GLOBAL_BATCH,
                          engine.prepare_image_box, seed=0)
    torch.manual_seed(1)
    model = _no_dropout(SequenceModel([[0, 1]], 4, cs.slices.shape[1], "spl"))
    feats = torch.randn(len(cs), cs.slices.shape[1], model.d_model, generator=torch.Generator().manual_seed(2))
    train_sequence_head(model, feats, y, epochs=2, batch=GLOBAL_BATCH, seed=0, optimizer_fn=_sgd)
    return {"stage1": net.state_dict(), "stage2": model.state_dict()}


def _worker(rank: int, world: int, init_file: str, cs, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(train_both_stages(cs), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    from parotid.classification.data import build_cropset

    torch.set_num_threads(1)
    write_toy_cohort(str(tmp_path / "toy"), 16, seed=1)
    cs = build_cropset(str(tmp_path / "toy"), size=32, n_slices=4)  # 16 studies x 2 slices = 4 global batches / epoch
    import ignite.metrics  # noqa: F401
    import monai.engines  # noqa: F401
    import monai.handlers  # noqa: F401
    import monailabel.tasks.train.handler  # noqa: F401

    # fork: the workers inherit the imports (spawn re-imports MONAI, ~30 s per process on a busy CPU);
    # the CLI (--nproc) spawns, as GPUs need
    mp.start_processes(_worker, args=(2, str(tmp_path / "rendezvous"), cs, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = train_both_stages(cs)
    for stage in ("stage1", "stage2"):
        moved = 0.0
        for k, v in single[stage].items():
            if not v.is_floating_point():
                continue
            assert torch.equal(r0[stage][k], r1[stage][k]), f"{stage} {k}: ranks not synchronised"
            assert torch.allclose(r0[stage][k], v, atol=1e-5, rtol=0), \
                f"{stage} {k}: DDP vs 1 process max diff {float((r0[stage][k] - v).abs().max()):.2e}"
            moved = max(moved, float((v - _init(stage, cs)[k]).abs().max()))
        assert moved > 1e-3, f"{stage}: weights did not change"


def _init(stage: str, cs) -> dict:
    from parotid.classification.models import ImageNet, SequenceModel

    torch.manual_seed(0 if stage == "stage1" else 1)
    m = _no_batchnorm(ImageNet(2, 4)) if stage == "stage1" else SequenceModel([[0, 1]], 4, cs.slices.shape[1], "spl")
    return m.state_dict()
