"""Classifier training on MONAI's engines: patient roles (calibration never trained on), best-epoch
weights, MONAI Label-style train stats. DDP equivalence: tests/test_classification_ddp.py."""

import numpy as np
import pytest
import torch

from toy_cohort import write_toy_cohort

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy_cs(tmp_path_factory):
    from parotid.classification.data import build_cropset

    d = tmp_path_factory.mktemp("toytrain")
    write_toy_cohort(str(d), 40, seed=3)
    return build_cropset(str(d), size=32, n_slices=4)


def _train(cs, **kw):
    from parotid.classification.task_model import train_task_model

    return train_task_model(cs, "subtype4", ("T2", "CET1", "ADC"), "early", epochs1=2, epochs2=4,
                            required=("T2", "CET1"), **kw)


def test_calibration_patients_never_trained_on(toy_cs, tmp_path):
    from parotid.classification.checkpoint import load_checkpoint, save_checkpoint

    cs = toy_cs.subset(range(len(toy_cs)))
    cs.study_ids = np.array(cs.study_ids)  # ids as numpy strings (as some cropsets hold them)
    model, cfg = _train(cs)
    save_checkpoint(str(tmp_path / "m.pt"), model, cfg)
    assert load_checkpoint(str(tmp_path / "m.pt"))[1]["split"] == cfg["split"]  # plain data (weights_only load)
    sp = cfg["split"]
    cal = set(sp["calibration"])
    assert len(cal) == cfg["trained"]["n_calibration"] == cfg["calibration"]["n"] >= 8
    assert cfg["calibration"]["source"] == "calibration split" and cfg["calibration"]["fitted"]
    for role in ("stage1", "stage2", "early_stopping"):
        assert sp[role], role
        assert not cal & set(sp[role]), f"calibration patients in {role}"
    assert set(sp["stage1"]) == set(sp["stage2"])  # both stages train on the same patients
    assert not set(sp["early_stopping"]) & set(sp["stage1"])
    assert len(cal | set(sp["stage1"]) | set(sp["early_stopping"])) == len(toy_cs)  # every usable study has a role
    c = cfg["calibration"]
    assert c["temperature"] == cfg["temperature"] > 0 and c["nll_after"] <= c["nll_before"] + 1e-9
    assert 0.5 <= cfg["uncertainty"]["max_top_prob_below"] <= 0.95
    assert "patients excluded from training" in cfg["uncertainty"]["fitted_on"]


def test_holdout_cropset_is_the_calibration_set(toy_cs):
    ids = toy_cs.study_ids
    train_idx, held_idx = list(range(0, 30)), list(range(30, 40))
    train, held = toy_cs.subset(train_idx), toy_cs.subset(held_idx)
    model, cfg = _train(train, holdout=held)
    assert sorted(cfg["split"]["calibration"]) == sorted(ids[i] for i in held_idx)
    assert cfg["calibration"]["source"] == "holdout"
    assert set(cfg["split"]["stage1"]) | set(cfg["split"]["early_stopping"]) == {ids[i] for i in train_idx}
    with pytest.raises(ValueError, match="also training studies"):
        _train(train, holdout=toy_cs.subset([0, 1, 30, 31, 32, 33, 34, 35, 36, 37]))


class _MeanIntensityNet(torch.nn.Module):
    """(image, box) -> logits from per-channel means: no BatchNorm, so the validation loss moves only
    with the weights."""

    def __init__(self, c: int, k: int):
        super().__init__()
        self.fc = torch.nn.Linear(c, k)

    def forward(self, x, box):
        return self.fc(x.mean((2, 3)))


def test_train_stats_in_monai_label_format_and_best_epoch_weights_kept(toy_cs):
    """run_supervised returns BasicTrainTask-style stats and the network holds the BEST epoch's
    weights: its validation loss equals the recorded best metric. Training never sees class 0 and
    every validation label is class 0, so the validation loss grows from epoch 1 on: early stopping
    after `patience` epochs, and the epoch-1 weights are returned, not the last ones."""
    from parotid.classification import engine

    cs = toy_cs
    y = 1 + np.arange(len(cs)) % 3  # classes 1..3 for training
    ch = cs.channels(["T2", "CET1"])
    torch.manual_seed(0)
    net = _MeanIntensityNet(2, 4)
    tr, va = np.arange(0, 28), np.arange(28, 40)
    loss = engine.WeightedCrossEntropy(torch.ones(4))
    yv = np.zeros_like(y)
    st = engine.run_supervised(net, engine.TumourSliceDataset(cs, tr, ch, y), engine.AllSlicesDataset(cs, va, ch, yv),
                               loss, lambda m: torch.optim.SGD(m.parameters(), lr=0.5), 6, 16,
                               engine.prepare_image_box, patience=2)
    for k in ("best_metric", "best_metric_epoch", "epochs", "total_time", "train", "eval", "total_epochs"):
        assert k in st, k
    assert st["eval"]["key_metric_name"] == "val_loss" and "val_acc" in st["eval"]["metrics"]
    assert "train_acc" in st["train"]["metrics"] and "train_loss" in st["train"]["metrics"]
    assert st["kept"] == "best validation epoch" and st["best_metric_epoch"] == 1
    assert st["stopped_early"] and st["epochs"] == 3  # patience 2
    ds = engine.AllSlicesDataset(cs, va, ch, yv)
    b = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        v = float(loss(net(b["image"], b["box"]), b["label"]))
    assert v == pytest.approx(st["best_metric"], rel=1e-4)


def test_refit_calibration_on_unseen_cohort_keeps_weights(tmp_path_factory):
    """`python -m parotid.classification.calibration refit`: temperature and undetermined threshold refit on
    a cohort the checkpoint never saw; weights and input check stay bit-identical; a cohort holding
    training patients is refused."""
    from parotid.classification.calibration import calibrate, main, refit_checkpoint
    from parotid.classification.checkpoint import load_checkpoint, read_raw, save_checkpoint
    from parotid.classification.data import build_cropset
    from parotid.labels import get_label_set

    d = tmp_path_factory.mktemp("refit")
    train_dir, unseen_dir = str(d / "train"), str(d / "unseen")
    write_toy_cohort(train_dir, 40, seed=3)
    write_toy_cohort(unseen_dir, 20, seed=7)
    train_cs = build_cropset(train_dir, size=32, n_slices=4)
    model, cfg = _train(train_cs)
    model.input_check = {"toy": torch.arange(3.0)}
    ck = str(d / "m.pt")
    save_checkpoint(ck, model, cfg)
    out = str(d / "out" / "m.pt")
    main(["refit", "--checkpoint", ck, "--cohort", unseen_dir, "--out", out, "--note", "toy"])
    old, new = read_raw(ck), read_raw(out)
    assert old["state_dict"].keys() == new["state_dict"].keys()
    for k, v in old["state_dict"].items():
        assert v.dtype == new["state_dict"][k].dtype and torch.equal(v, new["state_dict"][k]), k
    assert torch.equal(old["input_check"]["toy"], new["input_check"]["toy"])
    c = new["config"]
    changed = {"temperature", "uncertainty", "calibration", "split"}
    assert {k: v for k, v in c.items() if k not in changed} == {k: v for k, v in cfg.items() if k not in changed}
    assert {k: v for k, v in c["split"].items() if k != "calibration"} == \
        {k: v for k, v in cfg["split"].items() if k != "calibration"}
    assert c["calibration"]["cohort"] == "unseen" and c["calibration"]["previous_temperature"] == cfg["temperature"]
    assert c["calibration"]["n"] == 20 and c["calibration"]["date"] and "cohort_seeds" in c["calibration"]
    assert all(s.startswith("toy007_") for s in c["split"]["calibration"])
    # the refit T is the one fitted on the unseen patients, not the one the training patients would give
    m, _ = load_checkpoint(ck)
    ls, unseen = get_label_set("subtype4"), build_cropset(unseen_dir, size=32, n_slices=4)
    usable = lambda cs: [i for i, t in enumerate(cs.tumor_class) if ls.accepts(t)]  # noqa: E731
    assert c["temperature"] == calibrate(m, cfg["groups"], unseen, usable(unseen), ls, "x")["temperature"]
    stage1 = [i for i, s in enumerate(train_cs.study_ids) if s in set(cfg["split"]["stage1"])]
    assert abs(c["temperature"] - calibrate(m, cfg["groups"], train_cs, stage1, ls, "x")["temperature"]) > 1e-3
    assert load_checkpoint(out)[1]["temperature"] == c["temperature"]
    with pytest.raises(ValueError, match="were trained on"):
        refit_checkpoint(ck, train_dir, str(d / "bad.pt"))


def test_stage2_learning_rate_reaches_the_optimizer_and_the_record(toy_cs, monkeypatch):
    """`lr2` (train.py --lr2; Liu et al.'s stage 2 uses 1e-5, ours DEFAULT_STAGE2_LR) is the stage-2 head's
    learning rate: the real AdamW is wrapped to record what it is given; stage 2 is the last optimizer built."""
    from parotid.classification.defaults import DEFAULT_STAGE2_LR

    seen = []
    real = torch.optim.AdamW

    def recording(params, lr, **kw):
        seen.append(lr)
        return real(params, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    for lr2 in (3e-4, DEFAULT_STAGE2_LR):
        seen.clear()
        _, cfg = _train(toy_cs, lr2=lr2)
        assert seen[-1] == lr2 and cfg["trained"]["lr_stage2"] == lr2
    assert DEFAULT_STAGE2_LR == 1e-3  # the shipped checkpoints' setting (their config predates the record)


def test_stage2_learning_rate_must_be_positive_on_the_command_line(tmp_path, capsys):
    """A rate of 0 or below is refused by the CLI, naming the option, before any cohort is read; the good
    twin (a valid rate) gets past the option and fails only on the missing cohort."""
    from parotid.classification.train import main

    for bad in ("0", "-1e-5", "fast"):
        with pytest.raises(SystemExit) as e:
            main(["--cohort", str(tmp_path / "none"), "--lr2", bad])
        assert e.value.code == 2 and "--lr2" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="cohort folder not found"):  # 1e-5 accepted; the cohort is missing
        main(["--cohort", str(tmp_path / "none"), "--lr2", "1e-5", "--out", str(tmp_path / "out")])
