"""Missing sequences in the sequence model: which branches a study has, and branch dropout for training.

A late-fusion model (one branch per sequence, Liu et al.) answers from the branches whose sequence the
study has: a missing branch contributes zero features (Add: it drops out of the sum; Spl: its block of
the concatenated feature is zero). Early fusion has one branch whose missing optional channels are
zero-filled. To make the head cope with empty blocks, stage 2 is also trained on copies of the training
studies with random subsets of the optional branches removed (``dropout_masks``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from parotid.sequences import SEQUENCES
from parotid.subsets import MINIMUM_SEQUENCES, NAMED_SUBSETS

# The clinically motivated subsets a hospital sends (issue 15; defined in parotid.subsets): name -> the
# sequences removed (contrast withheld, DWI left out, T2 only).
SUBSETS = {name: removed if removed is not None else tuple(q.key for q in SEQUENCES if q.key not in MINIMUM_SEQUENCES)
           for name, removed in NAMED_SUBSETS.items()}


def branch_presence(groups: list[list[str]], available: Iterable[str]) -> list[bool]:
    """A branch is present when the study has at least one of its sequences (early fusion: the group's
    missing optional channels are zero-filled; late fusion: one sequence per branch)."""
    have = set(available)
    return [any(s in have for s in g) for g in groups]


def presence_tensor(groups: list[list[str]], available: Iterable[str]) -> torch.Tensor:
    """(1, branches) bool mask of one study."""
    return torch.tensor([branch_presence(groups, available)])


def cropset_presence(cs, groups: list[list[str]], idx, drop: Iterable[str] = ()) -> torch.Tensor:
    """(n, branches) bool mask of cohort rows `idx` (``CropSet.avail``), with the sequences `drop`
    removed as if the studies lacked them."""
    drop = set(drop)
    idx = np.asarray(idx)
    av = cs.avail[idx]
    return torch.from_numpy(np.stack([av[:, cs.channels([s for s in g if s not in drop])].any(1)
                                      if [s for s in g if s not in drop] else np.zeros(len(idx), bool)
                                      for g in groups], 1))


def used_and_missing(groups: list[list[str]], available: Iterable[str]) -> tuple[list[str], list[str]]:
    """The model's sequences the study has (used) and lacks (missing), in the model's order."""
    have = set(available)
    seqs = [s for g in groups for s in g]
    return [s for s in seqs if s in have], [s for s in seqs if s not in have]


def dropout_masks(groups: list[list[str]], required: Iterable[str], n: int, p: float,
                  rng: np.random.Generator) -> torch.Tensor:
    """(n, branches) random masks: every branch without a required sequence is dropped with probability
    `p` (p = 0.5: uniform over the subsets that keep the required branches)."""
    req = set(required)
    keep = np.array([any(s in req for s in g) for g in groups])
    m = rng.random((n, len(groups))) >= p
    return torch.from_numpy(m | keep[None])
