"""Configs for the classification models. Label sets are data (src/parotid/labelsets/*.json): a new
task is one line below naming a label set.

``classify_sinonasal`` (label set ``sinonasal3``, seed 004) ships WITHOUT a checkpoint: its trainer
is listed (``/info`` ``trainers`` + ``train_stats`` with ``trained: false``) and its infer task
appears in ``/info`` ``models`` only once ``/train/classify_sinonasal`` has produced
``model/classify_sinonasal.pt`` from studies labelled with that set.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.infers.classify import ClassifyStudy
from lib.trainers.classify import TrainClassify


class _ClassifyConfig(TaskConfig):
    model_name = ""
    label_set = ""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.path = os.path.join(model_dir, f"{self.model_name}.pt")

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        return {self.model_name: ClassifyStudy(self.model_name, self.path, self.label_set)}

    def trainer(self) -> Optional[TrainTask]:
        return {self.model_name: TrainClassify(self.model_name, self.path, self.label_set)}


class ClassifySubtype(_ClassifyConfig):
    model_name = "classify_subtype"
    label_set = "subtype4"


class ClassifyMalignancy(_ClassifyConfig):
    model_name = "classify_malignancy"
    label_set = "benign_malignant"


class ClassifySinonasal(_ClassifyConfig):
    model_name = "classify_sinonasal"
    label_set = "sinonasal3"
