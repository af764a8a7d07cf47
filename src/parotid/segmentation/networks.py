"""Network definitions (MONAI building blocks) and the model specs the app and trainers share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from monai.networks.nets import UNet

from parotid.labels import SEGMENTATION_LABELS, TUMOR
from parotid.sequences import DEFAULT_KEYS
from parotid.subsets import MINIMUM_SEQUENCES


@dataclass(frozen=True)
class UNetShape:
    """The architecture of a MONAI UNet beyond its in/out channels: recorded in every checkpoint written
    since 2026-12-03 (key ``network``), so a file rebuilds the network it was trained with; a file without
    the key is HALF_RES, the only architecture before."""

    channels: tuple[int, ...]
    strides: tuple
    res_units: int = 0

    def as_dict(self) -> dict:
        return {"channels": list(self.channels), "res_units": self.res_units,
                "strides": [list(s) if isinstance(s, (tuple, list)) else int(s) for s in self.strides]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetShape":
        """Raises ValueError for a record that is malformed or asks for an implausibly large network (an
        uploaded file must not make the server allocate gigabytes before its weights are even checked)."""
        try:
            strides = tuple(tuple(int(v) for v in s) if isinstance(s, (tuple, list)) else int(s) for s in d["strides"])
            shape = cls(tuple(int(c) for c in d["channels"]), strides, int(d.get("res_units", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint entry 'network' is malformed: {e}") from None
        flat = [v for s in strides for v in (s if isinstance(s, tuple) else (s,))]
        if not (2 <= len(shape.channels) <= 6 and all(1 <= c <= 256 for c in shape.channels)
                and len(strides) == len(shape.channels) - 1 and all(1 <= v <= 4 for v in flat)
                and all(isinstance(s, int) or len(s) == 3 for s in strides) and 0 <= shape.res_units <= 4):
            raise ValueError(f"checkpoint entry 'network' is outside what this app builds: {dict(d)}")
        return shape


# small on purpose: trained and run on a 2-core CPU (see docs/model-card-segmentation.md).
# HALF_RES: the first layer halves every axis (slices 3 mm -> 6 mm) and the output is upsampled from there.
HALF_RES = UNetShape((8, 16, 32, 64), (2, 2, (2, 2, 1)))
# FULL_RES: same weights' shapes (a HALF_RES checkpoint initialises it), but the first stage keeps the full
# grid and the second halves in-plane only (voxels ~1 x 1 x 3 mm): full-resolution features reach the
# output layer (80 % of the tumour errors of HALF_RES lie within 1.5 voxels in-plane of the true boundary,
# docs/model-card-segmentation.md); 5.6x the time per training iteration (measured).
FULL_RES = UNetShape((8, 16, 32, 64), (1, (2, 2, 1), 2))
SHAPES = {"half-res": HALF_RES, "full-res": FULL_RES}
NETWORK_KEY = "network"


def network_shape(entries: Mapping[str, Any] | None) -> UNetShape:
    """The architecture a checkpoint (or one part of it) records; HALF_RES when it records none."""
    d = (entries or {}).get(NETWORK_KEY)
    return UNetShape.from_dict(d) if isinstance(d, Mapping) else HALF_RES


def shape_name(shape: UNetShape) -> str:
    return next((n for n, s in SHAPES.items() if s == shape), "custom")


@dataclass(frozen=True)
class SegModelSpec:
    name: str
    sequences: tuple[str, ...]  # input channels, in this order
    required: tuple[str, ...]  # a study without one of these is refused; others missing -> zero channel
    box_prompted: bool
    # whole-study model: sliding-window patch; box model: fixed crop size the box region is resized to
    patch: tuple[int, int, int]
    # the architecture of a network trained from scratch (a checkpoint records its own: network_shape)
    shape: UNetShape = HALF_RES
    labels: dict = field(default_factory=lambda: dict(SEGMENTATION_LABELS))

    @property
    def in_channels(self) -> int:
        return len(self.sequences) + (1 if self.box_prompted else 0)

    @property
    def out_channels(self) -> int:
        return 2 if self.box_prompted else 3


ALL = DEFAULT_KEYS  # every sequence, in the sequence table's order (the input channels' order)
# required: the clinical minimum (parotid.subsets.MINIMUM_SEQUENCES); every other input may be missing
# whole-study model: `shape` HALF_RES is what a file without a `network` record is (every file before issue 12
# item 7); the served file records FULL_RES for complete studies, and retraining keeps each part's record
SEGMENTATION = SegModelSpec("segmentation", ALL, MINIMUM_SEQUENCES, box_prompted=False, patch=(64, 64, 16))
CONTOUR_BOX = SegModelSpec(
    "contour_box", ALL, MINIMUM_SEQUENCES, box_prompted=True, patch=(48, 48, 16),
    labels={"background": SEGMENTATION_LABELS["background"], "tumor": TUMOR},
)
SPECS = {s.name: s for s in (SEGMENTATION, CONTOUR_BOX)}


def build_network(spec: SegModelSpec, shape: UNetShape | None = None) -> torch.nn.Module:
    shape = shape or spec.shape
    return UNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=shape.channels,
        strides=shape.strides,
        num_res_units=shape.res_units,
        norm="instance",
    )
