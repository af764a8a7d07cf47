"""Distributed data parallel (torch.distributed, gloo on CPU): 2 processes with DistributedSampler
end with the same weights as 1 process trained on the same global batches.

Compared twice: after ONE stage-1 step on one global batch (tight: relative 1e-5) and after 2 epochs
(8 steps; relative 1e-2: float rounding of the per-process and the whole-batch kernels grows over the
steps, by how much depends on the CPU: 5e-7 relative on this project's machines, 2.7e-3 on the
H200 machine's 16-core CPU, where the one-step comparison stayed at 1e-6; docs/results/ddp_gpu_h200.json).
Same init (seeded), dropout off (the case is tests/ddp_case.py, shared with the GPU check
benchmarks/ddp_gpu_check.py). Stage 1's ResNet BatchNorm is replaced by Identity here: on CPU
BatchNorm statistics are per process (SyncBatchNorm needs GPUs; the engine converts to it under
nccl), which is not the global batch's statistics."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from parotid.classification import engine  # noqa: F401  (imported before forking: the workers inherit it)
from ddp_case import initial_state, max_differences, train_both_stages
from toy_cohort import write_toy_cohort


def _worker(rank: int, world: int, init_file: str, cs, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for one_step in (False, True):
            torch.save(train_both_stages(cs, one_step=one_step), os.path.join(out_dir, f"rank{rank}_{one_step}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_matches(ranks: list[dict], single: dict, cs, rtol: float, what: str) -> None:
    """Ranks bit-identical (synchronised); every tensor within `rtol` of 1 process (ddp_case.max_differences:
    max |a - b| / max |b|); the weights moved."""
    r0, r1 = ranks
    for stage in ("stage1", "stage2"):
        for k, v in r0[stage].items():
            assert torch.equal(v, r1[stage][k]), f"{what} {stage} {k}: ranks not synchronised"
        init = initial_state(stage, cs)
        moved = max(float((v - init[k]).abs().max()) for k, v in single[stage].items() if v.is_floating_point())
        assert moved > 1e-4, f"{what} {stage}: weights did not change"
    for stage, d in max_differences(r0, single).items():
        assert d["rel"] <= rtol, f"{what} {stage} {d['at']}: DDP vs 1 process relative difference {d['rel']:.2e} > {rtol:g}"


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
    for one_step, rtol in ((True, 1e-5), (False, 1e-2)):
        ranks = [torch.load(tmp_path / f"rank{r}_{one_step}.pt") for r in (0, 1)]
        _assert_matches(ranks, train_both_stages(cs, one_step=one_step), cs, rtol,
                        "one step" if one_step else "2 epochs")


def test_more_training_processes_than_gpus_are_refused_before_anything_starts(monkeypatch):
    """nccl needs a GPU per process (NCCL refused two ranks on one H200: docs/results/ddp_gpu_h200.json).
    No GPU here: torch.cuda.is_available / device_count are replaced to describe a one-GPU machine (the only
    stand-in); the CLI itself is real and must refuse before reading the cohort or spawning a process."""
    from parotid.classification import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for env, argv in (({}, ["--nproc", "2"]), ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, [])):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            train.main(["--cohort", "/nonexistent/cohort", *argv])
        assert "2 training processes need 2 GPUs" in str(e.value) and "this machine has 1" in str(e.value), e.value
        for k in env:
            monkeypatch.delenv(k)
    train.check_processes_fit_gpus(1)  # good twins: one process per GPU, and gloo on the CPU with 2 processes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train.check_processes_fit_gpus(2)
