"""How much of a tumour's label the image cannot show: the generator's fine boundary perturbation (SYNTHETIC).

    python -m parotid.synth.label_noise --cohorts 500:80 521:24 --rows docs/results/seg_flips_heldout.json \\
        --variant flip_I --out label_noise.json

An ill-defined malignant tumour (`phantom._make_tumour`) gets, on top of its smooth shape, a second boundary
perturbation of 1.5-3 mm amplitude and 4-8 mm wavelength, and its image edge is blurred by 2-4 mm; the label
follows the perturbed shape. For every malignant tumour of the given cohorts this computes the Dice between the
label's shape and the same shape without that fine perturbation, on a 0.5 mm grid in the head frame (the
generator's geometry, nothing rendered): a segmentation that drew the smooth shape exactly would score about
this. With `--rows` (`flip_eval` output) it sets the model's Dice on the same studies beside it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from parotid.synth.phantom import sample_case
from parotid.synth.render import Ellipsoid

GRID_MM = 0.5


def smooth_shape_dice(seed: int, index: int) -> dict | None:
    """For a malignant study: Dice of its index tumour's shape with vs without the fine perturbation
    (1.0 when the tumour has none). None for other classes."""
    case = sample_case(seed, index)
    if case.tumor_class != "malignant":
        return None
    body = next(ly for stage in case.layers_by_stage for ly in stage if ly.name == "tumour0").shape
    smooth = Ellipsoid(body.centre, body.radii, body.R, offset=body.offset, perturb=body.perturb[:1])
    half = body.half + 1.0
    axes = [np.arange(-half[a], half[a], GRID_MM, dtype=np.float32) + body.centre[a] for a in range(3)]
    q = np.stack(np.meshgrid(*axes, indexing="ij"))
    label, drawn = body.sdf(q) < 0, smooth.sdf(q) < 0
    return {"id": case.study_id, "ill_defined": case.ill_defined, "fine_perturbation": len(body.perturb) > 1,
            "size_mm": case.size_mm, "dice_label_vs_smooth_shape": float(2 * (label & drawn).sum() / (label.sum() + drawn.sum()))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohorts", nargs="+", required=True, metavar="SEED:N", help="cohort seed and its number of studies")
    p.add_argument("--rows", nargs="*", default=[], help="flip_eval JSON files with the model's per-study Dice")
    p.add_argument("--variant", default="mirror_lr", help="flip_eval variant to compare (default: the served one)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows = []
    for spec in a.cohorts:
        seed, n = (int(v) for v in spec.split(":"))
        rows += [r for r in (smooth_shape_dice(seed, i) for i in range(n)) if r]
    model = {}
    for path in a.rows:
        with open(path) as f:
            model.update({r["id"]: r[a.variant]["tumor"] for r in json.load(f)["rows"] if r.get("subset", "all") == "all"})
    for r in rows:
        if r["id"] in model:
            r["model_dice_tumor"] = model[r["id"]]
    summary = {}
    for name, keep in (("fine_perturbation", True), ("without", False)):
        sub = [r for r in rows if r["fine_perturbation"] == keep]
        both = [r for r in sub if "model_dice_tumor" in r]
        summary[name] = {"n": len(sub), "dice_label_vs_smooth_shape": float(np.mean([r["dice_label_vs_smooth_shape"] for r in sub])) if sub else None,
                         "n_with_model": len(both),
                         "smooth_shape_on_those": float(np.mean([r["dice_label_vs_smooth_shape"] for r in both])) if both else None,
                         "model_on_those": float(np.mean([r["model_dice_tumor"] for r in both])) if both else None}
        x = [r["dice_label_vs_smooth_shape"] for r in both]
        if len(both) > 2 and np.ptp(x) > 0:  # undefined on a constant (tumours without the perturbation: all 1.0)
            from scipy.stats import spearmanr
            summary[name]["spearman"] = float(spearmanr(x, [r["model_dice_tumor"] for r in both]).statistic)
    res = {"synthetic": True, "grid_mm": GRID_MM, "variant": a.variant, "summary": summary, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
