"""Network definitions (MONAI building blocks) and the model specs the app and trainers share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from monai.networks.nets import UNet

from parotid.labels import SEGMENTATION_LABELS, TUMOR
from parotid.sequences import DEFAULT_KEYS
from parotid.subsets import MINIMUM_SEQUENCES


@dataclass(frozen=True)
class SegModelSpec:
    name: str
    sequences: tuple[str, ...]  # input channels, in this order
    required: tuple[str, ...]  # a study without one of these is refused; others missing -> zero channel
    box_prompted: bool
    # whole-study model: sliding-window patch; box model: fixed crop size the box region is resized to
    patch: tuple[int, int, int]
    # small on purpose: trained and run on a 2-core CPU (see docs/model-card-segmentation.md)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple = (2, 2, (2, 2, 1))
    res_units: int = 0
    labels: dict = field(default_factory=lambda: dict(SEGMENTATION_LABELS))

    @property
    def in_channels(self) -> int:
        return len(self.sequences) + (1 if self.box_prompted else 0)

    @property
    def out_channels(self) -> int:
        return 2 if self.box_prompted else 3


ALL = DEFAULT_KEYS  # every sequence, in the sequence table's order (the input channels' order)
# required: the clinical minimum (parotid.subsets.MINIMUM_SEQUENCES); every other input may be missing
SEGMENTATION = SegModelSpec("segmentation", ALL, MINIMUM_SEQUENCES, box_prompted=False, patch=(64, 64, 16))
CONTOUR_BOX = SegModelSpec(
    "contour_box", ALL, MINIMUM_SEQUENCES, box_prompted=True, patch=(48, 48, 16),
    labels={"background": SEGMENTATION_LABELS["background"], "tumor": TUMOR},
)
SPECS = {s.name: s for s in (SEGMENTATION, CONTOUR_BOX)}


def build_network(spec: SegModelSpec) -> torch.nn.Module:
    return UNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=spec.res_units,
        norm="instance",
    )
