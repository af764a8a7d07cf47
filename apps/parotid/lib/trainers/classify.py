"""Train task for the classification models: runs in MONAI Label's training subprocess.

Reads ``tumor_class`` and ``roi`` from the datastore's final-label info (studies without them, or whose
class is not in this task's label set, are skipped). The fixed held-out part of those studies
(``parotid.cohort.split_holdout``) is never trained on: the two-stage sequence model is trained from
scratch on the rest, written as a candidate version into the model registry, and the promotion gate
scores it and the served checkpoint on the held-out studies (macro-AUC, log-loss; parotid.registry).
Promoted, it replaces the served checkpoint atomically and the infer task reloads it (mtime).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict

import torch
from monailabel.interfaces.datastore import Datastore

from lib.trainers.gated import GatedTrainTask
from parotid.classification.data import cropset_from_records
from parotid.classification.checkpoint import read_config, save_checkpoint
from parotid.classification.defaults import DEFAULT_BRANCH_DROPOUT, DEFAULT_FUSION, DEFAULT_REQUIRED, DEFAULT_SEQS
from parotid.classification.task_model import cohort_spacing, train_task_model
from parotid.cohort import cohort_items, split_holdout, with_class_and_box
from parotid.holdout_scores import classifier_scores
from parotid.labels import get_label_set

logger = logging.getLogger(__name__)


class TrainClassify(GatedTrainTask):
    gate_kind = "classification"

    def __init__(self, name: str, path: str, label_set: str, epochs1: int = 8, epochs2: int = 40):
        ls = get_label_set(label_set)
        super().__init__(f"Train {name} ({ls.name}: {', '.join(ls.classes)}) on final labels' tumor_class + roi",
                         name, path)
        self.label_set = ls.name
        self.epochs1, self.epochs2 = epochs1, epochs2

    def config(self) -> Dict[str, Any]:
        return {"epochs1": self.epochs1, "epochs2": self.epochs2, "seed": 0, "threads": 1,
                "sequences": list(DEFAULT_SEQS), "fusion": DEFAULT_FUSION, "required": list(DEFAULT_REQUIRED),
                "branch_dropout": DEFAULT_BRANCH_DROPOUT, "val_frac": 0.2, "force": False}

    def sidecar(self, path: str) -> dict:
        return read_config(path)

    def describe(self, path: str) -> dict:
        cfg = self.sidecar(path)
        return {"trained": True, "label_set": cfg.get("label_set"), "temperature": cfg.get("temperature"),
                **cfg.get("trained", {})}

    def stats(self) -> Dict[str, Any]:
        served = self.served_description()
        if served is None:
            return {"trained": False, "label_set": self.label_set, **self.registry_stats(),
                    "reason": f"no checkpoint yet; POST /train/{self.name} with labelled studies of this label set"}
        return {**served, **self.registry_stats()}

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        conf = {**self.config(), **(request or {})}
        torch.set_num_threads(int(conf["threads"]))
        ls = get_label_set(self.label_set)
        seqs = list(conf["sequences"])
        usable = [it for it in with_class_and_box(cohort_items(datastore)) if ls.accepts(it.tumor_class)]
        train_items, holdout_items = split_holdout(usable)
        logger.info(f"training {self.name} on {len(train_items)} studies with tumor_class + roi "
                    f"({len(holdout_items)} held out for calibration and the promotion gate): {conf}")
        if len(train_items) < 10:
            raise ValueError(f"{self.name}: need >= 10 studies with tumor_class ({ls.name}) and roi outside the held-out "
                             f"part, have {len(train_items)} (+ {len(holdout_items)} held out)")

        def train(path: str) -> dict:
            t0 = time.time()
            cs = cropset_from_records(train_items, size=48, cache_dir=None, name=self.name)
            # temperature and undetermined thresholds fitted on the held-out studies (never trained on)
            holdout = cropset_from_records(holdout_items, size=48, cache_dir=None, name=f"{self.name}-holdout")
            model, cfg = train_task_model(cs, ls.name, seqs, conf["fusion"], int(conf["epochs1"]), int(conf["epochs2"]),
                                          int(conf["seed"]), float(conf["val_frac"]), desc=self.name,
                                          required=list(conf["required"]), spacing=cohort_spacing(it.image for it in train_items),
                                          branch_dropout=float(conf["branch_dropout"]), holdout=holdout)
            cfg["task"] = self.name
            cfg["trained"].update(source="datastore", n_holdout=len(holdout_items),
                                  seconds_total=round(time.time() - t0, 1))
            save_checkpoint(path, model, cfg)
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                json.dump(cfg, f, indent=1)
            return cfg["trained"]

        return self.run_gated(conf, train_items, holdout_items, train,
                              lambda path: classifier_scores(path, holdout_items), config=conf)
