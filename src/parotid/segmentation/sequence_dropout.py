"""Sequence dropout: train one network for every study that has a T2, whatever else it lacks (issue 15).

A study without a sequence gets a zero input channel (`parotid.segmentation.inference.study_input`).
During training `RandSequenceDropout` zeroes the channels of whole sequences at random, following the
ways real studies are incomplete: contrast withheld (no CE-T1), diffusion degraded or not transferred
(no DWI/ADC), or only the T2 left; the rest of the samples keep every sequence, so full-sequence
performance is trained as before. `MINIMUM` is never dropped: a study without it is refused.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

from parotid.subsets import MINIMUM_SEQUENCES, NAMED_SUBSETS

# the sequences a study must have (every other input sequence is optional) and the available-sequence
# subsets by the sequences they lack (None = "everything but MINIMUM"): defined once, in parotid.subsets
MINIMUM: tuple[str, ...] = MINIMUM_SEQUENCES
SUBSETS: dict[str, tuple[str, ...] | None] = NAMED_SUBSETS


def missing_in(subset: str, sequences: Sequence[str], minimum: Sequence[str] = MINIMUM) -> tuple[str, ...]:
    """The sequences of `sequences` a study of `subset` lacks."""
    drop = SUBSETS[subset]
    if drop is None:
        return tuple(s for s in sequences if s not in minimum)
    return tuple(s for s in sequences if s in drop)


def optional_sequences(sequences: Sequence[str], minimum: Sequence[str] = MINIMUM) -> list[str]:
    return [s for s in sequences if s not in minimum]


class RandSequenceDropout(RandomizableTransform):
    """Zero whole sequence channels of a (C, ...) input, as in a study lacking them.

    With probability `prob` one of the incomplete subsets (no CE-T1, no DWI/ADC, T2 only) or an
    independent 50 % drop of each optional sequence is chosen with equal odds; channels past
    len(sequences) (e.g. the box prompt) are never touched, nor the `minimum` sequences.
    """

    def __init__(self, sequences: Sequence[str], prob: float = 0.5, minimum: Sequence[str] = MINIMUM):
        RandomizableTransform.__init__(self, prob)
        self.sequences, self.minimum = tuple(sequences), tuple(minimum)
        self.optional = optional_sequences(self.sequences, self.minimum)
        self._drop: tuple[str, ...] = ()

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._drop = ()
        if not self._do_transform:
            return
        choices = [s for s in SUBSETS if s != "all"] + ["random"]
        pick = choices[self.R.randint(len(choices))]
        if pick == "random":
            self._drop = tuple(s for s in self.optional if self.R.rand() < 0.5)
        else:
            self._drop = missing_in(pick, self.sequences, self.minimum)

    def __call__(self, img: torch.Tensor | np.ndarray, randomize: bool = True):
        if randomize:
            self.randomize()
        if not self._drop:
            return img
        out = img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True)
        for c, seq in enumerate(self.sequences):
            if seq in self._drop:
                out[c] = 0
        return out


class RandSequenceDropoutd(RandomizableTransform, MapTransform):
    """Dictionary version of `RandSequenceDropout` (same draw for every key)."""

    def __init__(self, keys, sequences: Sequence[str], prob: float = 0.5, minimum: Sequence[str] = MINIMUM):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, 1.0)
        self.dropper = RandSequenceDropout(sequences, prob, minimum)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.dropper.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.dropper.randomize()
        for key in self.key_iterator(d):
            d[key] = self.dropper(d[key], randomize=False)
        return d
