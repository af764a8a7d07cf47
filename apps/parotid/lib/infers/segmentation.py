"""Gland + tumour segmentation of a whole study, and box-prompted tumour contouring."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.study_task import StudyInferTask
from parotid import input_check
from parotid.labels import INFO_ROI
from parotid.segmentation.inference import contour_study, segment_study, tumour_roi
from parotid.segmentation.networks import SegModelSpec
from parotid.segmentation.subset_models import COMPLETE, cached_segmenter
from parotid.study import Study, StudyError


def _summary(label: np.ndarray, study: Study) -> Dict[str, Any]:
    spacing = study.image.GetSpacing()
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {
        "volumes_ml": {name: round(float((label == v).sum()) * voxel_ml, 2) for name, v in (("parotid_gland", 1), ("tumor", 2))},
        "tumor_roi": tumour_roi(label),  # the largest tumour (index tumour): a box for classify/contour_box
    }


class SegmentStudy(StudyInferTask):
    def __init__(self, spec: SegModelSpec, path: str, network, version: str = ""):
        super().__init__(path, network, InferType.SEGMENTATION, spec.labels,
                         "Parotid gland + tumour segmentation on multi-sequence MRI (whole study)", spec.sequences,
                         required=spec.required)
        self.spec, self.version, self.task_name = spec, version, spec.name

    def predict(self, network, study: Study, data: Dict[str, Any]):
        self.require_sequences(study)
        # the file's weights for this study's sequences (complete / incomplete, parotid.segmentation.subset_models);
        # the complete part is the network BasicInferTask loaded and hot-reloads
        part, routed = cached_segmenter(self.get_path(), self.spec).network(study.sequences)
        label, space = segment_study(network if part == COMPLETE else routed, self.spec, study, self.model_spacing())
        comps, _ = input_check.study_components(study, self.model_dir, label=label)
        return label, {"model": self.spec.name, "weights": part, **_summary(label, study), **space.params,
                       **self.sequence_report(study), "input_check": input_check.combine(comps)}


class ContourInBox(StudyInferTask):
    def __init__(self, spec: SegModelSpec, path: str, network, version: str = ""):
        super().__init__(path, network, InferType.SEGMENTATION, spec.labels,
                         "Box-prompted tumour contouring: params.roi = [i0, i1, j0, j1, k0, k1] (half-open, reference grid)",
                         spec.sequences, config={INFO_ROI: []}, required=spec.required)
        self.spec, self.version, self.task_name = spec, version, spec.name

    def predict(self, network, study: Study, data: Dict[str, Any]):
        self.require_sequences(study)
        roi = data.get(INFO_ROI)
        if roi is None or roi == []:
            raise StudyError("this model needs a box: params.roi = [i0, i1, j0, j1, k0, k1]")
        comps = input_check.box_components(study, roi, self.model_dir)  # 422 for a too small box
        box = comps.pop("tumour_in_box", None)
        label, space = np.zeros(study.shape, np.uint8), None
        if box is None or box["tumor_found"]:
            label, space = contour_study(network, self.spec, study, roi, self.model_spacing())
        found = bool((label == 2).any())
        space_params = space.params if space else {"model_spacing": self.model_spacing(), "resampled": False}
        return label, {"model": self.spec.name, INFO_ROI: [int(v) for v in roi], **_summary(label, study),
                       **space_params, "tumor_found": found, "message": None if found else input_check.NO_TUMOUR,
                       "tumour_in_box": box, **self.sequence_report(study), "input_check": input_check.combine(comps)}
