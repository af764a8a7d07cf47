"""Training of the segmentation models on MONAI's engines (Ignite), CPU by default.

`SupervisedTrainer` runs the iterations over random patches (whole-study model) or jittered tumour
boxes (box-prompted model); every `val_interval` iterations a `SupervisedEvaluator` scores the
validation studies (mean Dice of gland and tumour); the best-scoring weights are kept and saved, and
training stops early after `patience` validations without improvement. Train stats are in MONAI
Label's format (`monailabel.tasks.train.handler.prepare_stats`: best_metric, best_metric_epoch, ...)
plus the Dice per structure and per available-sequence subset of the saved weights.

Sequence dropout (`parotid.segmentation.sequence_dropout`): every input sequence but T2 is zeroed at
random, so one network segments full, no-CE-T1, no-DWI/ADC and T2-only studies; the checkpoint
records `required` (["T2"]) and `optional` (the other input sequences).

Studies of the fixed held-out part (`parotid.cohort.is_holdout`) are never used here. The recipe of
the shipped checkpoints is scripts/train_models.sh.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import EarlyStopHandler, LrScheduleHandler, MeanDice, ValidationHandler, from_engine, stopping_fn_from_metric
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose, RandFlipd, RandScaleIntensityd, RandShiftIntensityd
from monai.utils import set_determinism
from monailabel.tasks.train.handler import prepare_stats
from tqdm import tqdm

from parotid.cohort import CohortItem, is_holdout, load_cohort
from parotid.labels import GLAND, TUMOR
from parotid.model_space import SPACING_KEY, checkpoint_spacing, file_spacing, label_to_model, to_model_space, training_spacing
from parotid.segmentation.inference import SINGLE_PASS, box_input, box_region, contour_in_box, dice, segment, study_input
from parotid.segmentation.networks import NETWORK_KEY, SHAPES, SPECS, SegModelSpec, UNetShape, build_network, network_shape, shape_name
from parotid.segmentation.sequence_dropout import MINIMUM, SUBSETS, RandSequenceDropoutd, missing_in, optional_sequences
from parotid.segmentation.subset_models import COMPLETE, INCOMPLETE, SUBSET_MODELS, combine, part_entries, parts, state_dict_of
from parotid.study import read_label_map, read_study, roi_from_mask

KEY_METRIC = "val_mean_dice"
logger = logging.getLogger(__name__)


def _load(items: Sequence[CohortItem], spec: SegModelSpec, spacing=None,
          ids: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inputs and labels at the training `spacing` (studies on another grid are resampled, as at inference);
    a study without the MINIMUM sequences is skipped, other missing sequences are zero channels. The
    loaded studies' ids are appended to `ids`."""
    data = []
    for it in tqdm(items, desc="loading", leave=False):
        study = read_study(it.image, it.study_id)
        if not all(s in study.sequences for s in MINIMUM):
            continue
        space = to_model_space(study, spacing)
        model_study = space.model_study
        data.append((_input(model_study, spec), label_to_model(read_label_map(it.label), space)))
        if ids is not None:
            ids.append(it.study_id)
    return data


def _input(study, spec: SegModelSpec) -> np.ndarray:
    """`study_input` for training: only the MINIMUM sequences are required."""
    return study_input(study, _with_minimum(spec))


def _with_minimum(spec: SegModelSpec) -> SegModelSpec:
    from dataclasses import replace

    return replace(spec, required=tuple(s for s in spec.sequences if s in MINIMUM))


def _spacing_for(items: Sequence[CohortItem], init_from: str | None) -> list[float]:
    """The training spacing: the fine-tuned checkpoint's, else the median of the training studies'."""
    if init_from and os.path.exists(init_from):
        sp = checkpoint_spacing(torch.load(init_from, map_location="cpu", weights_only=True))
        if sp is not None:
            return list(sp)
    return training_spacing(file_spacing(it.image) for it in items)


def _random_patch(img: np.ndarray, lab: np.ndarray, patch, rng: np.random.Generator, p_fg: float = 0.67,
                  tumour_share: float = 1.0):
    """Random patch, centred on a labelled voxel with probability p_fg (pads small images): of those, a
    `tumour_share` on a tumour voxel (when the study has one), the others on a gland voxel. The default 1.0
    is the sampling every shipped round was trained with (the draw is made either way, so the random
    sequence is that of those rounds)."""
    pads = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch, lab.shape)]
    img = np.pad(img, pads)
    lab = np.pad(lab, pads[1:])
    if rng.random() < p_fg and lab.any():
        on_tumour = rng.random() < tumour_share and (lab == TUMOR).any()
        fg = np.argwhere(lab == (TUMOR if on_tumour or not (lab == GLAND).any() else GLAND))
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


def _tumour_components(tumour: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    comps, n = ndimage.label(tumour)
    return [comps == i for i in range(1, n + 1)]


def _box_sample(img: np.ndarray, lab: np.ndarray, roi: Sequence[int], spec: SegModelSpec) -> dict:
    """Box-model input (crop + box channel, resized to spec.patch) and its tumour label at that size."""
    x, region = box_input(img, roi, spec)
    y = torch.from_numpy((lab[region] == TUMOR).astype(np.float32))[None, None]
    return {"image": x[0], "label": F.interpolate(y, size=spec.patch, mode="nearest")[0]}


def augmentation(spec: SegModelSpec, dropout_prob: float = 0.5) -> Compose:
    """MONAI transforms on {"image", "label"}: in-plane flips, intensity scale/shift, sequence dropout
    (`dropout_prob` of the samples lack sequences; 1.0: every sample is an incomplete study)."""
    return Compose([
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=1),
        RandScaleIntensityd("image", 0.1, prob=0.5),
        RandShiftIntensityd("image", 0.1, prob=0.5),
        RandSequenceDropoutd("image", spec.sequences, prob=dropout_prob),
    ])


class RandomSamples(torch.utils.data.Dataset):
    """`length` training samples drawn in order from one generator: a random patch of a random study
    (whole-study model) or a random tumour of a random study under a jittered box (box model)."""

    def __init__(self, data, spec: SegModelSpec, length: int, seed: int, dropout_prob: float = 0.5,
                 tumour_share: float = 1.0, study_weights: Sequence[float] | None = None):
        self.data, self.spec, self.length, self.tumour_share = data, spec, length, tumour_share
        weights = list(study_weights) if study_weights is not None else None
        if spec.box_prompted:
            keep = [i for i, (_img, lab) in enumerate(data) if (lab == TUMOR).any()]
            self.data = [data[i] for i in keep]
            weights = [weights[i] for i in keep] if weights is not None else None
        # None: every study equally likely (the draw of every shipped round); else proportional to its weight
        self.p = np.asarray(weights, float) / float(np.sum(weights)) if weights is not None else None
        self.rng = np.random.default_rng(seed)
        self.transform = augmentation(spec, dropout_prob)
        self.transform.set_random_state(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        pick = self.rng.integers(len(self.data)) if self.p is None else self.rng.choice(len(self.data), p=self.p)
        img, lab = self.data[pick]
        if self.spec.box_prompted:
            comps = _tumour_components(lab == TUMOR)
            roi = _jitter_box(roi_from_mask(comps[self.rng.integers(len(comps))]), lab.shape, self.rng)
            sample = _box_sample(img, lab, roi, self.spec)
        else:
            xi, yi = _random_patch(img, lab, self.spec.patch, self.rng, tumour_share=self.tumour_share)
            sample = {"image": torch.from_numpy(np.ascontiguousarray(xi)), "label": torch.from_numpy(yi[None].astype(np.float32))}
        out = self.transform(sample)
        return {"image": torch.as_tensor(out["image"]).float(), "label": torch.as_tensor(out["label"]).round().long()}


def drop_sequences(img: np.ndarray, spec: SegModelSpec, subset: str) -> np.ndarray:
    """The input a study of `subset` gives: its missing sequences as zero channels (as study_input)."""
    out = img.copy()
    for seq in missing_in(subset, spec.sequences):
        out[spec.sequences.index(seq)] = 0
    return out


def validation_samples(data, spec: SegModelSpec, dropout_prob: float = 0.5) -> list[dict]:
    """Each validation study with all its sequences and once more as an incomplete study (no CE-T1,
    no DWI/ADC, T2 only in turn), so the best weights are the best on both. Weights trained for one kind
    of study only are validated on it: `dropout_prob` 0, complete studies; 1, incomplete ones."""
    subsets = [s for s in SUBSETS if s != "all"]
    out = []
    for i, (img, lab) in enumerate(data):
        kinds = ("all", subsets[i % len(subsets)])
        for subset in kinds[:1] if dropout_prob <= 0 else kinds[1:] if dropout_prob >= 1 else kinds:
            x = drop_sequences(img, spec, subset)
            if spec.box_prompted:
                comps = _tumour_components(lab == TUMOR)
                if comps:
                    out.append(_box_sample(x, lab, roi_from_mask(max(comps, key=np.sum)), spec))
            else:
                out.append({"image": torch.from_numpy(x), "label": torch.from_numpy(lab[None].astype(np.int64))})
    return out


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
            pred = segment(net, spec, img, SINGLE_PASS)  # checkpoint selection: single pass (served: + left-right mirror)
            gland.append(dice(pred == GLAND, lab == GLAND))
            tumour.append(dice(pred == TUMOR, lab == TUMOR))
    out = {"dice_tumor": float(np.mean(tumour)) if tumour else None, "n": len(tumour)}
    if gland:
        out["dice_gland"] = float(np.mean(gland))
    return out


def evaluate_subsets(net, spec: SegModelSpec, data) -> dict:
    """`evaluate` for each available-sequence subset (SUBSETS) of the same studies."""
    return {subset: evaluate(net, spec, [(drop_sequences(img, spec, subset), lab) for img, lab in data])
            for subset in SUBSETS}


def _loader(samples, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False, num_workers=0)


def build_engines(net, spec: SegModelSpec, trn, val, iterations: int, batch_size: int, lr: float, seed: int,
                  val_interval: int, patience: int, progress: Callable[[int, float], None] | None = None,
                  stop_after: int | None = None, dropout_prob: float = 0.5, tumour_share: float = 1.0,
                  study_weights: Sequence[float] | None = None):
    """(trainer, evaluator): one trainer 'epoch' is `val_interval` iterations, then a validation.
    `stop_after`: stop after that many iterations (rounded up to a validation), the learning-rate
    schedule still planned for `iterations`. `dropout_prob`: share of training samples lacking sequences
    (0: complete studies only, 1: incomplete ones only; validated likewise). `tumour_share`: share of the
    label-centred patches (2/3 of all) centred on tumour rather than gland (`_random_patch`). `study_weights`:
    how often each training study is drawn, relative to the others (None: uniformly)."""
    device = torch.device("cpu")
    n_classes = spec.out_channels
    post = Compose([AsDiscreted("pred", argmax=True, to_onehot=n_classes), AsDiscreted("label", to_onehot=n_classes)])
    inferer = SimpleInferer() if spec.box_prompted else SlidingWindowInferer(
        roi_size=spec.patch, sw_batch_size=2, overlap=0.25, mode="gaussian")
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=_loader(validation_samples(val, spec, dropout_prob), 1), network=net, inferer=inferer,
        postprocessing=post, key_val_metric={KEY_METRIC: MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
    )
    epochs = -(-iterations // val_interval)  # iterations rounded up to whole validation intervals
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * val_interval)
    trainer = SupervisedTrainer(
        device=device, max_epochs=min(epochs, -(-stop_after // val_interval)) if stop_after else epochs,
        epoch_length=val_interval,
        train_data_loader=_loader(RandomSamples(trn, spec, epochs * val_interval * batch_size, seed, dropout_prob, tumour_share, study_weights), batch_size),
        network=net, optimizer=opt, loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=[LrScheduleHandler(sched, print_lr=False, epoch_level=False),
                        ValidationHandler(validator=evaluator, interval=1, epoch_level=True)],
    )
    EarlyStopHandler(patience=patience, score_function=stopping_fn_from_metric(KEY_METRIC), trainer=trainer,
                     epoch_level=True).attach(evaluator)
    if progress:
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: progress(e.state.iteration - 1, float(from_engine("loss", first=True)(e.state.output))))
    return trainer, evaluator


def _keep_best(evaluator, net, publish: Callable[[], None] | None = None) -> dict:
    """Copy of the weights each time the evaluator reports a new best key metric (after its comparison);
    `publish` is called then too (an interrupted run leaves its best checkpoint, as MONAI Label does)."""
    best: dict = {"state": copy.deepcopy(net.state_dict())}

    def _save(engine):
        logger.info(f"validation at epoch {engine.state.epoch}: {KEY_METRIC} {engine.state.metrics.get(KEY_METRIC):.4f} "
                    f"(best {engine.state.best_metric:.4f} at epoch {engine.state.best_metric_epoch})")
        if engine.state.best_metric_epoch == engine.state.epoch:
            best["state"] = copy.deepcopy(net.state_dict())
            if publish:
                publish()

    evaluator.add_event_handler(Events.EPOCH_COMPLETED, _save)
    return best


def default_val_interval(iterations: int, most: int = 250) -> int:
    """Iterations between validations: at most `most`, about 4 validations in short runs, and a divisor
    of `iterations` when one is close (so the run does exactly `iterations`)."""
    cap = max(1, min(most, iterations // 4))
    for v in range(cap, max(1, cap // 2) - 1, -1):
        if iterations % v == 0:
            return v
    return cap


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
    val_interval: int | None = None,
    patience: int = 4,
    max_val_studies: int = 16,
    stop_after: int | None = None,
    dropout_prob: float = 0.5,
    init_part: str = COMPLETE,
    shape: UNetShape | None = None,
    tumour_share: float = 1.0,
    class_weights: dict[str, float] | None = None,
) -> dict:
    """Train `spec` on `items` (held-out studies excluded); write the best checkpoint atomically to
    `out_path` (+ stats json next to it); return the stats. `init_part`: which weights of `init_from`
    to start from (parotid.segmentation.subset_models). `shape`: the architecture (default: that of the
    weights fine-tuned from, else ``spec.shape``; weights of the same shapes initialise another one).
    `class_weights`: tumour class -> how often its studies are drawn for training relative to the others
    (absent classes: 1)."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    n_items = len(items)
    items = [it for it in items if not is_holdout(it.study_id)]
    spacing = _spacing_for(items, init_from)
    ids: list[str] = []
    data = _load(items, spec, spacing, ids)
    if len(data) < 2:
        raise ValueError(f"need at least 2 labelled studies with {list(MINIMUM)}, got {len(data)}")
    n_val = min(max_val_studies, max(1, int(round(val_fraction * len(data)))))
    order = rng.permutation(len(data))
    val = [data[i] for i in order[:n_val]]
    trn = [data[i] for i in order[n_val:]]
    study_weights = None
    if class_weights:
        cls = {it.study_id: it.tumor_class for it in items}
        unknown = sorted(set(class_weights) - set(cls.values()))
        if unknown:
            raise ValueError(f"class weights for {unknown}: no training study has that tumour class "
                             f"(the cohorts have {sorted(set(cls.values()))})")
        study_weights = [float(class_weights.get(cls.get(ids[i]), 1.0)) for i in order[n_val:]]

    init = torch.load(init_from, map_location="cpu", weights_only=True) if init_from and os.path.exists(init_from) else None
    shape = shape or (network_shape(part_entries(init, init_part)) if init is not None else spec.shape)
    net = build_network(spec, shape)
    if init is not None:
        net.load_state_dict(state_dict_of(init, init_part))
    val_interval = val_interval or default_val_interval(iterations)
    trainer, evaluator = build_engines(net, spec, trn, val, iterations, batch_size, lr, seed, val_interval, patience, progress,
                                       stop_after, dropout_prob, tumour_share, study_weights)
    start = time.time()

    def publish():
        interim = json.loads(json.dumps(prepare_stats(start, trainer, evaluator)))
        save_checkpoint(net, spec, {**interim, "interim": True, "model": spec.name, "spacing": spacing}, out_path, spacing, shape)

    best = _keep_best(evaluator, net, publish)
    trainer.run()
    net.load_state_dict(best["state"])
    # MONAI Label's train stats, as plain JSON types (its keys are MONAI enums; checkpoints load weights_only)
    stats = json.loads(json.dumps(prepare_stats(start, trainer, evaluator)))
    subsets = evaluate_subsets(net, spec, val)
    stats.update(subsets["all"])
    stats.update(
        model=spec.name, train_studies=len(trn), val_studies=len(val), holdout_studies=n_items - len(items), validation_ids=[ids[i] for i in order[:n_val]], iterations=trainer.state.iteration,
        best_metric_iteration=int(evaluator.state.best_metric_epoch) * val_interval, val_interval=val_interval,
        stopped_early=trainer.state.iteration < trainer.state.max_epochs * val_interval, subset_dice=subsets,
        train_seconds=round(time.time() - start, 1), version=time.strftime("%Y%m%d-%H%M%S"), spacing=spacing,
        required=list(MINIMUM), optional=optional_sequences(spec.sequences), dropout_prob=dropout_prob,
        network=shape_name(shape), tumour_share=tumour_share, class_weights=dict(class_weights or {}),
    )
    save_checkpoint(net, spec, stats, out_path, spacing, shape)
    return stats


def has_subset_models(path: str | None) -> bool:
    return bool(path and os.path.exists(path)
                and torch.load(path, map_location="cpu", weights_only=True).get(SUBSET_MODELS))


def recorded_shapes(path: str | None) -> dict[str, UNetShape]:
    """The architecture of each part of the checkpoint at `path` ({} when there is no file)."""
    if not path or not os.path.exists(path):
        return {}
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return {part: network_shape(part_entries(ck, part)) for part in parts(ck)}


def train_subset_models(spec: SegModelSpec, items: Sequence[CohortItem], out_path: str, init_from: str | None = None,
                        shapes: dict[str, UNetShape] | None = None, **kwargs) -> dict:
    """Retrain a file with complete- and incomplete-study weights (parotid.segmentation.subset_models):
    the complete part without sequence dropout, the incomplete part with every sample lacking sequences,
    each from its own weights of `init_from` (None: from scratch); then one file. `shapes`: each part's
    architecture (default: that of its initial weights, else ``spec.shape``) — from scratch, the server passes
    the served file's, so "from scratch" re-initialises the weights without changing the architecture.
    `kwargs`: `train`'s."""
    import tempfile

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".subset-models-", dir=os.path.dirname(os.path.abspath(out_path))) as tmp:
        paths = {part: os.path.join(tmp, part, f"{spec.name}.pt") for part in (COMPLETE, INCOMPLETE)}
        for part, prob in ((COMPLETE, 0.0), (INCOMPLETE, 1.0)):
            start = init_from if init_from and (part == COMPLETE or has_subset_models(init_from)) else None
            train(spec, items, paths[part], init_from=start, init_part=part if start else COMPLETE,
                  dropout_prob=prob, shape=(shapes or {}).get(part), **kwargs)
        return combine(paths[COMPLETE], paths[INCOMPLETE], out_path)


def save_checkpoint(net, spec: SegModelSpec, stats: dict, out_path: str, spacing=None, shape: UNetShape | None = None) -> None:
    """`spacing`: the training spacing [sx, sy, sz] mm (I, J, K), what inference resamples studies to.
    `required` / `optional`: the input sequences a study must have / may lack (zero channel).
    `shape`: the network's architecture (default ``spec.shape``), recorded so loading rebuilds it."""
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    ck = {"model": net.state_dict(), "spec": spec.name, "sequences": list(spec.sequences), "stats": stats,
          "required": list(MINIMUM), "optional": optional_sequences(spec.sequences),
          NETWORK_KEY: (shape or spec.shape).as_dict()}
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
    p.add_argument("--val-interval", type=int, help="iterations between validations (default min(250, iterations/4))")
    p.add_argument("--patience", type=int, default=4, help="validations without improvement before stopping")
    p.add_argument("--stop-after", type=int, help="stop after this many iterations (schedule still for --iterations)")
    p.add_argument("--max-val-studies", type=int, default=16,
                   help="at most this many validation studies (--val-fraction of the studies, capped)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of the studies held out for validation")
    p.add_argument("--init-from", help="checkpoint to fine-tune from")
    p.add_argument("--init-part", choices=[COMPLETE, INCOMPLETE], default=COMPLETE,
                   help="which weights of an --init-from file with subset models to start from")
    p.add_argument("--network", choices=sorted(SHAPES),
                   help="UNet architecture (parotid.segmentation.networks; default: --init-from's, else half-res)")
    p.add_argument("--dropout-prob", type=float, default=0.5,
                   help="share of training samples lacking sequences (1.0: a model for incomplete studies only)")
    p.add_argument("--tumour-share", type=float, default=1.0,
                   help="share of the label-centred training patches (2/3 of all) centred on tumour, the rest on "
                        "gland (default 1.0: every shipped round's sampling)")
    p.add_argument("--class-weight", action="append", default=[], metavar="CLASS=W",
                   help="draw training studies of this tumour class W times as often (repeatable; e.g. malignant=2)")
    a = p.parse_args(argv)
    class_weights = {}
    for cw in a.class_weight:
        name, _, w = cw.partition("=")
        try:
            class_weights[name] = float(w)
        except ValueError:
            p.error(f"--class-weight {cw!r}: expected CLASS=NUMBER, e.g. malignant=2")
        if not class_weights[name] > 0:
            p.error(f"--class-weight {cw!r}: the weight must be > 0")
    torch.set_num_threads(a.threads)
    spec = SPECS[a.model]
    items = [it for folder in a.cohort for it in load_cohort(folder)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.time()

    def progress(it: int, loss: float) -> None:
        if (it + 1) % 50 == 0:
            logger.info(f"iteration {it + 1}: loss {loss:.3f} ({time.time() - t0:.0f} s)")

    stats = train(spec, items, os.path.join(a.out, f"{spec.name}.pt"), a.iterations, a.batch_size, lr=a.lr,
                  seed=a.seed, init_from=a.init_from, val_interval=a.val_interval, patience=a.patience, progress=progress,
                  stop_after=a.stop_after, dropout_prob=a.dropout_prob, init_part=a.init_part,
                  val_fraction=a.val_fraction, max_val_studies=a.max_val_studies,
                  shape=SHAPES[a.network] if a.network else None, tumour_share=a.tumour_share,
                  class_weights=class_weights or None)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
