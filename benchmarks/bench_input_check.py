"""Input check (out-of-distribution detection): false alarms on held-out SYNTHETIC studies, detection of
real non-parotid scans shipped in packages, and tumour-free boxes.

    python benchmarks/bench_input_check.py --heldout /tmp/ic/eval303 --json docs/results/input_check.json

* held-out in-distribution: a `parotid-synth` cohort with a seed never used for training or for the
  calibration (training 31, 32, 41, 101; calibration 202; sample data 7); generated when absent
  (`--heldout-seed`, `--heldout-n`). Each study with its annotated box: the study-level check (what
  segmentation and contour_box answer) and both classifiers (input check + `undetermined`).
* tumour-free boxes on the same studies: the README's box [40,60,30,52,6,14] and the index tumour's box
  mirrored to the other side (skipped where it holds annotated tumour): "no tumour found" rate, and the
  tumour-found rate on the annotated boxes.
* real scans (not parotid studies) from nibabel's tests/data, dipy's data/files and pydicom's test files,
  imported as a hospital user would with `parotid-import` (the same `assemble_study` call): the volume as
  T2, CET1, DWI_B1000 and ADC (4D files: the first volume; other formats converted to NIfTI with
  nibabel). Split: TUNED = the three files of the issue's report, looked at while designing the check;
  UNTUNED = all others, scored only after the design and thresholds were fixed.

Every figure is computed with the library functions the infer tasks call (parotid.input_check,
parotid.classification.predict.classify), in-process; tests/test_input_check.py covers the server path.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch

from parotid.sequences import CLASSIFIER_SEQUENCES as SEQS  # the classifiers' inputs

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "apps" / "parotid" / "model"
README_BOX = [40, 60, 30, 52, 6, 14]
CLASSIFIERS = ("classify_subtype", "classify_malignancy")


# ------------------------------------------------------------------------------ real files
def real_files() -> list[tuple[str, str, str]]:
    """(name, path, split) of real scans shipped in packages."""
    import dipy
    import pydicom

    nb = Path(nib.__file__).parent / "tests" / "data"
    dp = Path(dipy.__file__).parent / "data" / "files"
    pd = Path(pydicom.__file__).parent / "data" / "test_files"
    tuned = ["anatomical.nii", "example4d.nii.gz", "functional.nii"]
    out = [(f"nibabel/{f}", str(nb / f), "tuned") for f in tuned]
    for f in ["example_nifti2.nii.gz", "reoriented_anat_moved.nii", "resampled_anat_moved.nii", "scaled+tlrc.BRIK",
              "example4d+orig.BRIK.gz", "small.mnc", "phantom_EPI_asc_CLEAR_2_1.PAR", "phantom_varscale.PAR"]:
        out.append((f"nibabel/{f}", str(nb / f), "untuned"))
    for f in ["S0_10slices.nii.gz", "aniso_vox.nii.gz", "ascm_out_test.nii.gz", "test_piesno.nii.gz", "small_64D.nii",
              "small_101D.nii.gz", "small_25.nii.gz"]:
        out.append((f"dipy/{f}", str(dp / f), "untuned"))
    for d in ["dicomdirtests/98892003/MR700", "dicomdirtests/98892003/MR2", "dicomdirtests/98892003/MR1",
              "dicomdirtests/77654033/CT2", "dicomdirtests/98892001/CT5N"]:
        out.append((f"pydicom/{d}", str(pd / d), "untuned"))
    for f in ["MR_small.dcm", "CT_small.dcm", "emri_small.dcm"]:
        if (pd / f).exists():
            out.append((f"pydicom/{f}", str(pd / f), "untuned"))
    return out


def as_volume_file(path: str, tmp: str) -> str:
    """What a user hands `parotid-import`: NIfTI or a DICOM folder as is; other formats and 4D series
    converted with nibabel (first volume)."""
    if os.path.isdir(path) or path.endswith(".dcm"):
        return path
    img = nib.load(path)
    if path.endswith((".nii", ".nii.gz")) and len(img.shape) == 3:
        return path
    data = np.asarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    out = os.path.join(tmp, os.path.basename(path).replace("+", "_").split(".")[0] + ".nii.gz")
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), out)
    return out


def import_real(path: str, tmp: str):
    """The Study `parotid-import` would build from the volume as T2/CET1/DWI_B1000/ADC, or the refusal."""
    from parotid.study import StudyError, assemble_study, read_volume

    try:
        vol = read_volume(as_volume_file(path, tmp), "T2")
        return assemble_study({k: vol for k in SEQS}), None
    except StudyError as e:
        return None, str(e)


# ------------------------------------------------------------------------------ one study
def evaluate(study, roi, classifiers, model_dir: str) -> dict:
    """What each infer task would answer about the input (no HTTP)."""
    from parotid import input_check as ic
    from parotid.classification.predict import classify
    from parotid.study import StudyError

    comps, label = ic.study_components(study, model_dir)
    row = {"study": ic.combine(comps)}
    if roi is None:
        roi = _box_for(study, label)
    row["roi"] = roi
    try:
        box = ic.box_components(study, roi, model_dir)
    except StudyError as e:
        row["box_refused"] = str(e)
        return row
    row["tumour_in_box"] = box.get("tumor_in_box")
    for name, (model, cfg) in classifiers.items():
        res, _ = classify(model, cfg, study, roi, heatmap=False, input_components=box)
        row[name] = {"undetermined": res["undetermined"], "input_check": res["input_check"],
                     "predicted_class": res["predicted_class"]}
    return row


def _box_for(study, label) -> list[int]:
    """The automatic box (segmentation's tumour) or a central box of a third of the image."""
    from parotid.segmentation.inference import tumour_roi

    roi = tumour_roi(label) if label is not None else None
    if roi:
        return roi
    out = []
    for n in study.shape:
        w = max(1, n // 3)
        out += [(n - w) // 2, (n - w) // 2 + w]
    return out


def _components_failed(row: dict, key: str) -> list[str]:
    ic = row[key]["input_check"] if key in CLASSIFIERS else row[key]
    return [k for k, c in ic["components"].items() if not c["passed"]]


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heldout", default="/tmp/parotid-train/heldout303", help="held-out SYNTHETIC cohort folder")
    ap.add_argument("--heldout-seed", type=int, default=303)
    ap.add_argument("--heldout-n", type=int, default=60)
    ap.add_argument("--models", default=str(MODELS))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--skip-synthetic", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT / "src"))
    from parotid.cohort import load_classification_cohort
    from parotid.classification.checkpoint import load_checkpoint
    from parotid.study import read_study

    classifiers = {c: load_checkpoint(os.path.join(a.models, f"{c}.pt")) for c in CLASSIFIERS}
    for c, (_, cfg) in classifiers.items():
        cfg["task"] = c
    out: dict = {"models": a.models, "date": time.strftime("%Y-%m-%d"), "synthetic_heldout": None, "real": []}
    if not a.skip_synthetic:
        if not os.path.exists(os.path.join(a.heldout, "datastore_v2.json")):
            from parotid.synth.cohort import write_cohort

            write_cohort(a.heldout, a.heldout_n, a.heldout_seed, raw=False, progress=False)
        rows = []
        for r in load_classification_cohort(a.heldout):
            s = read_study(r.image, r.study_id)
            if not all(q in s.sequences for q in ("T2", "CET1")):
                continue  # every model refuses it (422 "lacks sequence"): no result to check
            row = evaluate(s, r.roi, classifiers, a.models)
            lab = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(r.label)), (2, 1, 0)) if r.label else None
            neg = {}
            from parotid import input_check as ic

            comps, seg = ic.study_components(s, a.models)
            for name, box in (("readme", README_BOX), ("mirrored", [s.shape[0] - r.roi[1], s.shape[0] - r.roi[0]] + r.roi[2:])):
                i0, i1, j0, j1, k0, k1 = box
                if lab is not None and (lab[i0:i1, j0:j1, k0:k1] == 2).any():
                    continue  # holds annotated tumour (bilateral Warthin): not a tumour-free box
                neg[name] = ic.tumour_in_box(seg, box, s)["tumor_found"]
            row["tumour_free_boxes_found"] = neg
            row["study_id"] = r.study_id
            rows.append(row)
            print(r.study_id, row["study"]["in_distribution"], {c: row[c]["input_check"]["in_distribution"] for c in CLASSIFIERS},
                  neg, flush=True)
        n = len(rows)
        fa = {"segmentation/contour_box (study)": sum(not r["study"]["in_distribution"] for r in rows)}
        for c in CLASSIFIERS:
            fa[c] = sum(not r[c]["input_check"]["in_distribution"] for r in rows)
        comp_fail: dict = {}
        for r in rows:
            for key in ("study",) + CLASSIFIERS:
                for k in _components_failed(r, key):
                    comp_fail.setdefault(f"{key}:{k}", 0)
                    comp_fail[f"{key}:{k}"] += 1
        negs = [v for r in rows for v in r["tumour_free_boxes_found"].values()]
        out["synthetic_heldout"] = {
            "cohort": f"parotid-synth --seed {a.heldout_seed} --n {a.heldout_n} (SYNTHETIC)", "n": n,
            "false_alarms": fa, "false_alarm_rate": {k: round(v / n, 4) for k, v in fa.items()},
            "failed_components": comp_fail,
            "undetermined_any_reason": {c: sum(r[c]["undetermined"] for r in rows) for c in CLASSIFIERS},
            "annotated_box_tumour_found": sum(bool(r["tumour_in_box"] and r["tumour_in_box"]["tumor_found"]) for r in rows),
            "tumour_free_boxes": len(negs), "tumour_free_boxes_answered_tumour": int(sum(negs)),
        }
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, split in real_files():
            study, refused = import_real(path, tmp)
            rec = {"file": name, "split": split}
            if study is None:
                rec["refused_at_import"] = refused
            else:
                row = evaluate(study, None, classifiers, a.models)
                rec["shape"], rec["spacing_mm"] = list(study.shape), [round(v, 3) for v in study.image.GetSpacing()]
                rec["study_flagged"] = not row["study"]["in_distribution"]
                rec["study_failed_components"] = _components_failed(row, "study")
                rec["study_score"] = row["study"]["score"]
                if "box_refused" in row:
                    rec["classify"] = "box refused (422)"
                else:
                    rec["classify"] = {c: {"flagged": not row[c]["input_check"]["in_distribution"],
                                           "undetermined": row[c]["undetermined"],
                                           "failed_components": _components_failed(row, c)} for c in CLASSIFIERS}
            out["real"].append(rec)
            print(json.dumps(rec), flush=True)
    summary = {}
    for split in ("tuned", "untuned"):
        rs = [r for r in out["real"] if r["split"] == split]
        imported = [r for r in rs if "refused_at_import" not in r]
        summary[split] = {"files": len(rs), "refused_at_import": len(rs) - len(imported), "imported": len(imported),
                          "study_flagged": sum(r["study_flagged"] for r in imported),
                          "classify_undetermined_or_refused": sum(
                              r["classify"] == "box refused (422)" or all(v["undetermined"] for v in r["classify"].values())
                              for r in imported)}
        for comp in ("physical", "intensity", "anatomy"):
            summary[split][f"flagged_by_{comp}"] = sum(comp in r["study_failed_components"] for r in imported)
    out["real_summary"] = summary
    print(json.dumps({k: v for k, v in out.items() if k != "real"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
