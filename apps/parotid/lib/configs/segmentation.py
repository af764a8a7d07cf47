"""Config for the segmentation models (whole study, box prompted)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.segmentation import ContourInBox, SegmentStudy
from lib.trainers.segmentation import TrainSegmentation
from parotid.segmentation.networks import SPECS, build_network

logger = logging.getLogger(__name__)


class _SegConfig(TaskConfig):
    model_name = ""
    infer_class: Any = None

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.spec = SPECS[self.model_name]
        self.path = os.path.join(model_dir, f"{self.spec.name}.pt")
        self.network = build_network(self.spec)

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        return {self.spec.name: self.infer_class(self.spec, self.path, self.network)}

    def trainer(self) -> Optional[TrainTask]:
        return TrainSegmentation(self.spec, self.path)


class Segmentation(_SegConfig):
    model_name = "segmentation"
    infer_class = SegmentStudy


class ContourBox(_SegConfig):
    model_name = "contour_box"
    infer_class = ContourInBox
