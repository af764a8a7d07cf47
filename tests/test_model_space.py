"""Models see physical space (parotid.model_space): the same anatomy at two voxel sizes gives the same
contour and class; a study at the training spacing is not resampled (results bit-identical to running
the networks on the study's own voxels); boxes map to the same physical region.

The two voxel sizes are the shipped sample study syn7_0000 (CE-T1 grid, 1.5 x 1.5 x 3 mm: the
training spacing of every shipped model) and the same study resampled with SimpleITK to
0.75 x 0.75 x 3 mm (in-plane twice as fine). All data are synthetic.

Tolerances (measured on syn7_0000 when this was written: Dice gland 0.977, tumour 0.979 with
resampling, 0.35 / 0.32 without; class probabilities within 0.003):
Dice >= 0.90 gland and >= 0.85 tumour (whole-study segmentation), >= 0.85 (box contour), tumour
volume within 10 %, same predicted class and probabilities within 0.05.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from requests_toolbelt.multipart import decoder

from conftest import APP, SAMPLE
from parotid.classification.predict import classify
from parotid.classification.checkpoint import load_checkpoint
from parotid.model_space import (SPACING_RTOL, checkpoint_spacing, map_roi, model_grid, needs_resampling,
                                 stamp_spacing)
from parotid.segmentation.inference import (contour_in_box, contour_study, dice, mirror_flips, segment,
                                            segment_study, study_input)
from parotid.segmentation.networks import CONTOUR_BOX, SEGMENTATION, build_network, network_shape
from parotid.study import Study, StudyError, read_study, write_study

SID = "syn7_0000"
FINE = (0.75, 0.75, 3.0)
TRAINED_AT = [1.5, 1.5, 3.0]


@pytest.fixture(scope="module")
def study():
    return read_study(str(SAMPLE / f"{SID}.nii.gz"))


@pytest.fixture(scope="module")
def fine(study):
    """The same anatomy at 0.75 mm in-plane: SimpleITK linear resampling of the sample study onto a
    grid with its direction and field of view (built here, independently of parotid.model_space)."""
    ref = study.reference
    grid = sitk.Image([2 * ref.GetSize()[0], 2 * ref.GetSize()[1], ref.GetSize()[2]], sitk.sitkUInt8)
    grid.SetSpacing(FINE)
    grid.SetDirection(ref.GetDirection())
    shift = (np.array(FINE) - np.array(ref.GetSpacing())) / 2  # same outer voxel faces
    grid.SetOrigin(np.array(ref.GetOrigin()) + np.array(ref.GetDirection()).reshape(3, 3) @ shift)
    img = sitk.Resample(study.image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, study.image.GetPixelID())
    return Study(img, study.sequences)


@pytest.fixture(scope="module")
def roi():
    ds = json.loads((SAMPLE / "datastore_v2.json").read_text())
    return ds["objects"][SID]["labels"]["final"]["info"]["roi"]


def _net(spec, name):
    ck = torch.load(APP / "model" / f"{name}.pt", map_location="cpu", weights_only=True)
    net = build_network(spec, network_shape(ck))  # the architecture the file records
    net.load_state_dict(ck["model"])
    return net.eval(), checkpoint_spacing(ck)


def _on(arr, src, dst, interp=sitk.sitkNearestNeighbor):
    """(I, J, K) array on `src`'s grid -> `dst`'s grid (to compare two results on one grid)."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.T))
    img.CopyInformation(src)
    return sitk.GetArrayFromImage(sitk.Resample(img, dst, sitk.Transform(), interp, 0.0)).T


def _corners(roi, src, dst=None):
    """The 8 outer corners of a half-open voxel box on `src` as voxel-face coordinates of `dst`
    (default `src`): two boxes cover the same physical region when these agree."""
    dst = dst or src
    return np.array([np.array(dst.TransformPhysicalPointToContinuousIndex(
        src.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner]))) + 0.5
        for corner in itertools.product(*zip(roi[0::2], roi[1::2]))])


def test_shipped_segmentation_checkpoints_record_their_training_spacing():
    for name in ("segmentation", "contour_box"):
        ck = torch.load(APP / "model" / f"{name}.pt", map_location="cpu", weights_only=True)
        assert ck["spacing"] == TRAINED_AT, name


def test_box_maps_to_the_same_physical_region(study, fine, roi):
    grid = model_grid(fine.reference, TRAINED_AT)  # fine study -> model grid: the original grid back
    assert grid.GetSize() == study.reference.GetSize()
    assert np.allclose(grid.GetOrigin(), study.reference.GetOrigin(), atol=1e-3)
    roi_fine = map_roi(roi, study.reference, fine.reference)
    assert roi_fine == [2 * v for v in roi[:4]] + roi[4:]
    # same physical region: every corner on the target grid's faces (here: exact)
    assert np.abs(_corners(roi_fine, fine.reference) - _corners(roi, study.reference, fine.reference)).max() < 1e-4
    assert map_roi(roi_fine, fine.reference, grid) == roi  # and back
    # a box with odd fine-grid faces rounds each face to the nearest coarse face (ties outward)
    odd = [roi_fine[0] + 1, roi_fine[1] - 1, roi_fine[2] + 1, roi_fine[3] + 1, roi[4], roi[5]]
    coarse = map_roi(odd, fine.reference, grid)
    assert coarse == [roi[0], roi[1], roi[2], roi[3] + 1, roi[4], roi[5]]
    assert np.abs(_corners(coarse, grid) - _corners(odd, fine.reference, grid)).max() <= 0.5 + 1e-4  # half a voxel
    with pytest.raises(StudyError, match="outside"):  # bad twin: a box off the study grid
        map_roi([0, 999, 0, 10, 0, 2], study.reference, fine.reference)


def test_at_training_spacing_nothing_is_resampled_and_results_are_bit_identical(study, roi, tmp_path):
    assert not needs_resampling([1.5 * (1 + 0.9 * SPACING_RTOL), 1.5, 3.0], TRAINED_AT)
    assert needs_resampling([1.5 * (1 + 1.1 * SPACING_RTOL), 1.5, 3.0], TRAINED_AT)
    net, sp = _net(SEGMENTATION, "segmentation")
    label, space = segment_study(net, SEGMENTATION, study, sp)
    assert space.params == {"model_spacing": TRAINED_AT, "resampled": False} and space.model_study is study
    # the voxel-space path, with the same served left-right mirroring
    assert np.array_equal(label, segment(net, SEGMENTATION, study_input(study, SEGMENTATION), mirror_flips(study)))
    box, bsp = _net(CONTOUR_BOX, "contour_box")
    label, space = contour_study(box, CONTOUR_BOX, study, roi, bsp)
    assert not space.resampled
    assert np.array_equal(label, contour_in_box(box, CONTOUR_BOX, study_input(study, CONTOUR_BOX), roi))
    # classifier: the shipped (stamped) checkpoint gives exactly the result of an unstamped copy, and
    # stamping that copy gives the shipped checkpoint's config back
    shipped = APP / "model" / "classify_subtype.pt"
    ck = torch.load(shipped, map_location="cpu", weights_only=True)
    assert ck["config"].pop("spacing") == TRAINED_AT
    unstamped, stamped = tmp_path / "unstamped.pt", tmp_path / "stamped.pt"
    torch.save(ck, unstamped)
    shutil.copy(unstamped, stamped)
    assert stamp_spacing(str(stamped), TRAINED_AT) and not stamp_spacing(str(stamped), TRAINED_AT)  # idempotent
    assert load_checkpoint(str(stamped))[1] == load_checkpoint(str(shipped))[1]
    model, cfg = load_checkpoint(str(shipped))
    model0, cfg0 = load_checkpoint(str(unstamped))
    assert cfg == {**cfg0, "spacing": TRAINED_AT}
    r1, h1 = classify(model, cfg, study, roi)
    r0, h0 = classify(model0, cfg0, study, roi)
    assert (r1["model_spacing"], r1["resampled"]) == (TRAINED_AT, False)
    assert (r0["model_spacing"], r0["resampled"]) == (None, False)  # no spacing recorded: voxel space
    assert r1["prediction"] == r0["prediction"] and np.array_equal(h1, h0)


def _multipart(r):
    assert r.status_code == 200, r.text[:300]
    out = {}
    for p in decoder.MultipartDecoder(r.content, r.headers["content-type"]).parts:
        cd = p.headers.get(b"Content-Disposition", b"").decode()
        out["params" if 'name="params"' in cd else "image"] = p.content
    return json.loads(out["params"]), out.get("image")


def _infer(server, model, sid, tmp_path, params=None):
    r = requests.post(f"{server.url}/infer/{model}", params={"image": sid, "output": "all"},
                      data={"params": json.dumps(params or {})}, timeout=300)
    js, img = _multipart(r)
    path = tmp_path / f"{model}_{sid}.nii.gz"
    path.write_bytes(img)
    return js, sitk.ReadImage(str(path))


def test_same_anatomy_at_two_voxel_sizes_same_contour_over_the_server(server, study, fine, roi, tmp_path):
    fine_id = "model_space_fine_0p75mm"
    write_study(fine, str(tmp_path / f"{fine_id}.nii.gz"), as_int16=True)
    with open(tmp_path / f"{fine_id}.nii.gz", "rb") as f:
        r = requests.put(f"{server.url}/datastore/", params={"image": fine_id},
                         files={"file": (f"{fine_id}.nii.gz", f)}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    try:
        _compare_two_voxel_sizes(server, study, roi, fine_id, read_study(str(tmp_path / f"{fine_id}.nii.gz")).reference,
                                 tmp_path)
    finally:  # the session server is shared: leave no extra study behind
        requests.delete(f"{server.url}/datastore/", params={"id": fine_id}, timeout=60)


def _compare_two_voxel_sizes(server, study, roi, fine_id, fine_ref, tmp_path):
    # whole-study segmentation: results on each study's own grid, model at 1.5 x 1.5 x 3 mm
    js0, lab0 = _infer(server, "segmentation", SID, tmp_path)
    js1, lab1 = _infer(server, "segmentation", fine_id, tmp_path)
    assert (js0["model_spacing"], js0["resampled"]) == (TRAINED_AT, False)
    assert (js1["model_spacing"], js1["resampled"]) == (TRAINED_AT, True)
    assert lab1.GetSize() == fine_ref.GetSize() and np.allclose(lab1.GetSpacing(), FINE)
    a = sitk.GetArrayFromImage(lab0).T
    b = _on(sitk.GetArrayFromImage(lab1).T, lab1, lab0)
    assert dice(a == 1, b == 1) >= 0.90 and dice(a == 2, b == 2) >= 0.85, (dice(a == 1, b == 1), dice(a == 2, b == 2))
    v0, v1 = js0["volumes_ml"]["tumor"], js1["volumes_ml"]["tumor"]
    print(f"segmentation 1.5 vs 0.75 mm: Dice gland {dice(a == 1, b == 1):.3f} tumour {dice(a == 2, b == 2):.3f}, "
          f"tumour {v0} vs {v1} ml")
    assert abs(v1 - v0) <= 0.1 * v0, (v0, v1)
    # the index tumour's box is on the fine study's grid, over the same physical region
    assert np.abs(_corners(js1["tumor_roi"], fine_ref, study.reference)
                  - _corners(js0["tumor_roi"], study.reference)).max() <= 1.0  # voxels of the 1.5 mm grid
    # box-prompted contour: the same physical box on each grid
    roi_fine = map_roi(roi, study.reference, fine_ref)
    js0, lab0 = _infer(server, "contour_box", SID, tmp_path, {"roi": roi})
    js1, lab1 = _infer(server, "contour_box", fine_id, tmp_path, {"roi": roi_fine})
    assert js1["resampled"] and js1["roi"] == roi_fine
    a = sitk.GetArrayFromImage(lab0).T
    b = _on(sitk.GetArrayFromImage(lab1).T, lab1, lab0)
    print(f"contour_box 1.5 vs 0.75 mm: Dice {dice(a == 2, b == 2):.3f}")
    assert dice(a == 2, b == 2) >= 0.85, dice(a == 2, b == 2)


def test_same_anatomy_at_two_voxel_sizes_same_class(study, fine, roi, tmp_path):
    stamped = tmp_path / "classify_subtype.pt"
    shutil.copy(APP / "model" / "classify_subtype.pt", stamped)
    stamp_spacing(str(stamped), TRAINED_AT)
    model, cfg = load_checkpoint(str(stamped))
    roi_fine = map_roi(roi, study.reference, fine.reference)
    r0, h0 = classify(model, cfg, study, roi)
    r1, h1 = classify(model, cfg, fine, roi_fine)
    assert r1["resampled"] and r1["roi"] == roi_fine and r1["model_roi"] == roi
    assert h1.shape == fine.shape and abs(float(h1.max()) - 1.0) < 1e-6  # heatmap on the study's grid
    assert r1["predicted_class"] == r0["predicted_class"]
    p0 = np.array([p["score"] for p in r0["prediction"]])
    p1 = np.array([p["score"] for p in r1["prediction"]])
    assert np.abs(p1 - p0).max() <= 0.05, (p0, p1)
    # active-learning scoring runs the segmentation model at its spacing and classifies on the study grid
    sys.path.insert(0, str(APP))
    try:
        from lib.activelearning.uncertainty import score_study
    finally:
        sys.path.remove(str(APP))
    net, sp = _net(SEGMENTATION, "segmentation")
    scores = score_study(fine, net, model, cfg, sp)
    assert {"seg_tta_variance", "seg_tumour_tta_variance", "cls_entropy", "cls_margin", "cls_mc_std"} <= set(scores)


def test_trainers_record_the_training_spacing_and_resample_other_grids(fine, tmp_path):
    from parotid.classification.task_model import cohort_spacing
    from parotid.cohort import CohortItem
    from parotid.segmentation.train import _load, train

    items = [CohortItem(s, str(SAMPLE / f"{s}.nii.gz"), str(SAMPLE / "labels" / "final" / f"{s}.nii.gz"), None, None, {})
             for s in (SID, "syn7_0001", "syn7_0002")]
    # the 0.75 mm twin of syn7_0000 with its label on that grid
    write_study(fine, str(tmp_path / "fine.nii.gz"), as_int16=True)
    lab = sitk.Resample(sitk.ReadImage(items[0].label), fine.reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(lab, str(tmp_path / "fine_label.nii.gz"))
    items.append(CohortItem("fine", str(tmp_path / "fine.nii.gz"), str(tmp_path / "fine_label.nii.gz"), None, None, {}))
    assert cohort_spacing(it.image for it in items) == TRAINED_AT  # per-axis median: 3 of 4 at 1.5 mm
    data = _load(items, SEGMENTATION, TRAINED_AT)
    assert data[3][0].shape == data[0][0].shape  # the fine study was resampled to the training grid
    assert dice(data[3][1] == 1, data[0][1] == 1) > 0.95 and dice(data[3][1] == 2, data[0][1] == 2) > 0.9
    out = tmp_path / "segmentation.pt"
    train(SEGMENTATION, items, str(out), iterations=1, batch_size=1)
    assert torch.load(out, weights_only=True)["spacing"] == TRAINED_AT
