"""Training of the segmentation models on CPU (plain PyTorch loop over MONAI transforms/losses).

Reproduce the shipped checkpoints (see docs/model-card-segmentation.md):

    parotid-synth --out /tmp/seg12 --n 60 --seed 12 --no-raw --keep CET1,T2
    parotid-synth --out /tmp/seg13 --n 60 --seed 13 --no-raw --keep CET1,T2
    python -m parotid.segmentation.train --cohort /tmp/seg12 /tmp/seg13 --model segmentation --out apps/parotid/model --iterations 1200
    python -m parotid.segmentation.train --cohort /tmp/seg12 /tmp/seg13 --model contour_box --out apps/parotid/model --iterations 800
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandFlip, RandScaleIntensity, RandShiftIntensity
from monai.utils import set_determinism
from tqdm import tqdm

from parotid.cohort import CohortItem, load_cohort
from parotid.labels import GLAND, TUMOR
from parotid.model_space import SPACING_KEY, checkpoint_spacing, file_spacing, label_to_model, to_model_space, training_spacing
from parotid.segmentation.inference import box_input, box_region, contour_in_box, dice, segment, study_input
from parotid.segmentation.networks import SPECS, SegModelSpec, build_network
from parotid.study import read_label_map, read_study, roi_from_mask


def _load(items: Sequence[CohortItem], spec: SegModelSpec, spacing=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inputs and labels at the training `spacing` (studies on another grid are resampled, as at inference)."""
    data = []
    for it in tqdm(items, desc="loading", leave=False):
        study = read_study(it.image, it.study_id)
        if not all(s in study.sequences for s in spec.required):
            continue
        space = to_model_space(study, spacing)
        data.append((study_input(space.model_study, spec), label_to_model(read_label_map(it.label), space)))
    return data


def _spacing_for(items: Sequence[CohortItem], init_from: str | None) -> list[float]:
    """The training spacing: the fine-tuned checkpoint's, else the median of the training studies'."""
    if init_from and os.path.exists(init_from):
        sp = checkpoint_spacing(torch.load(init_from, map_location="cpu", weights_only=True))
        if sp is not None:
            return list(sp)
    return training_spacing(file_spacing(it.image) for it in items)


def _random_patch(img: np.ndarray, lab: np.ndarray, patch, rng: np.random.Generator, p_fg: float = 0.67):
    """Random patch, centred on a foreground voxel with probability p_fg (pads small images)."""
    pads = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, lab.shape)]
    img = np.pad(img, pads)
    lab = np.pad(lab, pads[1:])
    if rng.random() < p_fg and lab.any():
        fg = np.argwhere(lab == (TUMOR if rng.random() < 0.5 and (lab == TUMOR).any() else lab.max()))
        centre = fg[rng.integers(len(fg))]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, lab.shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, lab.shape)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return img[(slice(None),) + sl], lab[sl]


def _jitter_box(roi: Sequence[int], shape, rng: np.random.Generator) -> list[int]:
    """Simulate a user's box: each face moved by up to 20 % of the box size (at least 1 voxel)."""
    out = []
    for axis in range(3):
        lo, hi = roi[2 * axis], roi[2 * axis + 1]
        size = hi - lo
        d = max(1, int(round(0.2 * size)))
        lo2 = int(np.clip(lo + rng.integers(-d, d + 1), 0, shape[axis] - 1))
        hi2 = int(np.clip(hi + rng.integers(-d, d + 1), lo2 + 1, shape[axis]))
        out += [lo2, hi2]
    return out


def _batch(data, spec: SegModelSpec, rng, batch_size: int, augment: Callable):
    xs, ys = [], []
    for _ in range(batch_size):
        img, lab = data[rng.integers(len(data))]
        if spec.box_prompted:
            tumour = lab == TUMOR
            if not tumour.any():
                continue
            comps = _tumour_components(tumour)
            roi = _jitter_box(roi_from_mask(comps[rng.integers(len(comps))]), lab.shape, rng)
            x, region = box_input(img, roi, spec)
            y = (lab[region] == TUMOR).astype(np.float32)
            y = F.interpolate(torch.from_numpy(y)[None, None], size=spec.patch, mode="nearest")[0]
            x = x[0]
        else:
            xi, yi = _random_patch(img, lab, spec.patch, rng)
            x, y = torch.from_numpy(np.ascontiguousarray(xi)), torch.from_numpy(yi[None].astype(np.float32))
        x = _drop_optional(x, spec, rng)
        xy = augment(torch.cat([x, y], 0))
        xs.append(xy[:-1])
        ys.append(xy[-1:])
    return torch.stack(xs), torch.stack(ys).round().long()


def _drop_optional(x: torch.Tensor, spec: SegModelSpec, rng: np.random.Generator, p: float = 0.15) -> torch.Tensor:
    """Zero optional sequence channels at random, as when a study lacks them."""
    x = x.clone()
    for c, seq in enumerate(spec.sequences):
        if seq not in spec.required and rng.random() < p:
            x[c] = 0
    return x


def _tumour_components(tumour: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    comps, n = ndimage.label(tumour)
    return [comps == i for i in range(1, n + 1)]


def evaluate(net, spec: SegModelSpec, data) -> dict:
    """Mean Dice per structure on whole studies (box model: the tight tumour box is the prompt)."""
    net.eval()
    gland, tumour = [], []
    for img, lab in data:
        if spec.box_prompted:
            comps = _tumour_components(lab == TUMOR)
            if not comps:
                continue
            roi = roi_from_mask(max(comps, key=np.sum))  # the largest tumour is the prompt
            region = box_region(roi, lab.shape)
            truth = np.zeros(lab.shape, bool)
            truth[region] = lab[region] == TUMOR
            pred = contour_in_box(net, spec, img, roi)
            tumour.append(dice(pred == TUMOR, truth))
        else:
            pred = segment(net, spec, img)
            gland.append(dice(pred == GLAND, lab == GLAND))
            tumour.append(dice(pred == TUMOR, lab == TUMOR))
    out = {"dice_tumor": float(np.mean(tumour)) if tumour else None, "n": len(tumour)}
    if gland:
        out["dice_gland"] = float(np.mean(gland))
    return out


def train(
    spec: SegModelSpec,
    items: Sequence[CohortItem],
    out_path: str,
    iterations: int = 600,
    batch_size: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    val_fraction: float = 0.15,
    init_from: str | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train `spec` on `items`; write the checkpoint atomically to `out_path`; return the stats."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    spacing = _spacing_for(items, init_from)
    data = _load(items, spec, spacing)
    if len(data) < 2:
        raise ValueError(f"need at least 2 labelled studies with {list(spec.sequences)}, got {len(data)}")
    n_val = max(1, int(round(val_fraction * len(data))))
    order = rng.permutation(len(data))
    val = [data[i] for i in order[:n_val]]
    trn = [data[i] for i in order[n_val:]]

    net = build_network(spec)
    if init_from and os.path.exists(init_from):
        net.load_state_dict(torch.load(init_from, map_location="cpu")["model"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations)
    augment = Compose([RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1)])
    intensity = Compose([RandScaleIntensity(0.1, prob=0.5), RandShiftIntensity(0.1, prob=0.5)])
    start = time.time()
    net.train()
    bar = tqdm(range(iterations), desc=f"train {spec.name}", mininterval=5)
    for it in bar:
        x, y = _batch(trn, spec, rng, batch_size, augment)
        x = torch.stack([intensity(xi) for xi in x])
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if progress:
            progress(it, float(loss.item()))
    stats = evaluate(net, spec, val)
    stats.update(
        model=spec.name, train_studies=len(trn), val_studies=len(val), iterations=iterations,
        train_seconds=round(time.time() - start, 1), version=time.strftime("%Y%m%d-%H%M%S"), spacing=spacing,
    )
    save_checkpoint(net, spec, stats, out_path, spacing)
    return stats


def save_checkpoint(net, spec: SegModelSpec, stats: dict, out_path: str, spacing=None) -> None:
    """`spacing`: the training spacing [sx, sy, sz] mm (I, J, K), what inference resamples studies to."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    ck = {"model": net.state_dict(), "spec": spec.name, "sequences": list(spec.sequences), "stats": stats}
    if spacing is not None:
        ck[SPACING_KEY] = [float(v) for v in spacing]
    torch.save(ck, tmp)
    os.replace(tmp, out_path)  # atomic: the server's hot reload never sees a partial file
    with open(os.path.splitext(out_path)[0] + ".json", "w") as f:
        json.dump(stats, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a parotid segmentation model on a labelled study folder (CPU).")
    p.add_argument("--cohort", required=True, nargs="+", help="study folder(s) with labels/final and datastore_v2.json")
    p.add_argument("--model", choices=sorted(SPECS), required=True)
    p.add_argument("--out", default="apps/parotid/model", help="folder for <model>.pt")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--init-from", help="checkpoint to fine-tune from")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = SPECS[a.model]
    items = [it for folder in a.cohort for it in load_cohort(folder)]
    stats = train(spec, items, os.path.join(a.out, f"{spec.name}.pt"), a.iterations, a.batch_size, lr=a.lr,
                  seed=a.seed, init_from=a.init_from)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
