"""Train task for the segmentation models: runs in MONAI Label's training subprocess."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from parotid.cohort import cohort_items
from parotid.segmentation.networks import SegModelSpec
from parotid.segmentation.train import train

logger = logging.getLogger(__name__)


class TrainSegmentation(TrainTask):
    """Fine-tunes from the current checkpoint on the datastore's final labels; the new checkpoint
    replaces the old one atomically, so running inference hot-reloads it."""

    def __init__(self, spec: SegModelSpec, path: str, iterations: int = 300):
        super().__init__(f"Train {spec.name} on submitted gland/tumour labels")
        self.spec, self.path, self.iterations = spec, path, iterations

    def config(self) -> Dict[str, Any]:
        return {"iterations": self.iterations, "batch_size": 4, "seed": 0, "from_scratch": False}

    def stats(self) -> Dict[str, Any]:
        stats_path = os.path.splitext(self.path)[0] + ".json"
        if not os.path.exists(stats_path):
            return {}
        with open(stats_path) as f:
            return json.load(f)

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        items = cohort_items(datastore)
        conf = {**self.config(), **(request or {})}
        logger.info(f"training {self.spec.name} on {len(items)} labelled studies: {conf}")
        stats = train(
            self.spec, items, self.path, iterations=int(conf["iterations"]), batch_size=int(conf["batch_size"]),
            seed=int(conf["seed"]), init_from=None if conf.get("from_scratch") else self.path,
        )
        logger.info(f"training finished: {stats}")
        return stats
