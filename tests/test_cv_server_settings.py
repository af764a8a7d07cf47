"""``parotid-eval cv --server-settings``: the fusion ablation trains its sequence models as the shipped
checkpoints are trained and reports every fusion variant per sequence subset (issue 12 item 4)."""

from __future__ import annotations

import inspect
import json

import numpy as np


def test_served_training_settings_are_the_trainers_defaults():
    """The CV's "server settings" cannot drift from what trains the shipped checkpoints."""
    from parotid.classification.defaults import SERVED_TRAINING
    from parotid.classification.task_model import train_task_model
    from parotid.classification.train import main

    defaults = {k: v.default for k, v in inspect.signature(train_task_model).parameters.items()}
    for k, v in SERVED_TRAINING.items():
        assert defaults[k] == v, k
    src = inspect.getsource(main)
    assert f'"--epochs1", type=int, default={SERVED_TRAINING["epochs1"]}' in src
    assert f'"--epochs2", type=int, default={SERVED_TRAINING["epochs2"]}' in src


def test_cv_server_settings_train_as_served_and_report_subsets(tmp_path, monkeypatch):
    from parotid.classification import defaults
    from parotid.evaluation import cv
    from toy_cohort import write_toy_cohort
    from parotid.evaluation.cli import main

    calls = []
    real = cv.fit_sequence_model

    def recording(*args, **kw):  # the real training; records how it was asked to train
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(cv, "fit_sequence_model", recording)
    write_toy_cohort(str(tmp_path / "toy"), 24)
    main(["cv", "--cohort", str(tmp_path / "toy"), "--out", str(tmp_path / "out"), "--label-set", "benign_malignant",
          "--fusion", "T2", "CET1", "ADC", "--single", "T2", "CET1", "ADC", "--variants", "late", "early",
          "--folds", "2", "--epochs1", "1", "--epochs2", "2", "--size", "32", "--n-boot", "20", "--server-settings"])
    assert calls and all(c["val_frac"] == defaults.SERVED_TRAINING["val_frac"] and c["optional"] == ("CET1", "ADC")
                         and c["branch_dropout"] == defaults.SERVED_TRAINING["branch_dropout"] for c in calls)
    out = json.loads((tmp_path / "out" / "ablation_cv.json").read_text())
    assert out["meta"]["training"]["val_frac"] == 0.2 and out["meta"]["epochs1"] == 1
    fusion = [k for k in out["results"] if "fusion" in k]
    assert {k.split(" (")[0] for k in fusion} == {"late fusion Add", "late fusion Spl", "early fusion"}
    for k in fusion:
        subs = out["results"][k]["subsets"]
        assert list(subs) == ["all", "no_CET1", "no_DWI_ADC", "T2_only"]
        # the "all" subset is the variant's own out-of-fold prediction
        assert subs["all"]["binary"]["roc_auc"] == out["results"][k]["binary"]["roc_auc"]
    md = (tmp_path / "out" / "ablation_cv.md").read_text()
    assert "Training as the served checkpoints" in md and "| T2_only |" in md


def test_cv_subsets_remove_the_sequences(tmp_path):
    """Per-subset predictions are made without the removed sequences (they differ from the full ones)."""
    from parotid.classification.data import build_cropset
    from parotid.evaluation.cv import run_ablation
    from toy_cohort import write_toy_cohort
    from parotid.labels import get_label_set

    write_toy_cohort(str(tmp_path / "toy"), 24)
    cs = build_cropset(str(tmp_path / "toy"), size=32)
    res = run_ablation(cs, get_label_set("benign_malignant"), ["T2", "CET1", "ADC"], ["T2", "CET1", "ADC"], folds=2,
                       epochs1=1, epochs2=2, variants={"late", "early"}, subsets=True, log=lambda *_: None)
    for k, r in res.items():
        if k.startswith("_") or "fusion" not in k:
            continue
        np.testing.assert_allclose(r["subsets"]["all"], r["prob"])
        assert not np.allclose(r["subsets"]["T2_only"], r["prob"]), k
        assert not np.allclose(r["subsets"]["no_CET1"], r["prob"]), k
