"""MRI sequences: the one place that names them.

A study holds any subset of these sequences. Each has a canonical key (used in study files,
model configs and `/info`), a human description, and name patterns used to recognise it from a
volume name or a DICOM SeriesDescription. Deployments can override the table with a JSON file
named by the environment variable ``PAROTID_SEQUENCES`` (same fields as below).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Sequence:
    key: str
    description: str
    patterns: tuple[str, ...]  # case-insensitive fnmatch patterns on volume / series names


_DEFAULT = (
    Sequence("T1", "T1-weighted", ("*t1*",)),
    Sequence("T2", "T2-weighted (fat-suppressed)", ("*t2*", "*stir*")),
    Sequence("CET1", "contrast-enhanced T1-weighted", ("*ce*t1*", "*t1*ce*", "*post*", "*gad*", "*+c*", "*vibe*")),
    Sequence("DWI_B0", "diffusion-weighted b=0 s/mm2", ("*b0", "*b0[!0-9]*", "*b_0*", "*b=0[!0-9]*", "*b=0")),
    Sequence("DWI_B1000", "diffusion-weighted b=1000 s/mm2", ("*b1000*", "*b=1000*", "*b_1000*")),
    Sequence("ADC", "apparent diffusion coefficient map (1e-6 mm2/s)", ("*adc*",)),
)

# The built-in table's keys: the input channels of the shipped networks (a PAROTID_SEQUENCES table does not
# change what a trained network reads).
DEFAULT_KEYS: tuple[str, ...] = tuple(s.key for s in _DEFAULT)
# The classifiers' default inputs: the sequences of Liu et al.'s best model (T2, CE-T1, DWI b1000) + ADC.
CLASSIFIER_SEQUENCES = ("T2", "CET1", "DWI_B1000", "ADC")
# Acquired together by one diffusion protocol: the b-value images and the ADC map computed from them.
DWI_KEYS = ("DWI_B0", "DWI_B1000")
DIFFUSION = (*DWI_KEYS, "ADC")

# Reference grid preference when a study is assembled (first present wins).
DEFAULT_REFERENCE_ORDER = ("CET1", "T2", "T1", "DWI_B0", "DWI_B1000", "ADC")


def _load() -> tuple[Sequence, ...]:
    path = os.environ.get("PAROTID_SEQUENCES")
    if not path:
        return _DEFAULT
    with open(path) as f:
        rows = json.load(f)
    return tuple(Sequence(r["key"], r.get("description", r["key"]), tuple(r.get("patterns", []))) for r in rows)


SEQUENCES: tuple[Sequence, ...] = _load()
SEQUENCE_KEYS: tuple[str, ...] = tuple(s.key for s in SEQUENCES)


def check_keys(keys) -> list[str]:
    """Return `keys` as a list, raising ValueError on a name that is not a known sequence."""
    keys = list(keys)
    unknown = [k for k in keys if k not in SEQUENCE_KEYS]
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; known: {list(SEQUENCE_KEYS)}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"sequence listed twice: {keys}")
    return keys


def most_specific_match(name: str, patterns: Mapping[str, Iterable[str]]) -> str | None:
    """The key whose case-insensitive fnmatch pattern matches `name` with the most characters other than
    ``*`` (ties: the first), or None. (ParotidTumorLib.sequences keeps a Slicer-free copy, checked
    against this one by tests/test_slicer_lib.py.)"""
    low = name.lower().strip()
    best: tuple[int, str] | None = None
    for key, pats in patterns.items():
        for pat in pats:
            specificity = len(pat.replace("*", ""))
            if fnmatch.fnmatchcase(low, pat) and (best is None or specificity > best[0]):
                best = (specificity, key)
    return best[1] if best else None


def match_sequence(name: str) -> str | None:
    """Guess the sequence key from a volume name or SeriesDescription: the key itself, else the most
    specific pattern of the sequence table."""
    low = name.lower().strip()
    if low.upper() in SEQUENCE_KEYS:
        return low.upper()
    return most_specific_match(low, {seq.key: seq.patterns for seq in SEQUENCES})


def reference_key(present, order=DEFAULT_REFERENCE_ORDER) -> str:
    """The sequence whose grid becomes the study's reference grid."""
    present = list(present)
    for key in order:
        if key in present:
            return key
    if not present:
        raise ValueError("a study needs at least one sequence")
    return present[0]
