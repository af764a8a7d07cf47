"""MRI sequence table used by the Slicer module (a copy of ``parotid.sequences``, kept in sync by a test).

ParotidTumorLib must run inside 3D Slicer, where the server-side ``parotid`` package (and its torch /
MONAI Label dependencies) is NOT installed. So this module carries its own copy of the sequence keys,
descriptions and name patterns. ``tests/test_slicer_lib.py::test_sequence_table_matches_core`` fails
if this copy drifts from ``parotid.sequences``. At run time the server's ``/info`` is the authority for
which sequences a model needs; this table only serves name-based auto-assignment of Slicer volumes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Sequence:
    key: str
    description: str
    patterns: tuple  # case-insensitive fnmatch patterns on volume / series names


SEQUENCES = (
    Sequence("T1", "T1-weighted", ("*t1*",)),
    Sequence("T2", "T2-weighted (fat-suppressed)", ("*t2*", "*stir*")),
    Sequence("CET1", "contrast-enhanced T1-weighted", ("*ce*t1*", "*t1*ce*", "*post*", "*gad*", "*+c*", "*vibe*")),
    Sequence("DWI_B0", "diffusion-weighted b=0 s/mm2", ("*b0", "*b0[!0-9]*", "*b_0*", "*b=0[!0-9]*", "*b=0")),
    Sequence("DWI_B1000", "diffusion-weighted b=1000 s/mm2", ("*b1000*", "*b=1000*", "*b_1000*")),
    Sequence("ADC", "apparent diffusion coefficient map (1e-6 mm2/s)", ("*adc*",)),
)
SEQUENCE_KEYS = tuple(s.key for s in SEQUENCES)
DESCRIPTIONS = {s.key: s.description for s in SEQUENCES}

# Reference grid preference when a study is assembled (first present wins) -- as on the server.
DEFAULT_REFERENCE_ORDER = ("CET1", "T2", "T1", "DWI_B0", "DWI_B1000", "ADC")


def _specificity(pattern: str) -> int:
    return len(pattern.replace("*", ""))


def match_score(name: str):
    """(specificity, key) of the most specific pattern matching `name`, or None."""
    low = (name or "").lower().strip()
    if low.upper() in SEQUENCE_KEYS:
        return (1000, low.upper())
    best = None
    for seq in SEQUENCES:
        for pat in seq.patterns:
            if fnmatch.fnmatchcase(low, pat) and (best is None or _specificity(pat) > best[0]):
                best = (_specificity(pat), seq.key)
    return best


def match_sequence(name: str):
    """Guess the sequence key from a volume name or SeriesDescription (most specific pattern wins)."""
    best = match_score(name)
    return best[1] if best else None


def reference_key(present, order=DEFAULT_REFERENCE_ORDER) -> str:
    """The sequence whose grid becomes the study's reference grid."""
    present = list(present)
    for key in order:
        if key in present:
            return key
    if not present:
        raise ValueError("a study needs at least one sequence")
    return present[0]


def auto_assign(names, keys=SEQUENCE_KEYS) -> dict:
    """Assign volume names to sequence keys by name pattern, each volume at most once.

    Returns ``{key: name}`` for the keys in `keys` that found a volume. When several volumes match the
    same key, the most specific match wins (ties: the first volume in `names`).
    """
    best = {}
    for name in names:
        m = match_score(name)
        if m is None or m[1] not in keys:
            continue
        score, key = m
        if key not in best or score > best[key][0]:
            best[key] = (score, name)
    return {k: best[k][1] for k in keys if k in best}


def check_distinct(selection: dict) -> None:
    """Raise ValueError if the same volume was chosen for two sequences.

    `selection` maps sequence key -> a volume identifier (node ID, file path ...); None means unset.
    """
    seen = {}
    for key, vol in selection.items():
        if vol is None:
            continue
        if vol in seen:
            raise ValueError(f"the same volume is selected for {seen[vol]} and {key}; pick one volume per sequence")
        seen[vol] = key
