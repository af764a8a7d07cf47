"""The served classification model of a task: Liu's sequence model over the default sequences, calibrated
on held-out patients, with the input check's feature density and the training record in its config
(saved by ``checkpoint.save_checkpoint``)."""

from __future__ import annotations

import time

import numpy as np
import torch

from parotid import __version__
from parotid.labels import get_label_set
from parotid.model_space import SPACING_KEY, file_spacing, training_spacing

from .data import CropSet
from .defaults import DEFAULT_BRANCH_DROPOUT, DEFAULT_FUSION, DEFAULT_REQUIRED, DEFAULT_SEQS, DEFAULT_STAGE2_LR
from .liu import fit_sequence_model, patient_split
from .missing import cropset_presence
from .models import SequenceModel, branch_combiner


def train_task_model(cs: CropSet, label_set_name: str, seqs=DEFAULT_SEQS, fusion: str = DEFAULT_FUSION,
                     epochs1: int = 12, epochs2: int = 60, seed: int = 0, val_frac: float = 0.2, desc="",
                     required=DEFAULT_REQUIRED, spacing=None, holdout: CropSet | None = None,
                     cal_frac: float = 0.2, patience1: int = 4, patience2: int = 15,
                     branch_dropout: float = DEFAULT_BRANCH_DROPOUT,
                     lr2: float = DEFAULT_STAGE2_LR) -> tuple[SequenceModel, dict]:
    """The server model: Liu's sequence model (late 'spl' fusion with one branch per sequence by default,
    'add', or 'early' fusion of `seqs` as channels) + temperature + MC-dropout settings. Studies need the
    `required` sequences; the others may be missing (missing.py). `spacing`: the training studies'
    spacing (`cohort_spacing`), recorded so inference resamples to it.

    Patients: the temperature and the undetermined threshold are fitted on patients excluded from
    every training stage: the `holdout` CropSet when given (the app passes the datastore's
    ``cohort.split_holdout`` part), else a stratified `cal_frac` of `cs` (none when that would be fewer
    than ``calibration.MIN_CALIBRATION`` patients: T = 1, default thresholds). Of the rest, `val_frac`
    validates both stages (best-epoch weights, early stopping). ``cfg["split"]`` records the study
    ids of each role."""
    ls = get_label_set(label_set_name)
    required = [q for q in required if q in seqs]

    def usable(c: CropSet) -> list[int]:
        return [i for i, t in enumerate(c.tumor_class) if ls.accepts(t) and all(c.avail[i, c.channels(required)])]

    keep = usable(cs)
    y = cs.labels(ls)
    if holdout is not None:
        shared = set(holdout.study_ids) & {cs.study_ids[i] for i in keep}
        if shared:
            raise ValueError(f"holdout studies are also training studies: {sorted(shared)[:5]}")
        train_idx, cal_cs, cal_idx, source = np.asarray(keep), holdout, usable(holdout), "holdout"
    else:
        from .calibration import MIN_CALIBRATION

        cal_cs, source = cs, "calibration split"
        train_idx, cal_idx = np.asarray(keep), np.array([], int)
        if np.ceil(cal_frac * len(keep)) >= MIN_CALIBRATION:  # else too few to fit anything: train on all
            train_idx, cal_idx = patient_split(keep, y, cal_frac, seed + 1)
    if len(train_idx) < 10:
        raise SystemExit(f"only {len(train_idx)} studies usable for training label set {label_set_name}")
    groups = [list(seqs)] if fusion == "early" else [[s] for s in seqs]
    t0 = time.time()
    model, info = fit_sequence_model(cs, train_idx, ls, groups, branch_combiner(fusion), epochs1, epochs2,
                                     seed, val_frac=val_frac, desc=desc, patience1=patience1, patience2=patience2,
                                     optional=tuple(q for q in seqs if q not in required), branch_dropout=branch_dropout,
                                     lr2=lr2)
    stats = info["stats"]
    split = {"stage1": sorted({i for st in stats["stage1"].values() for i in st.pop("study_ids")["train"]}),
             "stage2": stats["stage2"].pop("study_ids")["train"],
             "early_stopping": [str(cs.study_ids[i]) for i in info["val_idx"]]}
    from .calibration import calibrate

    cal = calibrate(model, groups, cal_cs, cal_idx, ls, source, seed=seed)
    split["calibration"] = cal["calibration"].pop("study_ids")
    counts = {c: int(np.sum(y[train_idx] == i)) for i, c in enumerate(ls.classes)}
    # input check: Local Outlier Factor on the training studies' pooled features, saved with the weights;
    # threshold in-sample here, recalibrated on a held-out cohort by `python -m parotid.input_check fit`
    from parotid.input_check import fit_feature_density

    density = fit_feature_density(subset_features(model, groups, cs, train_idx))
    model.input_check = density.to_checkpoint()
    s2 = stats["stage2"]
    cfg = {"kind": "sequence", "label_set": ls.name, "classes": list(ls.classes), "malignant": list(ls.malignant),
           "sequences": list(seqs), "required": list(required), "groups": groups, "fusion": fusion,
           "size": int(cs.slices.shape[-1]), "n_slices": int(cs.slices.shape[1]), "margin": 0.25, "n_clinical": 0,
           "temperature": cal["temperature"], "version": __version__, "branch_dropout": branch_dropout, "uncertainty": cal["uncertainty"],
           "calibration": cal["calibration"],
           "trained": {"n_train": len(info["fit_idx"]), "n_val": len(info["val_idx"]), "n_calibration": len(split["calibration"]),
                       "class_counts": counts, "epochs_stage1": epochs1, "epochs_stage2": epochs2, "lr_stage2": lr2,
                       "seed": seed,
                       "seconds": round(time.time() - t0, 1), "synthetic": True, "engine": "monai.engines.SupervisedTrainer",
                       "world_size": int(s2.get("world_size", 1)),
                       # MONAI Label's train stats (stage 2 = the served head), per stage below
                       "best_metric": s2.get("best_metric"), "best_metric_epoch": s2.get("best_metric_epoch"),
                       "epochs": s2.get("epochs"), "total_time": s2.get("total_time"),
                       "key_metric": "val_loss (class-weighted cross-entropy, lower is better)",
                       "stages": {"stage1": stats["stage1"], "stage2": s2},
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "split": split}
    if spacing is not None:
        cfg[SPACING_KEY] = [float(v) for v in spacing]
    return model, cfg


def subset_features(model: SequenceModel, groups, cs: CropSet, idx) -> np.ndarray:
    """Pooled features of cohort rows under every sequence subset the model serves (missing.SUBSETS; a
    subset that removes a branch of a one-branch model is skipped): the input check's feature density
    then knows what a study without, e.g., CE-T1 looks like."""
    from parotid.input_check import classifier_features_cropset

    from .missing import SUBSETS

    from parotid.input_check import pooled_features

    seqs = [s for g in groups for s in g]
    late = all(len(g) == 1 for g in groups)
    if late:  # branch features once; a subset = a presence mask on them
        chans = cs.channels(seqs)
        with torch.no_grad():
            parts = [model.branch_features(torch.from_numpy(cs.slices[ii][:, :, chans].astype(np.float32)),
                                           torch.from_numpy(cs.box[ii]))
                     for ii in np.array_split(np.asarray(idx), max(1, len(idx) // 16))]
        bf = [torch.cat([p[b] for p in parts]) for b in range(len(groups))]
    rows = []
    for drop in SUBSETS.values():
        if all(q not in seqs for q in drop) and rows:
            continue  # same as "all"
        if late:
            m = cropset_presence(cs, groups, idx, drop)
            rows.append(pooled_features(model, model.fuse([f * m[:, b].to(f.dtype)[:, None, None] for b, f in enumerate(bf)])))
        else:
            rows.append(classifier_features_cropset(model, {"groups": groups}, cs, idx, drop=drop))
    return np.concatenate(rows)


def cohort_spacing(images) -> list[float]:
    """Training spacing [sx, sy, sz] mm (I, J, K) of the study files `images`: the per-axis median.
    Crops are cut on each study's own grid (all synthetic cohorts share one spacing)."""
    return training_spacing(file_spacing(p) for p in images)

