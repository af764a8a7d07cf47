"""Train task for the segmentation models: runs in MONAI Label's training subprocess.

Fine-tunes from the served checkpoint on the datastore's final labels outside the fixed held-out part
(``parotid.cohort.split_holdout``; a file with complete- and incomplete-study weights,
parotid.segmentation.subset_models: both parts, each from its own weights), writes a candidate version into the model registry, and the
promotion gate compares it with the served checkpoint by mean tumour Dice on the held-out studies
(parotid.registry). Promoted, it replaces the served checkpoint atomically (hot reload by mtime).
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from monailabel.interfaces.datastore import Datastore

from lib.trainers.gated import GatedTrainTask
from parotid.cohort import cohort_items, split_holdout
from parotid.holdout_scores import segmentation_scores
from parotid.segmentation.networks import SegModelSpec
from parotid.segmentation.subset_models import COMPLETE, INCOMPLETE
from parotid.segmentation.train import recorded_shapes, train, train_subset_models

logger = logging.getLogger(__name__)


class TrainSegmentation(GatedTrainTask):
    gate_kind = "segmentation"

    def __init__(self, spec: SegModelSpec, path: str, iterations: int = 300):
        super().__init__(f"Train {spec.name} on submitted gland/tumour labels", spec.name, path)
        self.spec, self.iterations = spec, iterations

    def config(self) -> Dict[str, Any]:
        return {"iterations": self.iterations, "batch_size": 4, "seed": 0, "from_scratch": False, "force": False}

    def sidecar(self, path: str) -> dict:
        return dict(torch.load(path, map_location="cpu", weights_only=True).get("stats") or {})

    def describe(self, path: str) -> dict:
        stats = self.sidecar(path)
        if "version" in stats:  # the training's time stamp; `version` is the registry's number
            stats["run_id"] = stats.pop("version")
        return stats

    def stats(self) -> Dict[str, Any]:
        served = self.served_description()
        return {**(served or {}), **self.registry_stats()} if served is not None else {}

    def __call__(self, request: Dict[str, Any], datastore: Datastore):
        conf = {**self.config(), **(request or {})}
        train_items, holdout_items = split_holdout(cohort_items(datastore))
        logger.info(f"training {self.spec.name} on {len(train_items)} labelled studies "
                    f"({len(holdout_items)} held out for the promotion gate): {conf}")
        init_from = None if conf.get("from_scratch") else self.path

        args = dict(iterations=int(conf["iterations"]), batch_size=int(conf["batch_size"]), seed=int(conf["seed"]))

        shapes = recorded_shapes(self.path)  # each served part's architecture, kept from scratch too

        def train_candidate(path: str) -> dict:
            if INCOMPLETE in shapes:  # complete- and incomplete-study weights: both retrained
                return train_subset_models(self.spec, train_items, path, init_from=init_from, shapes=shapes, **args)
            return train(self.spec, train_items, path, init_from=init_from, shape=shapes.get(COMPLETE), **args)

        return self.run_gated(conf, train_items, holdout_items, train_candidate,
                              lambda path: segmentation_scores(path, self.spec, holdout_items), config=conf)
