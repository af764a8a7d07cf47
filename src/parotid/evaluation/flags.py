"""The served input check over an evaluation cohort: which studies would the server flag?

For every labelled study of a cohort folder, the study and box components of ``parotid.input_check``
(physical plausibility, intensity statistics, anatomy from the served segmentation model, tumour in
the labelled box) are computed exactly as the classify task computes them (``box_components``) with
the reference (``input_check.json``) and segmentation checkpoint of a served model folder, and
combined (``combine``). The classifier-feature density is left out here: it belongs to one served
classifier; ``parotid-eval profiles`` adds it from the served checkpoints.
"""

from __future__ import annotations

import os

from parotid import input_check
from parotid.study import StudyError, read_study


def flagged_result(reason: str) -> dict:
    """An input check that refused the study (the server answers 422): counted as flagged."""
    return {"in_distribution": False, "score": float(input_check.MAX_SCORE), "threshold": 1.0, "reasons": [reason],
            "components": {}}


def served_input_checks(folder: str, model_dir: str, study_ids=None) -> dict[str, dict]:
    """study_id -> ``combine``d input check (study + box components) for the labelled studies of `folder`
    (only `study_ids` when given)."""
    from parotid.cohort import load_classification_cohort

    if not os.path.exists(os.path.join(model_dir, input_check.REFERENCE_FILE)):
        raise SystemExit(f"input check: no {input_check.REFERENCE_FILE} in {model_dir} (give --input-check MODEL_DIR)")
    wanted = None if study_ids is None else set(study_ids)
    out = {}
    for r in load_classification_cohort(folder):
        if wanted is not None and r.study_id not in wanted:
            continue
        try:
            comps = input_check.box_components(read_study(r.image, r.study_id), r.roi, model_dir)
        except StudyError as e:  # refused before any answer: flagged, with the server's message
            out[r.study_id] = flagged_result(str(e))
            continue
        out[r.study_id] = input_check.combine(comps)
    return out


def flag_summary(checks: dict[str, dict]) -> dict:
    """n checked, n flagged, flagged ids, and how many studies each component flagged."""
    flagged = sorted(k for k, v in checks.items() if not v["in_distribution"])
    by = {}
    for k in flagged:
        for name, c in checks[k]["components"].items():
            if not c.get("passed", True):
                by[name] = by.get(name, 0) + 1
    return {"n_checked": len(checks), "n_flagged": len(flagged), "flagged": flagged, "by_component": by}
