"""Training loops of the classification models on MONAI's engines (Ignite), optionally distributed.

``run_supervised`` builds a ``monai.engines.SupervisedTrainer`` with a ``SupervisedEvaluator`` run
after every epoch (``ValidationHandler``) on validation studies, keeps the weights of the best
validation epoch (lowest class-weighted cross-entropy, MONAI's best-metric tracking), stops early
(``EarlyStopHandler``) and returns the training statistics in MONAI Label's format
(``monailabel.tasks.train.handler.prepare_stats``, as ``BasicTrainTask`` writes them).

Distributed data parallel: when ``torch.distributed`` is initialised (``torchrun`` or
``python -m parotid.classification.train --nproc N``, which uses ``torch.multiprocessing.spawn`` as
MONAI Label's ``multi_gpu`` does) the network is wrapped in ``DistributedDataParallel`` and every
process reads its shard of each epoch's permutation (``DistributedSampler``); ``batch`` stays the
GLOBAL batch (``batch // world_size`` per process). Backends: gloo on CPU, nccl on GPUs (one GPU
per process, BatchNorm converted to ``SyncBatchNorm``; on CPU, BatchNorm statistics are per
process). Validation runs on every process on the full validation set (identical weights ->
identical metrics, so all processes stop at the same epoch).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

logger = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_device() -> torch.device:
    """cuda:<local rank> under nccl, else CPU (models are moved back to the CPU after training)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class WeightedCrossEntropy(nn.Module):
    """Class-weighted cross-entropy, normalised by the class weights of the GLOBAL batch: under DDP
    (gradients averaged over processes) the gradient equals that of one process on the whole batch."""

    def __init__(self, weight: torch.Tensor, global_norm: bool = True):
        super().__init__()
        self.register_buffer("weight", weight)
        self.global_norm = global_norm

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = self.weight[y]
        norm = w.sum().detach()
        rank, size = world()
        if size > 1 and self.global_norm:
            norm = norm.clone()
            dist.all_reduce(norm)  # sum over processes
            norm = norm / size  # DDP divides the summed gradients by the world size
        return (w * F.cross_entropy(logits, y, reduction="none")).sum() / norm.clamp_min(1e-12)


# --------------------------------------------------------------------------- datasets
class TumourSliceDataset(Dataset):
    """Stage-1 items: per epoch `per_study` distinct random tumour slices of every study, with random
    left-right flip (box flipped too), per-channel gain 0.9..1.1 and channel dropout of the optional
    sequences. Every draw is seeded by (seed, epoch, study), so an item does not depend on which
    process reads it (DDP gives the same items as one process)."""

    def __init__(self, cs, idx, channels: list[int], y: np.ndarray, per_study: int = 2, seed: int = 0,
                 augment: bool = True, drop_channels=(), p_drop: float = 0.1):
        self.cs, self.idx, self.channels, self.y = cs, np.asarray(idx), list(channels), y
        self.per_study, self.seed, self.augment = per_study, seed, augment
        self.drop_channels, self.p_drop = list(drop_channels), p_drop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.idx) * self.per_study

    def __getitem__(self, i: int) -> dict:
        j, m = divmod(int(i), self.per_study)
        s = int(self.idx[j])
        N, S = self.cs.slices.shape[1], self.cs.slices.shape[-1]
        k = np.random.default_rng([self.seed, self.epoch, j]).choice(N, self.per_study, replace=False)[m]
        x = self.cs.slices[s, k][self.channels].astype(np.float32)
        box = self.cs.box[s].astype(np.float32).copy()
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, j, m, 1])
            if rng.random() < 0.5:
                x = x[..., ::-1].copy()
                box = np.array([S - box[2], box[1], S - box[0], box[3]], np.float32)
            x *= rng.uniform(0.9, 1.1, (x.shape[0], 1, 1)).astype(np.float32)
            for c in self.drop_channels:  # optional sequences: learn to cope with their absence (zero channel)
                if rng.random() < self.p_drop:
                    x[c] = 0.0
        return {"image": torch.from_numpy(x), "box": torch.from_numpy(box), "label": int(self.y[s])}


class AllSlicesDataset(Dataset):
    """Stage-1 validation items: every tumour slice of every study, no augmentation."""

    def __init__(self, cs, idx, channels: list[int], y: np.ndarray):
        self.cs, self.idx, self.channels, self.y = cs, np.asarray(idx), list(channels), y
        self.n = cs.slices.shape[1]

    def __len__(self) -> int:
        return len(self.idx) * self.n

    def __getitem__(self, i: int) -> dict:
        j, k = divmod(int(i), self.n)
        s = int(self.idx[j])
        return {"image": torch.from_numpy(self.cs.slices[s, k][self.channels].astype(np.float32)),
                "box": torch.from_numpy(self.cs.box[s].astype(np.float32)), "label": int(self.y[s])}


class FeatureDataset(Dataset):
    """Stage-2 items: a study's slice features (N, D) (+ clinical variables) and its label."""

    def __init__(self, feats: torch.Tensor, y: np.ndarray, clinical: torch.Tensor | None = None):
        self.feats, self.y, self.clinical = feats.detach(), torch.as_tensor(y), clinical

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict:
        d = {"image": self.feats[i], "label": self.y[i]}
        if self.clinical is not None:
            d["clinical"] = self.clinical[i]
        return d


def prepare_image_box(batch: dict, device, non_blocking: bool = False, **kw):
    """MONAI prepare_batch: (inputs, targets, args, kwargs) -> network(image, box)."""
    return (batch["image"].to(device), batch["label"].to(device), (batch["box"].to(device),), {})


def prepare_features(batch: dict, device, non_blocking: bool = False, **kw):
    """MONAI prepare_batch: network(features, clinical)."""
    clin = batch["clinical"].to(device) if "clinical" in batch else None
    return (batch["image"].to(device), batch["label"].to(device), (clin,), {})


class SequenceHead(nn.Module):
    """Stage 2's trainable part as a network: slice features (B, N, D) [+ clinical] -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, f: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.forward_features(f, clinical)


# --------------------------------------------------------------------------- the engine run
def run_supervised(network: nn.Module, train_ds: Dataset, val_ds: Dataset | None, loss: nn.Module,
                   optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer], epochs: int, batch: int,
                   prepare_batch: Callable, seed: int = 0, patience: int = 0,
                   scheduler_fn: Callable[[torch.optim.Optimizer, int], object] | None = None,
                   val_batch: int = 256, desc: str = "", min_epochs: int = 0) -> dict:
    """Train `network` in place on MONAI's SupervisedTrainer; with `val_ds` validate every epoch,
    load the best epoch's weights at the end and stop after `patience` epochs without improvement
    counted after epoch `min_epochs` (patience 0: never). `batch` is the global batch. Returns MONAI Label-style stats (rank 0's view)."""
    from ignite.engine import Events
    from ignite.metrics import Accuracy, Average, Loss
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import EarlyStopHandler, LrScheduleHandler, StatsHandler, ValidationHandler, from_engine
    from monailabel.tasks.train.handler import prepare_stats

    rank, size = world()
    device = train_device()
    start = time.time()
    network.to(device)
    loss = loss.to(device)
    net: nn.Module = network
    if size > 1:
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(train_ds, num_replicas=size, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(train_ds, batch_size=max(1, batch // size), sampler=sampler, num_workers=0)
    opt = optimizer_fn(net)
    pred_label = from_engine(["pred", "label"])

    def loss_of(output):
        return output["loss"]

    val_loss = WeightedCrossEntropy(loss.weight, global_norm=False) if isinstance(loss, WeightedCrossEntropy) else loss

    evaluator = None
    best: dict = {}
    handlers = []
    if scheduler_fn is not None:
        handlers.append(LrScheduleHandler(scheduler_fn(opt, epochs * len(loader)), epoch_level=False, print_lr=False))
    if val_ds is not None and len(val_ds):
        val_loader = DataLoader(val_ds, batch_size=val_batch, shuffle=False, num_workers=0)
        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=val_loader, network=net, prepare_batch=prepare_batch,
            key_val_metric={"val_loss": Loss(val_loss, output_transform=pred_label)},
            additional_metrics={"val_acc": Accuracy(output_transform=pred_label)},
            metric_cmp_fn=lambda current, prev: current < prev,  # lower loss is better
            decollate=False)

        @evaluator.on(Events.EPOCH_COMPLETED)
        def keep_best(engine):  # after MONAI's best-metric update (registered first)
            if engine.state.best_metric_epoch == engine.state.epoch:
                best["state"] = copy.deepcopy(network.state_dict())

        handlers.append(ValidationHandler(validator=evaluator, interval=1, epoch_level=True))
    if rank == 0:
        handlers.append(StatsHandler(name=logger.name, tag_name="train_loss", iteration_log=False,
                                     output_transform=loss_of))
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=loader, network=net, optimizer=opt,
        loss_function=loss, prepare_batch=prepare_batch,
        key_train_metric={"train_acc": Accuracy(output_transform=pred_label)},
        additional_metrics={"train_loss": Average(output_transform=loss_of)},
        train_handlers=handlers, decollate=False, amp=False)
    if hasattr(train_ds, "set_epoch"):
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: train_ds.set_epoch(e.state.epoch))
    if evaluator is not None and patience > 0:
        stopper = EarlyStopHandler(patience=patience, score_function=lambda e: -float(e.state.metrics["val_loss"]),
                                   trainer=trainer, epoch_level=True)
        # counted only after `min_epochs` (e.g. the warm-up of a one-cycle schedule, when the loss is noisy)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED(event_filter=lambda e, _: trainer.state.epoch > min_epochs),
                                    stopper)
    trainer.run()
    if best:
        network.load_state_dict(best["state"])
    network.to("cpu")
    network.eval()
    stats = prepare_stats(start, trainer, evaluator)
    stats.pop("current_time", None)
    stats["total_time"] = str(datetime.timedelta(seconds=int(time.time() - start)))
    stats["epochs"] = int(trainer.state.epoch)
    stats["max_epochs"] = int(epochs)
    stats["stopped_early"] = bool(trainer.state.epoch < epochs)
    stats["best_metric_epoch"] = int(evaluator.state.best_metric_epoch) if evaluator is not None else int(trainer.state.epoch)
    stats["kept"] = "best validation epoch" if best else "last epoch"
    stats["world_size"] = size
    stats["desc"] = desc
    return json.loads(json.dumps(stats, default=float))  # plain data (MONAI's stats keys are str enums)
