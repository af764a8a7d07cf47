"""Segmentation checkpoints, read in one place: the served tasks, the classifiers' automatic box and input
check (through the served segmentation task), the active-learning scorer, the promotion gate and the
evaluations all load them with :func:`load_segmentation`.

A checkpoint (``segmentation/train.py`` writes it) is plain data: ``model`` (the UNet's state dict),
``spec``, ``network`` (the UNet's architecture, parotid.segmentation.networks.UNetShape), ``sequences``,
``required``, ``optional``, ``stats`` and the training ``spacing``, and optionally
weights for incomplete studies (``subset_models``, parotid.segmentation.subset_models: the study's sequences
choose the weights, :meth:`SegCheckpoint.network_for`). Older checkpoints are a bare state dict or lack
``spec`` / ``network`` / ``required`` / ``spacing`` (no ``network``: the HALF_RES architecture).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np
import torch

from parotid.model_space import checkpoint_spacing
from parotid.segmentation.networks import SEGMENTATION, SPECS, SegModelSpec, build_network, network_shape
from parotid.segmentation.subset_models import COMPLETE, part_entries, part_for, part_state, parts
from parotid.study import Study, StudyError
from parotid.study_cache import SingleFlight, study_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegCheckpoint:
    """A loaded checkpoint: the network (eval mode, CPU), its spec and training spacing, and the file's
    other entries (``meta``). ``identity`` names the file version it was read from."""

    net: torch.nn.Module
    spec: SegModelSpec
    spacing: tuple[float, float, float] | None
    meta: dict[str, Any] = field(default_factory=dict)
    identity: Hashable = None
    subset_nets: dict[str, torch.nn.Module] = field(default_factory=dict)

    def network_for(self, sequences) -> tuple[str, torch.nn.Module]:
        """(part, network) serving a study with `sequences`: the incomplete-study weights when the study lacks
        one of the model's inputs and the file has them, else the complete-study network ``net``."""
        part = part_for(self.meta, self.spec, sequences)
        return part, (self.net if part == COMPLETE else self.subset_nets[part])


def load_segmentation(path: str, spec: SegModelSpec | None = None) -> SegCheckpoint:
    """Load `path` (weights only: no pickled code) into a network of `spec` (default: the spec the
    checkpoint names, else the whole-study model's), strictly."""
    st = os.stat(path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    entries = ck if isinstance(ck, dict) else {}
    state = entries.get("model", ck)
    if not isinstance(state, dict):
        raise ValueError("no state dict in the file")
    spec = spec or SPECS[str(entries.get("spec", SEGMENTATION.name))]
    net = build_network(spec, network_shape(entries))
    net.load_state_dict(state, strict=True)
    net.eval()
    subset_nets = {}
    for part in parts(entries)[1:]:  # incomplete-study weights: each loads strictly, at the file's spacing
        subset_nets[part] = build_network(spec, network_shape(part_entries(entries, part)))
        subset_nets[part].load_state_dict(part_state(entries, part), strict=True)
        subset_nets[part].eval()
    return SegCheckpoint(net, spec, checkpoint_spacing(entries or None),
                         {k: v for k, v in entries.items() if k != "model"}, (path, st.st_mtime_ns), subset_nets)


class HotCheckpoint:
    """The checkpoint file at `path` as it is now: reloaded when the file changes (training, ``PUT /model``
    and registry rollbacks replace it atomically), None while there is none."""

    def __init__(self, path: str, spec: SegModelSpec):
        self.path, self.spec = path, spec
        self._loaded: SegCheckpoint | None = None
        self._lock = threading.Lock()

    def get(self) -> SegCheckpoint | None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return None
        with self._lock:
            if self._loaded is None or self._loaded.identity != (self.path, mtime):
                self._loaded = load_segmentation(self.path, self.spec)
                logger.info(f"loaded {self.spec.name} checkpoint {self.path} (mtime_ns {mtime})")
            return self._loaded


class StudySegmenter:
    """The whole-study segmentation model's label map of a study, from the checkpoint at `path` (hot
    reloaded), cached per study content and checkpoint version (the input check, the automatic box and a
    following ``/infer/segmentation`` of the same study share one run). The served segmentation task owns
    one; the tasks that need a segmentation compose that task (docs/architecture.md)."""

    MAX_CACHED = 16

    def __init__(self, path: str, spec: SegModelSpec = SEGMENTATION):
        self.checkpoint = HotCheckpoint(path, spec)
        self._labels: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
        self._lock = threading.Lock()
        self._flights = SingleFlight()  # concurrent first requests for one study segment it once

    def identity(self) -> Hashable | None:
        """The checkpoint version served now (None: no checkpoint)."""
        try:
            return (self.checkpoint.path, os.stat(self.checkpoint.path).st_mtime_ns)
        except FileNotFoundError:
            return None

    def require(self) -> SegCheckpoint:
        ck = self.checkpoint.get()
        if ck is None:
            raise StudyError("no segmentation model is available for the input check and the tumour search "
                             "(train or upload the 'segmentation' model)")
        return ck

    def remember(self, ck: SegCheckpoint, study: Study, label: np.ndarray) -> None:
        with self._lock:
            self._labels[(ck.identity, study_key(study))] = label
            while len(self._labels) > self.MAX_CACHED:
                self._labels.popitem(last=False)

    def label_of(self, study: Study) -> np.ndarray:
        """Label map (I, J, K) on the study grid (the model runs at its training spacing, parotid.model_space)."""
        from parotid.segmentation.inference import segment_study

        ck = self.require()
        key = (ck.identity, study_key(study))
        with self._lock:
            if key in self._labels:
                self._labels.move_to_end(key)
                return self._labels[key]

        def run() -> np.ndarray:
            with self._lock:  # a call that finished between our miss and now left its label here
                if key in self._labels:
                    return self._labels[key]
            label, _ = segment_study(ck.network_for(study.sequences)[1], ck.spec, study, ck.spacing)
            self.remember(ck, study, label)
            return label

        return self._flights.run(key, run)
