"""Command line: train the served classification checkpoints (two-stage Liu model, ``task_model``; the
training itself is ``liu``, the checkpoint format ``checkpoint``, the CV baselines ``baselines``).

Reproduce the committed server checkpoints (synthetic cohort, CPU)::

    parotid-synth --n 240 --seed 101 --out /tmp/cohort101
    python -m parotid.classification.train --cohort /tmp/cohort101 --out apps/parotid/model

which writes ``classify_subtype.pt`` and ``classify_malignancy.pt`` (+ ``classify_*.json`` with the
training statistics). ``--label-sets`` selects other label sets (e.g. ``sinonasal3`` for a cohort
labelled with that set).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from . import engine
from .checkpoint import save_checkpoint
from parotid.cohort import load_classification_cohort

from .data import build_cropset
from .defaults import (DEFAULT_BRANCH_DROPOUT, DEFAULT_FUSION, DEFAULT_REQUIRED, DEFAULT_SEQS, DEFAULT_STAGE2_LR,
                       TASK_LABEL_SETS)
from .task_model import cohort_spacing, train_task_model


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _positive(text: str) -> float:
    """argparse type: a number > 0 (a learning rate of 0 or below would fail only after the crops are built)."""
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return v


def check_processes_fit_gpus(nproc: int) -> None:
    """Under nccl every process needs a GPU of its own: NCCL refuses two ranks on one device ("Duplicate GPU
    detected", seen on a one-GPU H200 machine; docs/model-card-classification.md), and a rank beyond the
    last GPU fails in torch.cuda.set_device. Say so before any process starts."""
    gpus = torch.cuda.device_count()
    if _backend() == "nccl" and nproc > gpus:
        raise SystemExit(f"{nproc} training processes need {nproc} GPUs (nccl, one GPU per process), "
                         f"but this machine has {gpus}: use --nproc {gpus} (torchrun: --nproc-per-node {gpus}), "
                         f"or train on the CPU (gloo) with CUDA_VISIBLE_DEVICES=\"\".")


def _train_tasks(a) -> None:
    """Train every task of the parsed CLI arguments `a`; under DDP only rank 0 writes."""
    rank, size = engine.world()
    torch.set_num_threads(a.threads)
    sets = a.label_sets or [TASK_LABEL_SETS.get(t, "subtype4") for t in a.tasks]
    cs = build_cropset(a.cohort, size=a.size)
    holdout = build_cropset(a.holdout_cohort, size=a.size) if a.holdout_cohort else None
    spacing = cohort_spacing(r.image for r in load_classification_cohort(a.cohort))
    os.makedirs(a.out, exist_ok=True)
    for task, ls in zip(a.tasks, sets):
        model, cfg = train_task_model(cs, ls, a.sequences, a.fusion, a.epochs1, a.epochs2, a.seed, a.val_frac, desc=task,
                                      required=a.required, spacing=spacing, holdout=holdout, cal_frac=a.cal_frac,
                                      patience1=a.patience1, patience2=a.patience2,
                                      branch_dropout=a.branch_dropout, lr2=a.lr2)
        if rank != 0:
            continue
        cfg["task"] = task
        cfg["trained"]["cohort"] = os.path.basename(os.path.abspath(a.cohort))
        path = os.path.join(a.out, f"{task}.pt")
        save_checkpoint(path, model, cfg)
        with open(os.path.join(a.out, f"{task}.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        c = cfg["calibration"]
        print(f"{task}: {path} ({os.path.getsize(path) / 1e6:.1f} MB) T={cfg['temperature']:.2f} "
              f"(ECE on {c['n']} calibration patients {c.get('ece_before', float('nan')):.3f} -> {c.get('ece_after', float('nan')):.3f}) "
              f"{cfg['trained']['seconds']} s, {size} process(es)")


def _spawned_worker(rank: int, world_size: int, init_file: str, a) -> None:
    import torch.distributed as dist

    if _backend() == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(_backend(), init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _train_tasks(a)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the parotid classification checkpoints (two-stage Liu model).")
    ap.add_argument("--cohort", required=True, help="cohort folder (parotid-synth output)")
    ap.add_argument("--out", default="apps/parotid/model")
    ap.add_argument("--tasks", nargs="+", default=list(TASK_LABEL_SETS), help="task names (classify_<name>)")
    ap.add_argument("--label-sets", nargs="+", default=None, help="label set per task (default: subtype4, benign_malignant)")
    ap.add_argument("--sequences", nargs="+", default=list(DEFAULT_SEQS))
    ap.add_argument("--required", nargs="+", default=list(DEFAULT_REQUIRED), help="sequences a study must have")
    ap.add_argument("--fusion", choices=["early", "add", "spl"], default=DEFAULT_FUSION)
    ap.add_argument("--branch-dropout", type=float, default=DEFAULT_BRANCH_DROPOUT,
                    help="late fusion: drop probability of each optional branch in the extra stage-2 copies (0: none)")
    ap.add_argument("--epochs1", type=int, default=12)
    ap.add_argument("--epochs2", type=int, default=60)
    ap.add_argument("--lr2", type=_positive, default=DEFAULT_STAGE2_LR,
                    help="stage-2 learning rate (AdamW; Liu et al. use 1e-5: docs/results/stage2_lr.md)")
    ap.add_argument("--patience1", type=int, default=4, help="stage-1 early stopping (epochs without improvement; 0: off)")
    ap.add_argument("--patience2", type=int, default=15, help="stage-2 early stopping (0: off)")
    ap.add_argument("--val-frac", type=float, default=0.2, help="validation part of the training patients (best epoch, early stopping)")
    ap.add_argument("--cal-frac", type=float, default=0.2, help="calibration patients, excluded from training (without --holdout-cohort)")
    ap.add_argument("--holdout-cohort", default=None, help="calibrate on this cohort instead of a split of --cohort")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--size", type=int, default=48)
    ap.add_argument("--nproc", type=int, default=1,
                    help="distributed data parallel over N processes (torch.multiprocessing.spawn; nccl with one "
                         "GPU each when CUDA is available, else gloo on CPU). Under torchrun leave it at 1.")
    a = ap.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: env:// rendezvous
        import torch.distributed as dist

        check_processes_fit_gpus(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        if _backend() == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(_backend(), init_method="env://")
        try:
            _train_tasks(a)
        finally:
            dist.destroy_process_group()
    elif a.nproc > 1:
        import tempfile

        check_processes_fit_gpus(a.nproc)
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:  # file:// rendezvous, as MONAI Label's multi_gpu on Windows
            mp.spawn(_spawned_worker, args=(a.nproc, os.path.join(d, "rendezvous"), a), nprocs=a.nproc, join=True)
    else:
        _train_tasks(a)


if __name__ == "__main__":
    main()
