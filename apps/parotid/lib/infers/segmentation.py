"""Gland + tumour segmentation of a whole study, and box-prompted tumour contouring.

The whole-study task (``SegmentStudy``) is also a stage of other tasks: the input check of every task
(anatomy, tumour in the box) and the classifiers' automatic box use the label map of the SERVED
segmentation task (``ParotidApp.init_infers`` composes them, as MONAI Label's radiology app composes
``InferVertebraPipeline``), so a retrained, uploaded or rolled-back segmentation checkpoint is what they
all use. Checkpoints are read by ``parotid.segmentation.checkpoint.load_segmentation``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.study_task import StudyInferTask
from parotid import input_check
from parotid.labels import GLAND, INFO_ROI, TUMOR
from parotid.segmentation.checkpoint import HotCheckpoint, SegCheckpoint, StudySegmenter, load_segmentation
from parotid.segmentation.inference import contour_study, segment_study, tumour_roi
from parotid.segmentation.networks import SEGMENTATION, SegModelSpec, build_network
from parotid.study import Study, StudyError


def _summary(label: np.ndarray, study: Study) -> Dict[str, Any]:
    spacing = study.image.GetSpacing()
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "volumes_ml": {name: round(float((label == v).sum()) * voxel_ml, 2) for name, v in (("parotid_gland", GLAND), ("tumor", TUMOR))},
        "tumor_roi": tumour_roi(label),  # the largest tumour (index tumour): a box for classify/contour_box
    }


class SegmentationTask(StudyInferTask):
    """A UNet task whose checkpoint is read by load_segmentation, hot reloaded on file change."""

    def __init__(self, spec: SegModelSpec, path: str, network, description: str, config=None,
                 checkpoint: HotCheckpoint | None = None):
        super().__init__(path, network, InferType.SEGMENTATION, spec.labels, description, spec.sequences,
                         config=config, required=spec.required)
        self.spec, self.task_name = spec, spec.name
        self.checkpoint = checkpoint or HotCheckpoint(path, spec)

    def _get_network(self, device, data) -> SegCheckpoint:
        # CPU-first models: the network runs where its input is (parotid.segmentation.inference)
        ck = self.checkpoint.get()
        if ck is None:  # BasicInferTask would serve the untrained network: a clear 409 instead
            raise HTTPException(409, f"model {self.spec.name} has no checkpoint; "
                                     "run /train or upload one with PUT /model/{name}")
        return ck

    def check_checkpoint(self, path: str) -> None:
        """Raise StudyError unless `path` loads (weights only) into this task's network, strictly."""
        try:
            load_segmentation(path, self.spec)
        except pickle.UnpicklingError:
            raise StudyError("not a PyTorch weights file (files with pickled code are refused)") from None
        except Exception as e:
            raise StudyError(f"not a checkpoint for this model: {type(e).__name__}: {str(e)[:300]}") from None


class SegmentStudy(SegmentationTask):
    def __init__(self, spec: SegModelSpec, path: str, network):
        self.segmenter = StudySegmenter(path, spec)
        super().__init__(spec, path, network, "Parotid gland + tumour segmentation on multi-sequence MRI (whole study)",
                         checkpoint=self.segmenter.checkpoint)

    def predict(self, network: SegCheckpoint, study: Study, data: Dict[str, Any]):
        self.require_sequences(study)
        # the file's weights for this study's sequences (complete / incomplete, parotid.segmentation.subset_models)
        part, net = network.network_for(study.sequences)
        label, space = segment_study(net, self.spec, study, network.spacing)
        self.segmenter.remember(network, study, label)  # the classifiers' box and input check reuse it
        comps, _ = input_check.study_components(study, self.model_dir, label=label, segmenter=self.segmenter)
        return label, {"model": self.spec.name, "weights": part, **_summary(label, study), **space.params,
                       **self.sequence_report(study), "input_check": input_check.combine(comps)}


class UsesSegmentation:
    """A task with the whole-study segmentation as a stage (input check, automatic box): the served
    SegmentStudy task once the app composed it (``use_segmentation``); without a served segmentation
    model (``--conf models`` without it), a private one over ``<model dir>/segmentation.pt``."""

    _segmentation: "SegmentStudy | None" = None

    def use_segmentation(self, task: "SegmentStudy") -> None:
        self._segmentation = task

    @property
    def segmentation(self) -> "SegmentStudy":
        if self._segmentation is None:
            self._segmentation = SegmentStudy(SEGMENTATION, os.path.join(self.model_dir, f"{SEGMENTATION.name}.pt"),
                                              build_network(SEGMENTATION))
        return self._segmentation


class ContourInBox(UsesSegmentation, SegmentationTask):
    def __init__(self, spec: SegModelSpec, path: str, network):
        super().__init__(spec, path, network,
                         "Box-prompted tumour contouring: params.roi = [i0, i1, j0, j1, k0, k1] (half-open, reference grid)",
                         config={INFO_ROI: []})

    def predict(self, network: SegCheckpoint, study: Study, data: Dict[str, Any]):
        self.require_sequences(study)
        roi = data.get(INFO_ROI)
        if roi is None or roi == []:
            raise StudyError("this model needs a box: params.roi = [i0, i1, j0, j1, k0, k1]")
        # 422 for a too small box; anatomy and tumour in the box from the served segmentation task
        comps = input_check.box_components(study, roi, self.model_dir, self.segmentation.segmenter)
        box = comps.pop("tumor_in_box", None)
        label, space = np.zeros(study.shape, np.uint8), None
        if box is None or box["tumor_found"]:
            label, space = contour_study(network.network_for(study.sequences)[1], self.spec, study, roi, network.spacing)
        found = bool((label == TUMOR).any())
        space_params = space.params if space else {"model_spacing": network.spacing, "resampled": False}
        return label, {"model": self.spec.name, INFO_ROI: [int(v) for v in roi], **_summary(label, study),
                       **space_params, "tumor_found": found, "message": None if found else input_check.NO_TUMOUR,
                       "tumor_in_box": box, **self.sequence_report(study), "input_check": input_check.combine(comps)}
