"""Segmentation training on MONAI's engines: sequence dropout, best validated weights, early stopping,
the checkpoint's required/optional sequences, held-out studies never trained on (SYNTHETIC sample data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from parotid.cohort import is_holdout, load_cohort
from parotid.segmentation.networks import CONTOUR_BOX, SEGMENTATION, build_network, network_shape
from parotid.segmentation.sequence_dropout import SUBSETS, RandSequenceDropout, missing_in

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample-data" / "studies"
MODEL = ROOT / "apps" / "parotid" / "model" / "segmentation.pt"


def _draws(transform, n=400):
    x = torch.ones((len(SEGMENTATION.sequences) + 1, 2, 2, 2))  # + a box-prompt channel
    return [tuple(bool(v) for v in transform(x)[:, 0, 0, 0]) for _ in range(n)]


def test_sequence_dropout_zeroes_whole_optional_sequences_only():
    t = RandSequenceDropout(SEGMENTATION.sequences, prob=0.5)
    t.set_random_state(0)
    draws = _draws(t)
    t2 = SEGMENTATION.sequences.index("T2")
    assert all(d[t2] and d[-1] for d in draws)  # T2 and the box channel are never dropped
    full = sum(all(d) for d in draws) / len(draws)
    assert 0.4 < full < 0.65, full  # half the samples keep every sequence (+ random draws dropping nothing)
    kept = {tuple(s for s, k in zip(SEGMENTATION.sequences, d) if k) for d in draws}
    for subset in ("no_CET1", "no_DWI_ADC", "T2_only"):  # every incomplete study type is trained on
        missing = missing_in(subset, SEGMENTATION.sequences)
        assert tuple(s for s in SEGMENTATION.sequences if s not in missing) in kept, subset
    t0 = RandSequenceDropout(SEGMENTATION.sequences, prob=0.0)
    assert all(all(d) for d in _draws(t0, 20))


def test_subsets_name_what_they_lack():
    seqs = SEGMENTATION.sequences
    assert missing_in("all", seqs) == ()
    assert missing_in("no_CET1", seqs) == ("CET1",)
    assert set(missing_in("no_DWI_ADC", seqs)) == {"DWI_B0", "DWI_B1000", "ADC"}
    assert set(missing_in("T2_only", seqs)) == set(seqs) - {"T2"}
    assert set(SUBSETS) == {"all", "no_CET1", "no_DWI_ADC", "T2_only"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A deliberately unstable fine-tune (huge learning rate) from the shipped weights: validation must
    keep the best weights and stop early."""
    from parotid.segmentation.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("segtrain") / "segmentation.pt"
    items = load_cohort(str(SAMPLE))
    stats = train(SEGMENTATION, items, str(out), iterations=12, batch_size=2, lr=0.5, seed=0, init_from=str(MODEL),
                  val_interval=2, patience=2, max_val_studies=2)
    return stats, torch.load(out, map_location="cpu", weights_only=True), items


def test_training_keeps_the_best_validated_weights(trained):
    from parotid.segmentation.train import _load, validation_samples
    from monai.inferers import SlidingWindowInferer
    from monai.metrics import DiceMetric
    from monai.networks import one_hot

    stats, ck, items = trained
    assert stats["eval"]["key_metric_name"] == "val_mean_dice"
    assert stats["best_metric"] == stats["eval"]["best_metric"] and stats["eval"]["best_metric_epoch"] >= 1
    assert {"total_epochs", "total_iterations", "epoch", "start_ts"} <= set(stats)  # MONAI Label's format
    # the saved weights score the best metric on the validation samples, not the last one
    net = build_network(SEGMENTATION, network_shape(ck))
    net.load_state_dict(ck["model"])
    net.eval()
    metric = DiceMetric(include_background=False)
    inferer = SlidingWindowInferer(roi_size=SEGMENTATION.patch, sw_batch_size=2, overlap=0.25, mode="gaussian")
    val = [it for it in items if it.study_id in stats["validation_ids"]]
    val.sort(key=lambda it: stats["validation_ids"].index(it.study_id))
    for s in validation_samples(_load(val, SEGMENTATION, ck["spacing"]), SEGMENTATION):
        with torch.no_grad():
            pred = inferer(s["image"][None], net).argmax(1, keepdim=True)
        metric(one_hot(pred, 3), one_hot(s["label"][None], 3))
    assert abs(metric.aggregate().mean().item() - stats["best_metric"]) < 1e-4
    assert stats["best_metric"] > stats["eval"]["metrics"]["val_mean_dice"]  # the run got worse after its best


def test_training_stops_early_and_records_sequences(trained):
    stats, ck, items = trained
    assert stats["stopped_early"] and stats["iterations"] < 12
    assert ck["required"] == ["T2"] and set(ck["optional"]) == set(SEGMENTATION.sequences) - {"T2"}
    assert stats["required"] == ["T2"] and set(stats["subset_dice"]) == set(SUBSETS)
    assert ck["spacing"] == [1.5, 1.5, 3.0]
    assert stats["train_studies"] + stats["val_studies"] == sum(not is_holdout(it.study_id) for it in items)


def test_a_dropped_sequence_in_training_is_what_inference_gives_a_study_lacking_it():
    from dataclasses import replace

    from parotid.segmentation.inference import study_input
    from parotid.segmentation.subset_eval import without
    from parotid.segmentation.train import drop_sequences
    from parotid.study import read_study

    study = read_study(str(SAMPLE / "syn7_0000.nii.gz"))
    spec = replace(SEGMENTATION, required=("T2",))
    full = study_input(study, spec)
    for subset in SUBSETS:
        lacking = without(study, missing_in(subset, spec.sequences))
        assert set(lacking.sequences) == set(spec.sequences) - set(missing_in(subset, spec.sequences))
        np.testing.assert_array_equal(study_input(lacking, spec), drop_sequences(full, spec, subset))


def _centre_labels(tumour_share: float, n: int = 600) -> list[int]:
    """The label at the centre of `n` training patches of a study with gland and a small tumour."""
    from parotid.labels import GLAND, TUMOR
    from parotid.segmentation.train import _random_patch

    lab = np.zeros((40, 40, 10), np.uint8)
    lab[5:35, 5:35, 2:8] = GLAND
    lab[28:32, 28:32, 4:6] = TUMOR  # 32 tumour voxels among 5 400 gland voxels
    img = np.arange(lab.size, dtype=np.float32).reshape((1,) + lab.shape)  # each voxel's flat index
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x, _y = _random_patch(img, lab, (16, 16, 4), rng, tumour_share=tumour_share)
        # centre voxel of a patch that was not clipped at the border: patch start + half its size
        centre = np.unravel_index(int(x[0, 0, 0, 0]), lab.shape)
        out.append(int(lab[tuple(c + p // 2 for c, p in zip(centre, (16, 16, 4)))]))
    return out


def test_tumour_share_sets_how_many_training_patches_centre_on_tumour():
    """`--tumour-share`: of the label-centred patches (2/3 of all), that share is centred on a tumour voxel, the
    rest on gland. The default 1.0 is the sampling of every shipped round: 2/3 of the patches of a study with a
    tumour are centred on it (none specifically on gland)."""
    from parotid.labels import GLAND, TUMOR

    for share, tumour_lo, tumour_hi in ((1.0, 0.60, 0.73), (0.5, 0.28, 0.39), (0.0, -0.01, 0.02)):
        centres = _centre_labels(share)
        on_tumour = np.mean([v == TUMOR for v in centres])
        on_gland = np.mean([v == GLAND for v in centres])
        assert tumour_lo < on_tumour < tumour_hi, (share, on_tumour)
        assert on_gland > 0.67 * (1 - share) * 0.9, (share, on_gland)  # the rest of the label-centred ones


def _drawn_studies(weights, n: int = 400) -> np.ndarray:
    """Which of 4 toy studies each of `n` training samples came from (the study's index is written in its T2)."""
    from parotid.labels import GLAND
    from parotid.segmentation.train import RandomSamples

    t2 = SEGMENTATION.sequences.index("T2")
    data = []
    for i in range(4):
        img = np.zeros((len(SEGMENTATION.sequences), 64, 64, 16), np.float32)
        img[t2] = 100.0 * (i + 1)
        lab = np.zeros((64, 64, 16), np.uint8)
        lab[20:40, 20:40, 4:12] = GLAND
        data.append((img, lab))
    samples = RandomSamples(data, SEGMENTATION, n, seed=0, dropout_prob=0.0, study_weights=weights)
    return np.array([int(round(float(samples[k]["image"][t2].mean()) / 100.0)) - 1 for k in range(n)])


def test_class_weights_draw_a_class_more_often():
    """`--class-weight malignant=2`: a study of that class is drawn twice as often; without weights every study
    is equally likely (the draw of every shipped round)."""
    uniform = np.bincount(_drawn_studies(None), minlength=4) / 400
    weighted = np.bincount(_drawn_studies([1, 1, 1, 3]), minlength=4) / 400
    assert all(0.18 < f < 0.32 for f in uniform), uniform
    assert 0.42 < weighted[3] < 0.58 and all(0.10 < f < 0.24 for f in weighted[:3]), weighted


def test_an_unknown_class_weight_is_refused(tmp_path):
    from parotid.segmentation.train import train

    with pytest.raises(ValueError, match="malignent.*no training study has that tumour class"):
        train(SEGMENTATION, load_cohort(str(SAMPLE)), str(tmp_path / "s.pt"), iterations=1, batch_size=1,
              class_weights={"malignent": 2.0})
