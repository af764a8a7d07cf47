"""Distributed data parallel of the classifiers' training on a GPU machine: the same weights as one
process on the CPU? (the GPU side of tests/test_classification_ddp.py; needs CUDA, so it is not a test)

    python benchmarks/ddp_gpu_check.py --json ddp_gpu.json

The case (tests/ddp_case.py): both stages of the classifier for 2 epochs on 16 toy studies made in
memory (SYNTHETIC crops: a disc whose contrast depends on the class, plus noise), dropout off, SGD,
global batch 8, TF32 off. Runs, each compared with the 1-process CPU result (the 2-process
SyncBatchNorm run also with the 1-GPU one), after 2 epochs (8 stage-1 steps) and after ONE step:

  cpu-1          1 process on the CPU (the reference; once with BatchNorm, once without)
  nccl-1         1 process, nccl, cuda:0, BatchNorm kept (no collective runs with one rank)
  nccl-2         2 processes, nccl, one GPU each, BatchNorm -> SyncBatchNorm (the served recipe on 2
                 GPUs). NCCL refuses two ranks on one GPU; with one GPU the refusal is recorded.
  gloo-cuda-2    2 processes on cuda:0 under gloo (DDP's all-reduce of CUDA gradients, the global-batch
                 loss normalisation), BatchNorm removed as in the CPU test
  gloo-cpu-2     2 processes on the CPU, as the CI test
  one step, gloo-cpu-2 with BatchNorm kept: the negative control (per-process statistics must differ)

Exit status 1 when a run that should match does not (ranks not bit-identical, or a tensor's relative
difference above --rtol), or when a run that should work fails.

The GPU image has no SimpleITK or nibabel, and MONAI Label's datastore needs packages it lacks; the
files they read are never read here (crops are made in memory), so when such a module is absent an
empty stand-in is registered for it so that parotid's modules import. The engine's one MONAI Label
function (prepare_stats) is real: run with `--monailabel-src DIR` holding MONAI Label's own
monailabel/tasks/train/handler.py (see docs/model-card-classification.md for the command used).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "tests", ROOT / "benchmarks"):
    sys.path.insert(0, str(p))


class _AbsentModule(types.ModuleType):
    """A module this machine lacks: any attribute is a placeholder that refuses to be called."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def absent(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{attr} is not installed on this machine")

        return absent


def stand_in_absent_modules() -> list[str]:
    """Empty modules for file-I/O and datastore packages this check never calls, where absent."""
    made = []
    for name in ("SimpleITK", "nibabel"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _AbsentModule(name)
            made.append(name)
    try:
        import monailabel.datastore.local  # noqa: F401
    except ImportError:
        for name, attrs in (("monailabel.datastore", ()), ("monailabel.datastore.local", ("LocalDatastore",)),
                            ("monailabel.interfaces", ()), ("monailabel.interfaces.datastore", ("DefaultLabelTag",))):
            mod = sys.modules.get(name) or types.ModuleType(name)
            for a in attrs:
                setattr(mod, a, type(a, (), {}))
            sys.modules[name] = mod
        made.append("monailabel.datastore.local")
    return made


def toy_crops(n: int = 16, size: int = 32, n_slices: int = 4, seed: int = 1):
    """A CropSet of n SYNTHETIC studies: per class a disc of its own contrast in T2 and CE-T1, plus noise."""
    import numpy as np

    from ddp_case import class_labels
    from parotid.classification.data import CropSet
    from parotid.sequences import SEQUENCE_KEYS

    rng = np.random.default_rng(seed)
    seqs = tuple(SEQUENCE_KEYS)
    C = len(seqs)
    contrast = {0: (2.0, 1.6), 1: (0.6, 1.2), 2: (1.4, 2.0), 3: (0.9, 1.5)}
    classes = ["pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant"]
    y = class_labels(n)
    yy, xx = np.mgrid[:size, :size]
    slices = np.zeros((n, n_slices, C, size, size), np.float16)
    box = np.zeros((n, 4), np.float32)
    for s in range(n):
        cx, cy, r = rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(4, 7)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        for k in range(n_slices):
            for c, seq in enumerate(seqs[:2]):
                img = 1.0 + 0.2 * rng.standard_normal((size, size))
                img[disc] *= contrast[int(y[s])][c]
                slices[s, k, seqs.index(seq)] = img
        box[s] = (cx - r, cy - r, cx + r, cy + r)
    avail = np.zeros((n, C), bool)
    avail[:, :2] = True
    return CropSet([f"toy{s:03d}" for s in range(n)], [classes[int(c)] for c in y], seqs, slices,
                   np.zeros((n, n_slices, 1, size, size), np.uint8), np.zeros((n, 1, C, size, size), np.float16),
                   np.zeros((n, 1, 1, size, size), np.uint8), np.zeros((n, 1), bool), box,
                   np.zeros((n, 3), np.float32), avail)


def deterministic() -> None:
    import torch

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _worker(rank: int, world: int, backend: str, on_cuda: bool, keep_bn: bool, one_step: bool, init_file: str,
            out_dir: str, monailabel_src: str | None) -> None:
    if monailabel_src:
        sys.path.insert(0, monailabel_src)
    stand_in_absent_modules()
    import torch
    import torch.distributed as dist

    from ddp_case import train_both_stages
    from parotid.classification import engine

    deterministic()
    torch.set_num_threads(1)
    if on_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    if on_cuda and backend != "nccl":  # the engine trains on the GPU under nccl only; put gloo's tensors there too
        engine.train_device = lambda: torch.device("cuda", torch.cuda.current_device())
    try:
        torch.save(train_both_stages(toy_crops(), keep_bn, one_step), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(world: int, backend: str, on_cuda: bool, keep_bn: bool, monailabel_src: str | None,
                    timeout: float = 240.0, one_step: bool = False) -> dict:
    """Spawn `world` processes; returns {"ranks": [state dicts], "seconds"} or {"error": text}."""
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        start = time.time()
        try:
            args = (world, backend, on_cuda, keep_bn, one_step, os.path.join(d, "rdv"), d, monailabel_src)
            ctx = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
            while not ctx.join(timeout=5):
                if time.time() - start > timeout:
                    for p in ctx.processes:
                        p.kill()
                    return {"error": f"no result after {timeout:.0f} s (killed)"}
        except Exception as e:  # a worker's failure: keep its message, go on with the other runs
            text = str(e).strip().splitlines()
            wanted = [ln for ln in text if "Error" in ln or "error" in ln or "Duplicate" in ln]
            return {"error": " | ".join((wanted or text)[-4:])[:1500]}
        return {"ranks": [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)],
                "seconds": round(time.time() - start, 1)}


def compare(name: str, res: dict, ref: dict, rtol: float, ref_name: str = "cpu-1", should_work: bool = True) -> dict:
    """Ranks bit-identical (synchronised) and every tensor within `rtol` (relative) of the reference."""
    import torch

    from ddp_case import max_differences

    if "error" in res:
        return {"run": name, "ok": not should_work, "error": res["error"]}
    r0 = res["ranks"][0]
    same_ranks = all(torch.equal(r0[s][k], other[s][k]) for other in res["ranks"][1:] for s in r0 for k in r0[s])
    diff = max_differences(r0, ref)
    ok = same_ranks and max(d["rel"] for d in diff.values()) <= rtol
    return {"run": name, "vs": ref_name, "ok": ok, "processes": len(res["ranks"]), "ranks_bit_identical": same_ranks,
            "max_diff": {k: {"abs": float(f"{d['abs']:.3g}"), "rel": float(f"{d['rel']:.3g}"), "at": d["at"]}
                         for k, d in diff.items()},
            "seconds": res.get("seconds")}


def stage1_step_time(device: str, batch: int = 64, size: int = 48, channels: int = 4, steps: int = 30) -> float:
    """Seconds per stage-1 training step (forward + backward + SGD) at the served crop size."""
    import torch

    from parotid.classification.models import ImageNet

    net = ImageNet(channels, 4).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(batch, channels, size, size, device=device)
    box = torch.tensor([[12.0, 12.0, 36.0, 36.0]] * batch, device=device)
    y = torch.randint(0, 4, (batch,), device=device)
    for i in range(steps + 5):
        if i == 5:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x, box), y).backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--rtol", type=float, default=1e-3,
                    help="largest allowed relative difference of a tensor (max |a - b| / max |b|) vs the reference run")
    ap.add_argument("--monailabel-src", default=None, help="folder holding monailabel/tasks/train/handler.py")
    ap.add_argument("--cpu-only", action="store_true", help="run the CPU runs only (to try the script without a GPU)")
    a = ap.parse_args(argv)
    if a.monailabel_src:
        sys.path.insert(0, a.monailabel_src)
    stand_ins = stand_in_absent_modules()
    import torch

    from ddp_case import train_both_stages
    from report import report

    deterministic()
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and not a.cpu_only
    import monai
    import numpy

    out: dict = {"torch": torch.__version__, "monai": monai.__version__, "numpy": numpy.__version__,
                 "cuda": torch.version.cuda if cuda else None,
                 "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
                 "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                 "stand_ins": stand_ins, "rtol": a.rtol, "data": "SYNTHETIC toy crops (16 studies, 32 px, 4 slices)"}
    cs = toy_crops()
    ref = {bn: train_both_stages(cs, bn) for bn in (False, True)}
    ref_step = train_both_stages(cs, True, one_step=True)
    ml = a.monailabel_src
    runs = [compare("gloo-cpu-2", run_distributed(2, "gloo", False, False, ml), ref[False], a.rtol)]
    if cuda:
        nccl1 = run_distributed(1, "nccl", True, True, ml)
        runs.append(compare("nccl-1 (BatchNorm)", nccl1, ref[True], a.rtol))
        two_gpus = torch.cuda.device_count() >= 2
        nccl2 = compare("nccl-2 (SyncBatchNorm)", run_distributed(2, "nccl", True, True, ml, 120), ref[True], a.rtol,
                        should_work=two_gpus)
        if not two_gpus:
            nccl2["note"] = "one GPU: NCCL refuses two ranks on one device (expected); needs 2 GPUs"
            nccl2["ok"] = "Duplicate GPU" in nccl2.get("error", "")
        runs.append(nccl2)
        runs.append(compare("gloo-cuda-2 (no BatchNorm)", run_distributed(2, "gloo", True, False, ml), ref[False], a.rtol))
        # 2 processes on the GPU with SyncBatchNorm (the engine converts BatchNorm on CUDA) against 1 GPU process:
        # global-batch BatchNorm statistics across processes, the part nccl-2 would check on 2 GPUs
        gloo_sbn = run_distributed(2, "gloo", True, True, ml)
        runs.append(compare("gloo-cuda-2 (SyncBatchNorm)", gloo_sbn, nccl1["ranks"][0] if "ranks" in nccl1 else ref[True],
                            a.rtol, ref_name="nccl-1 (1 GPU process)"))
        runs.append(compare("gloo-cuda-2 (SyncBatchNorm)", gloo_sbn, ref[True], a.rtol))
        # one SGD step with BatchNorm: nothing for rounding to grow in, so SyncBatchNorm's global-batch statistics
        # must agree closely; per-process statistics (gloo on the CPU keeps plain BatchNorm) must not
        nccl1_step = run_distributed(1, "nccl", True, True, ml, one_step=True)
        runs.append(compare("one step: nccl-1 (BatchNorm)", nccl1_step, ref_step, a.rtol, ref_name="cpu-1 one step"))
        sbn_step = run_distributed(2, "gloo", True, True, ml, one_step=True)
        runs.append(compare("one step: gloo-cuda-2 (SyncBatchNorm)", sbn_step,
                            nccl1_step["ranks"][0] if "ranks" in nccl1_step else ref_step, a.rtol,
                            ref_name="one step: nccl-1 (1 GPU process)"))
        runs.append(compare("one step: gloo-cuda-2 (SyncBatchNorm)", sbn_step, ref_step, a.rtol, ref_name="cpu-1 one step"))
        control = compare("one step: gloo-cpu-2 (per-process BatchNorm)", run_distributed(2, "gloo", False, True, ml,
                                                                                       one_step=True),
                          ref_step, a.rtol, ref_name="cpu-1 one step")
        control["note"] = "negative control: per-process BatchNorm statistics must NOT match the global batch"
        control["ok"] = "max_diff" in control and max(d["rel"] for d in control["max_diff"].values()) > 10 * a.rtol
        runs.append(control)
        out["stage1_step_seconds_batch64_48px"] = {"cuda": round(stage1_step_time("cuda"), 5)}
    out["stage1_step_seconds_batch64_48px"] = {**out.get("stage1_step_seconds_batch64_48px", {}),
                                               "cpu_1_thread": round(stage1_step_time("cpu", steps=5), 4)}
    out["runs"] = runs
    out["ok"] = all(r["ok"] for r in runs)
    report(out, a.json)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
