"""Train task for the classification models: runs in MONAI Label's training subprocess.

Reads ``tumor_class`` and ``roi`` from the datastore's final-label info (studies without them are
skipped), trains the two-stage sequence model from scratch on box crops, fits the temperature on a
held-out validation part and replaces the checkpoint atomically: the running infer task reloads it
when the file's mtime changes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from parotid.classification.data import Record, cropset_from_records
from parotid.classification.train import (DEFAULT_BRANCH_DROPOUT, DEFAULT_FUSION, DEFAULT_REQUIRED, DEFAULT_SEQS,
                                          cohort_spacing, save_checkpoint, train_task_model)
from parotid.cohort import cohort_items
from parotid.labels import get_label_set

logger = logging.getLogger(__name__)


class TrainClassify(TrainTask):
    def __init__(self, name: str, path: str, label_set: str, epochs1: int = 8, epochs2: int = 40):
        ls = get_label_set(label_set)
        super().__init__(f"Train {name} ({ls.name}: {', '.join(ls.classes)}) on final labels' tumor_class + roi")
        self.name, self.path, self.label_set = name, path, ls.name
        self.epochs1, self.epochs2 = epochs1, epochs2

    def config(self) -> Dict[str, Any]:
        return {"epochs1": self.epochs1, "epochs2": self.epochs2, "seed": 0, "threads": 1,
                "sequences": list(DEFAULT_SEQS), "fusion": DEFAULT_FUSION, "required": list(DEFAULT_REQUIRED),
                "branch_dropout": DEFAULT_BRANCH_DROPOUT, "val_frac": 0.2}

    def stats(self) -> Dict[str, Any]:
        p = os.path.splitext(self.path)[0] + ".json"
        if not os.path.exists(p):
            return {"trained": False, "label_set": self.label_set,
                    "reason": f"no checkpoint yet; POST /train/{self.name} with labelled studies of this label set"}
        with open(p) as f:
            cfg = json.load(f)
        return {"trained": True, "label_set": cfg.get("label_set"), "temperature": cfg.get("temperature"), **cfg.get("trained", {})}

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        conf = {**self.config(), **(request or {})}
        torch.set_num_threads(int(conf["threads"]))
        ls = get_label_set(self.label_set)
        seqs = list(conf["sequences"])
        recs = [Record(it.study_id, it.image, it.label, str(it.tumor_class), [int(v) for v in it.roi])
                for it in cohort_items(datastore) if it.tumor_class and it.roi and ls.accepts(str(it.tumor_class))]
        logger.info(f"training {self.name} on {len(recs)} studies with tumor_class + roi: {conf}")
        if len(recs) < 10:
            raise ValueError(f"{self.name}: need >= 10 studies with tumor_class ({ls.name}) and roi, have {len(recs)}")
        t0 = time.time()
        cs = cropset_from_records(recs, size=48, cache_dir=None, name=self.name)
        model, cfg = train_task_model(cs, ls.name, seqs, conf["fusion"], int(conf["epochs1"]), int(conf["epochs2"]),
                                      int(conf["seed"]), float(conf["val_frac"]), desc=self.name,
                                      required=list(conf["required"]), spacing=cohort_spacing(r.image for r in recs),
                                      branch_dropout=float(conf["branch_dropout"]))
        cfg["task"] = self.name
        cfg["trained"]["source"] = "datastore"
        cfg["trained"]["seconds_total"] = round(time.time() - t0, 1)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        save_checkpoint(self.path, model, cfg)
        with open(os.path.splitext(self.path)[0] + ".json", "w") as f:
            json.dump(cfg, f, indent=1)
        logger.info(f"{self.name}: saved {self.path}: {cfg['trained']}")
        return cfg["trained"]
