"""Sequence subsets: which of a model's sequences a study has, what every model serves, and the
performance validated for each subset.

* Every model answers any study that has the clinical minimum, ``MINIMUM_SEQUENCES`` (T2): its other
  input sequences, when absent, are fed as zero channels (the models are trained with such channels
  dropped). A study without T2 is refused (HTTP 422 naming what is missing). Why T2: docs/missing-sequences.md.
* ``parotid-eval subsets`` measures each model on a held-out SYNTHETIC cohort with sequences removed
  (the named subsets below) and writes ``<model dir>/<task>.subsets.json``: one row per subset with its
  metrics and bootstrap CIs, stamped with the checkpoint's SHA-256.
* Every result says ``sequences_used``, ``sequences_missing`` and ``expected_performance``: the row of
  that table measured for the study's subset (or, when that exact subset was not measured, for the
  largest measured subset that uses no sequence the study lacks: never a row with more information than
  the study has). A table measured for another checkpoint is not used (``validated: false``).
* A classification of a study that lacks any model sequence is ``undetermined`` when its subset's
  validated ROC-AUC (benign vs malignant) is below ``CLASSIFICATION_FLOOR`` or no validated figure exists.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Iterable, Sequence

import SimpleITK as sitk

from parotid.checksums import cached_sha256
from parotid.sequences import DIFFUSION
from parotid.study import Study, StudyError

MINIMUM_SEQUENCES = ("T2",)
# The lower end of what single-sequence models reach on the synthetic ablation (docs/results.md §2:
# T1 0.80, CE-T1 0.84, T2 0.88 ROC-AUC): a subset validated below that is not worth a class.
CLASSIFICATION_FLOOR = 0.80
FLOOR_METRIC = "roc_auc"  # benign vs malignant, P(malignant); classification tables only
# The subsets every model is evaluated on: name -> the sequences removed (None: all but the minimum).
NAMED_SUBSETS: dict[str, tuple[str, ...] | None] = {
    "all": (),
    "no_CET1": ("CET1",),
    "no_DWI_ADC": DIFFUSION,
    "T2_only": None,
}
TABLE_SUFFIX = ".subsets.json"


def minimum_for(model_sequences: Sequence[str]) -> tuple[str, ...]:
    """The sequences a study must have for a model with these inputs (a model without T2 needs all of its own)."""
    return tuple(s for s in MINIMUM_SEQUENCES if s in model_sequences) or tuple(model_sequences)


def used_and_missing(model_sequences: Sequence[str], study_sequences: Iterable[str]) -> tuple[list[str], list[str]]:
    have = set(study_sequences)
    return [s for s in model_sequences if s in have], [s for s in model_sequences if s not in have]


def named_subsets(model_sequences: Sequence[str]) -> dict[str, list[str]]:
    """``{name: sequences used}`` of the evaluated subsets for a model (duplicates dropped, first name kept)."""
    out: dict[str, list[str]] = {}
    minimum = minimum_for(model_sequences)
    for name, removed in NAMED_SUBSETS.items():
        used = [s for s in model_sequences if (s in minimum if removed is None else s not in removed)]
        if used not in out.values():
            out[name] = used
    return out


def subset_study(study: Study, sequences: Sequence[str]) -> Study:
    """The study with only `sequences` (in the study's order): what a site without the others would send."""
    keep = [s for s in study.sequences if s in sequences]
    if not keep:
        raise StudyError(f"none of {list(sequences)} in the study ({list(study.sequences)})")
    comps = [sitk.VectorIndexSelectionCast(study.image, study.sequences.index(s)) for s in keep]
    image = sitk.Compose(comps)
    image.CopyInformation(study.image)
    return Study(image=image, sequences=tuple(keep))


# ------------------------------------------------------------------------------------ tables
_LOCK = threading.Lock()
_TABLES: dict[str, tuple[float, dict]] = {}


def table_path(model_dir: str, task: str) -> str:
    return os.path.join(model_dir, f"{task}{TABLE_SUFFIX}")


def file_sha256(path: str) -> str:
    """SHA-256 of a checkpoint, cached by (path, mtime, size)."""
    return cached_sha256(path)


def load_table(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    mtime = os.path.getmtime(path)
    with _LOCK:
        hit = _TABLES.get(path)
    if not hit or hit[0] != mtime:
        try:
            with open(path) as f:
                hit = (mtime, json.load(f))
        except (OSError, ValueError):
            return None
        with _LOCK:
            _TABLES[path] = hit
    return hit[1]


def write_table(path: str, table: dict) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)


def validated_table(model_dir: str, task: str, checkpoint: str | None) -> tuple[dict | None, str]:
    """(table, '') when a table exists and was measured for the served checkpoint, else (None, why not)."""
    table = load_table(table_path(model_dir, task))
    if table is None:
        return None, f"no per-subset validation for model {task} ({task}{TABLE_SUFFIX}: run parotid-eval subsets)"
    if not checkpoint or not os.path.exists(checkpoint) or table.get("checkpoint_sha256") != file_sha256(checkpoint):
        return None, (f"the per-subset validation of model {task} was measured for another checkpoint "
                      "(rerun parotid-eval subsets)")
    return table, ""


def _row_for(table: dict, used: Sequence[str]) -> dict | None:
    """The row of exactly `used`, else the measured row with the most sequences, all of them in `used`."""
    rows = table.get("subsets") or []
    have = set(used)
    exact = [r for r in rows if set(r["sequences_used"]) == have]
    if exact:
        return exact[0]
    inside = [r for r in rows if set(r["sequences_used"]) <= have]
    return max(inside, key=lambda r: len(r["sequences_used"])) if inside else None


def expected_performance(task: str, model_sequences: Sequence[str], study_sequences: Iterable[str],
                         model_dir: str, checkpoint: str | None) -> dict:
    """The validated performance of `task` on a study with `study_sequences` (see the module doc)."""
    used, _ = used_and_missing(model_sequences, study_sequences)
    table, why = validated_table(model_dir, task, checkpoint)
    if table is None:
        return {"validated": False, "reason": why}
    row = _row_for(table, used)
    if row is None:
        return {"validated": False, "reason": f"no measured subset of model {task} uses only {used}"}
    return {"validated": True, "subset": row["name"], "measured_with": row["sequences_used"],
            "exact_subset": set(row["sequences_used"]) == set(used), "metrics": row["metrics"], "n": row["n"],
            "synthetic": bool(table.get("synthetic", True)), "cohort": table.get("cohort"), "source": table.get("source")}


def _metric_value(metric) -> float | None:
    """A metric stored as a number or as [value, lo, hi]."""
    if isinstance(metric, (list, tuple)):
        metric = metric[0] if metric else None
    return None if metric is None else float(metric)


def mark_subset(result: dict, missing: Sequence[str], performance: dict) -> dict:
    """Make a classification `result` undetermined (with a reason) when sequences are missing and their
    subset's validated ROC-AUC is below CLASSIFICATION_FLOOR, or no validated figure exists."""
    if not missing:
        return result
    reason = None
    if not performance.get("validated"):
        reason = f"sequence(s) {list(missing)} missing and {performance.get('reason', 'no validated performance')}"
    else:
        auc = _metric_value(performance["metrics"].get(FLOOR_METRIC))
        if auc is None or auc < CLASSIFICATION_FLOOR:
            shown = "not measured" if auc is None else f"{auc:.2f}"
            reason = (f"sequence(s) {list(missing)} missing: validated ROC-AUC for studies with "
                      f"{performance['measured_with']} is {shown}, below the floor {CLASSIFICATION_FLOOR:.2f} (SYNTHETIC validation)")
    if reason:
        result["undetermined"] = True
        result["undetermined_reasons"] = list(result.get("undetermined_reasons") or []) + [reason]
    return result


def sequence_report(task: str, model_sequences: Sequence[str], study: Study, model_dir: str,
                    checkpoint: str | None) -> dict[str, Any]:
    """The result fields every task returns: ``sequences_used``, ``sequences_missing``, ``expected_performance``."""
    used, missing = used_and_missing(model_sequences, study.sequences)
    return {"sequences_used": used, "sequences_missing": missing,
            "expected_performance": expected_performance(task, model_sequences, study.sequences, model_dir, checkpoint)}


def served_subsets(task: str, model_sequences: Sequence[str], model_dir: str, checkpoint: str | None,
                   classification: bool = False) -> dict[str, Any]:
    """What ``/info`` says per model about its subsets: each evaluated subset with its validated metrics
    (the minimum is the model's ``required_sequences``)."""
    table, why = validated_table(model_dir, task, checkpoint)
    rows = {r["name"]: r for r in (table or {}).get("subsets", [])}
    subsets = []
    for name, used in named_subsets(model_sequences).items():
        row = rows.get(name)
        entry: dict[str, Any] = {"name": name, "sequences_used": used,
                                 "sequences_missing": [s for s in model_sequences if s not in used],
                                 "expected_performance": ({"metrics": row["metrics"], "n": row["n"], "synthetic": True}
                                                          if row else None)}
        if classification:
            auc = _metric_value(row["metrics"].get(FLOOR_METRIC)) if row else None
            entry["answered"] = ("determined" if not entry["sequences_missing"] or (auc is not None and auc >= CLASSIFICATION_FLOOR)
                                 else "undetermined")
        subsets.append(entry)
    out: dict[str, Any] = {"subsets": subsets, "subsets_validated": table is not None}
    if table is None:
        out["subsets_note"] = why
    else:
        out["subsets_cohort"] = table.get("cohort")
    if classification:
        out["subset_floor"] = {"metric": FLOOR_METRIC, "value": CLASSIFICATION_FLOOR}
    return out
