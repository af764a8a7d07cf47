"""Tumour classification infer task (MONAI Label type ``classification``) with a heatmap.

Request: ``{"model": "classify_subtype", "image": <study id>, "params": {"roi": [i0, i1, j0, j1, k0, k1]}}``
(half-open voxel box on the study's reference grid). Without ``roi`` the box of the served segmentation
task's tumour is used (422 if there is none): a pipeline segmentation -> box -> classification.

Response ``params`` (JSON): ``prediction`` [{idx, label, score}] (calibrated, sums to 1),
``predicted_class``, ``malignancy_probability``, ``undetermined`` (MC dropout), ``uncertainty``,
``model``, ``version`` (the served checkpoint's registry version), ``roi``, ``roi_source``, ``label_set``, ``model_spacing`` / ``resampled`` (and
``model_roi`` when resampled; parotid.model_space), ``sequences_used`` / ``sequences_missing`` /
``expected_performance`` (parotid.subsets). Response image: heatmap volume
(float32 0..1, NIfTI, the study's reference grid), normalised jointly over all slices: by default our
hybrid map Grad-CAM x RoI-Align read-out weight, plain Grad-CAM with ``params.heatmap = "gradcam"``
(``parotid.classification.predict.HEATMAP_METHODS``).

MONAI Label's BasicInferTask returns JSON only for classification tasks and runs the inferer under
``torch.no_grad``: this task overrides both (``run_inferer`` / ``writer`` of StudyInferTask) while
``/info`` keeps ``type = "classification"``.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from typing import Any, Dict

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.segmentation import SegmentStudy, UsesSegmentation
from lib.infers.study_task import StudyInferTask
from parotid import input_check, subsets
from parotid.classification.checkpoint import load_checkpoint, read_config
from parotid.classification.defaults import DEFAULT_SEQS
from parotid.classification.predict import HEATMAP_METHODS, classify
from parotid.labels import INFO_ROI, classification_label_sets, get_label_set
from parotid.pacs.sr_policy import write_back_step
from parotid.segmentation.inference import tumour_roi
from parotid.study import Study, StudyError

logger = logging.getLogger(__name__)
# request keys the app sets (never taken from the client): the datastore's id of the study (``image`` is
# its resolved file) and whether the caller may write to the PACS (read on the request's thread)
STUDY_ID, MAY_WRITE = "study_id", "caller_may_write"


def tumour_roi_from_segmentation(study: Study, segmentation: SegmentStudy) -> list[int]:
    """Box of the tumour found by the served whole-study segmentation task (its current checkpoint)."""
    if segmentation.segmenter.identity() is None:
        raise StudyError("no roi given and no segmentation model is available to find the tumour; "
                         "pass params.roi = [i0, i1, j0, j1, k0, k1]")
    label = segmentation.segmenter.label_of(study)  # cached: the input check reuses it
    roi = tumour_roi(label)  # largest tumour component: the index tumour
    if roi is None:
        raise StudyError("no roi given and the segmentation model found no tumour in this study; "
                         "pass params.roi = [i0, i1, j0, j1, k0, k1]")
    return roi


class ClassifyStudy(UsesSegmentation, StudyInferTask):
    """A pipeline: the served segmentation task (automatic box, input check) -> box -> classification ->
    PACS write-back (on a PACS datastore)."""

    result_store: Any = None  # the app's datastore (ParotidApp.init_infers)

    classification = True
    # requests run concurrently: the network work of concurrent requests is micro-batched (and so
    # serialised) by parotid.classification.batched; study reading and checks run in parallel
    concurrent_requests = True

    def __init__(self, name: str, path: str, label_set: str, description: str = ""):
        ls = get_label_set(label_set)
        self.name, self.task_name, self.label_set = name, name, ls
        seqs = DEFAULT_SEQS
        cfg = self._peek(path)
        if cfg:
            seqs = tuple(cfg["sequences"])
        super().__init__(
            path, None, InferType.CLASSIFICATION, {c: i for i, c in enumerate(ls.classes)},
            description or f"Tumour classification ({ls.name}: {', '.join(ls.classes)}) in a box; "
                           "returns calibrated probabilities + a heatmap (Grad-CAM x RoI-Align read-out weight; "
                           "plain Grad-CAM on request)",
            DEFAULT_SEQS, config={INFO_ROI: [], "label_set": ls.name},  # inputs before a checkpoint exists
        )
        self._load_lock = threading.Lock()  # concurrent first requests load the checkpoint once

    _peek_cache: Dict[str, Any] = {}

    @classmethod
    def _peek(cls, path):
        """The checkpoint's config (cached by mtime), or None."""
        try:
            if not os.path.exists(path):
                return None
            mtime = os.path.getmtime(path)
            hit = cls._peek_cache.get(path)
            if not hit or hit[0] != mtime:
                hit = cls._peek_cache[path] = (mtime, read_config(path))
            return hit[1]
        except Exception:  # a half-written or foreign file: the infer task reports it on use
            return None

    @property
    def sequences(self) -> tuple[str, ...]:
        """The served checkpoint's inputs (read live: a retrained or uploaded checkpoint may change them)."""
        cfg = self._peek(self.get_path() or "")
        return tuple(cfg["sequences"]) if cfg else self._sequences

    def info(self) -> Dict[str, Any]:
        cfg = self._peek(self.path[0] if isinstance(self.path, list) else self.path) or {}
        return {**super().info(), "label_set": self.label_set.to_dict(),
                "trained": cfg.get("trained"), "temperature": cfg.get("temperature"),
                "fusion": cfg.get("fusion"),
                "heatmap": {"default": "gradcam_x_readout", "methods": HEATMAP_METHODS,
                            "param": "params.heatmap", "late_fusion": "per branch, combined by the branches' shares of the class score",
                            "image": "float32 0..1 on the reference grid, jointly normalised"},
                "uncertainty": cfg.get("uncertainty"), "trained_with_required": cfg.get("required")}

    def check_checkpoint(self, path: str) -> None:
        """Raise StudyError unless `path` is a classifier checkpoint for this task's label set."""
        try:
            cfg = load_checkpoint(path)[1]
        except pickle.UnpicklingError:
            raise StudyError("not a PyTorch weights file (files with pickled code are refused)") from None
        except Exception as e:
            raise StudyError(f"not a classifier checkpoint: {type(e).__name__}: {str(e)[:300]}") from None
        if list(cfg.get("classes", [])) != list(self.label_set.classes):
            raise StudyError(f"checkpoint classes {cfg.get('classes')} differ from this model's label set "
                             f"{list(self.label_set.classes)}")

    def __call__(self, request, callbacks=None):
        request["save_label"] = False  # the result image is a heatmap, never a label
        return super().__call__(request, callbacks)

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        """Heatmap + result JSON; on a PACS datastore (``result_store``) the result is then stored as a DICOM
        SR (parotid.pacs.sr_policy.write_back_step) and ``pacs_sr`` says what happened."""
        path, result = super().writer(data, extension, dtype)
        store, study_id = self.result_store, data.get(STUDY_ID)
        if study_id and hasattr(store, "write_classification"):
            write_back_step(store, study_id, data["image"], result, data.get("write_sr"), bool(data.get(MAY_WRITE)))
        return path, result

    def _get_network(self, device, data):
        """Checkpoint (model, config), reloaded when the file's mtime changes (hot reload after /train)."""
        path = self.get_path()
        if not path or not os.path.exists(path):
            raise HTTPException(409, f"model {self.name} is not trained yet (no checkpoint); run /train/{self.name}")
        mtime = os.stat(path).st_mtime
        with self._load_lock:
            cached = self._networks.get(device)
            if cached and cached[1] == mtime:
                return cached[0]
            if cached:
                logger.info(f"{self.name}: checkpoint changed, reloading")
            net = load_checkpoint(path)
            self._networks[device] = (net, mtime)
            return net

    def predict(self, network, study: Study, data: Dict[str, Any]):
        model, cfg = network
        # served for any study with the clinical minimum (parotid.subsets): other inputs -> zero channels
        model_seqs = tuple(cfg["sequences"])
        required = subsets.minimum_for(model_seqs)
        self.require_sequences(study, required)
        cfg = {**cfg, "task": self.name, "required": list(required)}
        req_set = data.get("label_set")
        if req_set and req_set != cfg["label_set"]:
            if req_set not in classification_label_sets():
                raise StudyError(f"unknown label set '{req_set}'; known: {sorted(classification_label_sets())}")
            raise StudyError(f"model {self.name} predicts label set '{cfg['label_set']}', not '{req_set}'")
        roi = data.get(INFO_ROI)
        source = "request"
        if roi is None or roi == [] or roi == "":
            roi, source = tumour_roi_from_segmentation(study, self.segmentation), "segmentation"
        elif isinstance(roi, str):
            try:
                roi = [int(float(v)) for v in roi.replace("[", "").replace("]", "").split(",")]
            except ValueError:
                raise StudyError(f"roi must be a list of 6 voxel indices, got {roi!r}") from None
        comps = input_check.box_components(study, roi, self.model_dir,  # 422: bad or tiny box
                                           self.segmentation.segmenter)
        input_check.require_site_evidence(comps, self.name, self.get_path(), self.model_dir)
        result, heat = classify(model, cfg, study, roi, heatmap=not data.get("no_heatmap", False),
                                heatmap_mode=str(data.get("heatmap", "gradcam_x_readout")), input_components=comps,
                                batched=True)
        result["roi_source"] = source
        report = subsets.sequence_report(self.name, model_seqs, study, self.model_dir, self.get_path())
        result.update(report)
        subsets.mark_subset(result, report["sequences_missing"], report["expected_performance"])
        return heat, result
