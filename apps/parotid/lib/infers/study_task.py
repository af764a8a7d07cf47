"""Base for inference over a multi-sequence study (BasicInferTask with study loading and NIfTI output).

MONAI Label's stock pipeline (LoadImaged, orientation, inverse transforms, Writer) assumes one
image = one volume. A study is a vector image on its reference grid, so this base reads it with
`parotid.study.read_study`, hands the model a normalised (C, I, J, K) array and writes results
with the reference grid's exact geometry. Checkpoint loading and hot reload stay BasicInferTask's.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import tempfile
from typing import Any, Callable, Dict, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import file_checksum

from lib.errors import http_errors
from parotid import subsets
from parotid.model_space import checkpoint_spacing
from parotid.registry import ModelRegistry
from parotid.segmentation.subset_models import check_parts
from parotid.study import Study, StudyError, copy_geometry
from parotid.study_cache import read_study_cached

logger = logging.getLogger(__name__)


class LoadStudyd:
    """Pre-transform: read the study file named by data['image'] into data['study'] (a parsed study is
    reused while its file is unchanged: parotid.study_cache)."""

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        with http_errors():
            data["study"] = read_study_cached(data["image"], name=os.path.basename(str(data["image"])))
        return data


def write_volume(array: np.ndarray, study: Study, suffix: str = ".nii.gz") -> str:
    """Write an (I, J, K) array with the study's reference geometry to a temp file (caller removes it)."""
    img = copy_geometry(sitk.GetImageFromArray(np.ascontiguousarray(array.T)), study.reference)
    path = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
    sitk.WriteImage(img, path, useCompression=True)
    return path


class StudyInferTask(BasicInferTask):
    """Subclasses implement `predict(network, study, data) -> (array (I,J,K) | None, result_json)`.

    `sequences`: the model's inputs; `required`: what a study must have (default: the clinical minimum of
    parotid.subsets, T2), the other inputs may be missing (zero channels)."""

    task_name = ""  # the model's name in /info (checkpoint <task_name>.pt, table <task_name>.subsets.json)
    classification = False

    def __init__(self, path: str, network, type: str | InferType, labels, description: str,
                 sequences: Sequence[str], config: Dict[str, Any] | None = None,
                 required: Sequence[str] | None = None, **kwargs):
        super().__init__(path=path, network=network, type=type, labels=labels, dimension=3,
                         description=description, config=config, **kwargs)
        self.sequences = tuple(sequences)
        self.required = tuple(required if required is not None else subsets.minimum_for(self.sequences))

    def info(self) -> Dict[str, Any]:
        # sequences: what the model uses; required_sequences: a study lacking one of these gets a 422;
        # minimum_sequences / subsets: what it serves, with the performance validated per subset
        return {**super().info(), "sequences": list(self.sequences), "required_sequences": list(self.required),
                **subsets.served_subsets(self.task_name, self.sequences, self.model_dir, self.get_path(),
                                         classification=self.classification),
                "version": self.served_version()}

    def require_sequences(self, study: Study, required: Sequence[str] | None = None) -> None:
        """422 naming what is missing when the study lacks a required sequence (default: self.required)."""
        required = self.required if required is None else tuple(required)
        missing = [s for s in required if s not in study.sequences]
        if missing:
            raise StudyError(f"study lacks sequence(s) {missing} needed by model {self.task_name} "
                             f"(has {list(study.sequences)}; minimum: {list(required)}, the others may be missing)")

    def sequence_report(self, study: Study) -> Dict[str, Any]:
        """``sequences_used``, ``sequences_missing``, ``expected_performance`` (parotid.subsets)."""
        return subsets.sequence_report(self.task_name, self.sequences, study, self.model_dir, self.get_path())

    def served_version(self) -> int | None:
        """The served checkpoint's version in the model registry (parotid.registry), None if unregistered."""
        path = self.path[0] if isinstance(self.path, (list, tuple)) else self.path
        if not path:
            return None
        return ModelRegistry(os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]).served_version()

    @property
    def model_dir(self) -> str:
        """The app's model folder (checkpoints and the input check's input_check.json)."""
        return os.path.dirname(self.path[0]) if self.path else ""

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [LoadStudyd()]

    def inferer(self, data=None):
        return None

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def _get_network(self, device, data):
        # BasicInferTask silently serves the untrained network when the checkpoint file is missing
        # (e.g. after DELETE /model/{name}); here that is a clear 409 instead.
        if not self.get_path():
            name = getattr(getattr(self, "spec", None), "name", None) or getattr(self, "name", type(self).__name__)
            raise HTTPException(409, f"model {name} has no checkpoint; "
                                     "run /train or upload one with PUT /model/{name}")
        return super()._get_network(device, data)

    def check_checkpoint(self, path: str) -> None:
        """Raise StudyError unless `path` loads (weights only) into this task's network, strictly."""
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            state = ck.get(self.model_state_dict, ck) if isinstance(ck, dict) else None
            if not isinstance(state, dict):
                raise ValueError("no state dict in the file")
            copy.deepcopy(self.network).load_state_dict(state, strict=True)
            check_parts(ck, self.network)  # a segmentation file's incomplete-study weights too
        except pickle.UnpicklingError:
            raise StudyError("not a PyTorch weights file (files with pickled code are refused)") from None
        except Exception as e:
            raise StudyError(f"not a checkpoint for this model: {type(e).__name__}: {str(e)[:300]}") from None

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cpu"):
        checkpoint = self.checkpoint_identity()  # read before loading: a swap in between is reloaded next time
        version = self.served_version()
        network = self._get_network(device, data)
        with http_errors():
            array, result = self.predict(network, data["study"], data)
        data["result_array"] = array
        # version: the registry's number of the served checkpoint (also in the PACS SR's model version)
        data["result_json"] = {**result, "version": version, "checkpoint": checkpoint}
        return data

    _identities: Dict[tuple, Dict[str, Any]] = {}

    def checkpoint_identity(self) -> Dict[str, Any] | None:
        """The served checkpoint as GET /model/info/{name} reports it (checksum, modified_time), so a
        result can be traced to the exact weights that produced it. Cached per file time stamp."""
        path = self.get_path()
        if not path:
            return None
        key = (path, os.stat(path).st_mtime)
        if key not in self._identities:
            self._identities[key] = {"checksum": file_checksum(path), "modified_time": int(key[1])}
        return self._identities[key]

    _spacings: Dict[tuple, Any] = {}

    def model_spacing(self):
        """The served checkpoint's training spacing (parotid.model_space), None if it records none."""
        path = self.get_path()
        if not path:
            return None
        key = (path, os.stat(path).st_mtime)
        if key not in self._spacings:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            self._spacings[key] = checkpoint_spacing(ck if isinstance(ck, dict) else None)
        return self._spacings[key]

    def predict(self, network, study: Study, data: Dict[str, Any]):
        raise NotImplementedError

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        array = data.get("result_array")
        path = write_volume(array, data["study"]) if array is not None else None
        return path, dict(data.get("result_json") or {})
