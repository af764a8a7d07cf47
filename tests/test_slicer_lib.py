"""CI tests of the Slicer-free package ParotidTumorLib (no 3D Slicer, no server needed).

Geometry is checked against SimpleITK's own index<->physical transforms (LPS), with the RAS<->LPS flip
done explicitly here, on oblique, flipped and anisotropic grids. Study files are checked against the
server's own ``parotid.study`` code. Multipart parsing is checked against the encoder the server uses.
"""

from __future__ import annotations

import ast
import http.server
import json
import math
import re
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import ParotidTumorLib as L
from conftest import rotation
from ParotidTumorLib import errors, geometry, labels, responses, results, sequences, study

REPO = Path(__file__).resolve().parents[1]
EXT = REPO / "slicer_extension"
MOD = EXT / "ParotidTumor"
LIB = MOD / "ParotidTumorLib"
FLIP = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- helpers
def make_image(size=(40, 32, 24), spacing=(0.7, 0.9, 3.3), direction=None, origin=(10.0, -20.0, 5.0), seed=0):
    rng = np.random.default_rng(seed)
    img = sitk.GetImageFromArray(rng.normal(100, 20, size[::-1]).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.eye(3).ravel()) if direction is None else tuple(np.asarray(direction, float).ravel()))
    return img


# Grids: axis-aligned, LPS-flipped (= RAS-aligned like many Slicer volumes), oblique, oblique + mirrored.
GRIDS = {
    "identity_lps": np.eye(3),
    "ras_aligned": FLIP,  # I -> +R, J -> +A: the I and J axes run against LPS
    "sagittal_flipped": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float),
    "oblique": rotation(0.3, -0.2, 0.5),
    "oblique_mirrored": rotation(-0.4, 0.25, 1.1) @ np.diag([1, -1, 1]),
}


def ras_of_index(img, idx):
    return FLIP @ np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx]))


def cont_index_of_ras(img, ras):
    return np.asarray(img.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in FLIP @ np.asarray(ras))))


# --------------------------------------------------------------------------- package hygiene
ALLOWED_TOP = {"numpy", "requests", "SimpleITK", "__future__"} | set(sys.stdlib_module_names)


MRML_BOUND = {"mrml.py": {"slicer", "vtk"}}  # needs Slicer's MRML (app or slicer-core wheel), nothing else


def test_lib_imports_only_allowed_modules():
    for py in LIB.glob("*.py"):
        allowed = ALLOWED_TOP | MRML_BOUND.get(py.name, set())
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] in allowed, f"{py.name} imports {n}"
    # the package itself never imports the MRML-bound module (Slicer-free import)
    assert "mrml" not in re.findall(r"\bfrom \. import ([\w, ]+)", (LIB / "__init__.py").read_text())[-1]


def test_lib_imports_without_slicer_or_parotid():
    """Import the package in a fresh interpreter where slicer/vtk/qt/ctk/parotid are unimportable."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'slicer','vtk','qt','ctk','parotid','monailabel','torch','requests_toolbelt'}:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ParotidTumorLib, ParotidTumorLib.results, ParotidTumorLib.labels, ParotidTumorLib.background\n"
        "import ParotidTumorLib.tasks, ParotidTumorLib.sampledata\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_sequence_table_matches_core():
    from parotid import sequences as core

    assert L.SEQUENCE_KEYS == core.SEQUENCE_KEYS
    assert sequences.DEFAULT_REFERENCE_ORDER == core.DEFAULT_REFERENCE_ORDER
    for mine, theirs in zip(sequences.SEQUENCES, core.SEQUENCES):
        assert (mine.key, mine.description, tuple(mine.patterns)) == (theirs.key, theirs.description, tuple(theirs.patterns))
    from parotid.synth.phantom import SERIES_DESCRIPTION

    for name in ["AX T2 STIR", "t1_vibe_post", "T1 CE", "ep2d_diff b0", "DWI b=1000", "ADC map", "T1 pre", "localizer",
                 "cet1", "t1 b0 gad", "DWI b_1000 adc", "b=0 t2", "t2 b0", *SERIES_DESCRIPTION.values()]:
        assert sequences.match_sequence(name) == core.match_sequence(name), name
    assert sequences.reference_key(["ADC", "T2"]) == core.reference_key(["ADC", "T2"]) == "T2"


def test_version_matches_core():
    """The Slicer lib's version (a Slicer-free copy) is the package's (pyproject.toml, installed)."""
    import parotid

    assert L.__version__ == parotid.__version__ != "unknown"


def test_segmentation_labels_match_core():
    """The Slicer lib's label values (a Slicer-free copy) are the server's (parotid.labels)."""
    from parotid import labels as core

    assert labels.SEGMENTATION_LABELS == core.SEGMENTATION_LABELS
    assert labels.SEGMENT_NAMES == {v: k for k, v in core.SEGMENTATION_LABELS.items() if v}
    assert set(labels.SEGMENT_COLORS) == set(labels.SEGMENT_NAMES)


def test_auto_assign_and_distinct_volumes():
    names = ["Localizer", "AX T2 STIR", "t1_vibe_post_gad", "T1 pre", "DWI b0", "DWI b1000", "ADC map"]
    got = sequences.auto_assign(names)
    assert got == {"T1": "T1 pre", "T2": "AX T2 STIR", "CET1": "t1_vibe_post_gad", "DWI_B0": "DWI b0",
                   "DWI_B1000": "DWI b1000", "ADC": "ADC map"}
    # only the keys a model needs
    assert sequences.auto_assign(names, keys=("CET1", "T2")) == {"T2": "AX T2 STIR", "CET1": "t1_vibe_post_gad"}
    # each volume at most once, even if it matches several patterns
    assert len(set(got.values())) == len(got)
    sequences.check_distinct({"T2": "vtkMRMLScalarVolumeNode1", "CET1": "vtkMRMLScalarVolumeNode2", "ADC": None})
    with pytest.raises(ValueError, match="same volume"):
        sequences.check_distinct({"T2": "vtkMRMLScalarVolumeNode1", "CET1": "vtkMRMLScalarVolumeNode1"})


# --------------------------------------------------------------------------- RAS <-> LPS
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_ijk_to_ras_matches_sitk(grid):
    img = make_image(direction=GRIDS[grid])
    m = geometry.ijk_to_ras_from_sitk(img)
    for idx in [(0, 0, 0), (39, 0, 0), (0, 31, 23), (12.5, 7.25, 3.0)]:
        np.testing.assert_allclose(m[:3, :3] @ idx + m[:3, 3], ras_of_index(img, idx), atol=1e-9)
    # and back: Slicer array + IJK->RAS -> identical SimpleITK image
    arr, m2 = geometry.array_from_image(img)
    back = geometry.image_from_array(arr, m2)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_image_from_slicer_style_matrix():
    """A volume as Slicer holds it (IJK->RAS with I -> R-, J -> A+ ...) lands at the same physical
    points in SimpleITK (LPS) -- checked voxel by voxel with TransformIndexToPhysicalPoint."""
    m = np.eye(4)
    m[:3, :3] = np.array([[-0.8, 0, 0], [0, 0, 3.0], [0, 0.8, 0]])  # coronal slices, I to the right->left
    m[:3, 3] = [50.0, -10.0, 20.0]
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # [k, j, i]
    img = geometry.image_from_array(arr, m)
    for i, j, k in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = img.TransformIndexToPhysicalPoint((i, j, k))
        np.testing.assert_allclose(FLIP @ np.asarray(lps), m[:3, :3] @ [i, j, k] + m[:3, 3], atol=1e-9)
        assert img[i, j, k] == arr[k, j, i]
    with pytest.raises(ValueError, match="sheared"):
        bad = m.copy()
        bad[0, 1] = 0.5
        geometry.image_from_array(arr, bad)


# --------------------------------------------------------------------------- ROI -> voxel box
def expected_box_via_sitk(img, center, size, axes):
    """Reference implementation through SimpleITK's TransformPhysicalPointToContinuousIndex."""
    corners = geometry.roi_corners_ras(center, size, axes)
    ci = np.array([cont_index_of_ras(img, c) for c in corners])
    lo, hi = ci.min(0), ci.max(0)
    box = []
    for a in range(3):
        i0 = max(math.floor(round(lo[a] + 0.5, 6)), 0)
        i1 = min(math.ceil(round(hi[a] + 0.5, 6)), img.GetSize()[a])
        box += [i0, i1]
    return box


ROIS = {
    "axis_aligned": (np.eye(3), (14.0, 11.0, 20.0)),
    "rotated_roi": (rotation(0.2, 0.4, -0.7), (12.0, 9.0, 15.0)),
    "thin_roi": (rotation(0.0, 0.0, 0.9), (20.0, 2.0, 7.0)),
}


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("roi", sorted(ROIS))
def test_roi_to_box_matches_sitk(grid, roi):
    img = make_image(direction=GRIDS[grid])
    axes, size = ROIS[roi]
    ras_to_ijk = np.linalg.inv(geometry.ijk_to_ras_from_sitk(img))
    center = ras_of_index(img, (18.3, 14.6, 11.2))
    box = geometry.roi_to_box(center, size, ras_to_ijk, img.GetSize(), axes)
    assert box == expected_box_via_sitk(img, center, size, axes)
    assert all(box[2 * a] < box[2 * a + 1] for a in range(3)), box  # sorted, non-empty
    # the server accepts it
    from parotid.study import check_roi

    check_roi(box, img.GetSize())
    # every voxel whose centre lies inside the oriented ROI is inside the box
    corners = geometry.roi_corners_ras(center, size, axes)
    lo_ijk = np.floor(np.min([cont_index_of_ras(img, c) for c in corners], 0)).astype(int) - 1
    hi_ijk = np.ceil(np.max([cont_index_of_ras(img, c) for c in corners], 0)).astype(int) + 2
    inside = 0
    for i in range(max(lo_ijk[0], 0), min(hi_ijk[0], img.GetSize()[0])):
        for j in range(max(lo_ijk[1], 0), min(hi_ijk[1], img.GetSize()[1])):
            for k in range(max(lo_ijk[2], 0), min(hi_ijk[2], img.GetSize()[2])):
                local = axes.T @ (ras_of_index(img, (i, j, k)) - center)
                if np.all(np.abs(local) <= np.asarray(size) / 2):
                    inside += 1
                    assert box[0] <= i < box[1] and box[2] <= j < box[3] and box[4] <= k < box[5]
    assert inside > 0


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_grid_aligned_roi_is_exact(grid):
    """An ROI whose faces lie on voxel faces covers exactly those voxels (box_to_roi round trip)."""
    img = make_image(direction=GRIDS[grid])
    m = geometry.ijk_to_ras_from_sitk(img)
    box = [3, 17, 5, 9, 2, 11]
    center, size, axes = geometry.box_to_roi(box, m)
    assert np.linalg.det(axes) > 0  # a proper rotation for Slicer's markups ROI
    np.testing.assert_allclose(size, [14 * 0.7, 4 * 0.9, 9 * 3.3], atol=1e-9)
    assert geometry.roi_to_box(center, size, np.linalg.inv(m), img.GetSize(), axes) == box
    # centre of the box = centre of its voxel range, via SimpleITK
    np.testing.assert_allclose(center, ras_of_index(img, (9.5, 6.5, 6.0)), atol=1e-9)


def test_roi_clipping_and_outside():
    img = make_image(direction=GRIDS["oblique"])
    m = geometry.ijk_to_ras_from_sitk(img)
    inv = np.linalg.inv(m)
    center = ras_of_index(img, (0, 0, 0))
    box = geometry.roi_to_box(center, (10, 10, 10), inv, img.GetSize())
    assert box[0] == box[2] == box[4] == 0 and min(box[1], box[3], box[5]) > 0
    far = ras_of_index(img, (-100, -100, -100))
    with pytest.raises(ValueError, match="outside the reference image"):
        geometry.roi_to_box(far, (10, 10, 10), inv, img.GetSize())
    with pytest.raises(ValueError, match="non-negative"):
        geometry.roi_to_box(center, (-1, 10, 10), inv, img.GetSize())


def two_corner_box(center_ras, size, ras_to_ijk):
    """What MONAI Label's stock Slicer plugin does (for comparison): map the RAS-min and
    RAS-max corners, no sorting. On a grid whose I or J axis points to -R/-A it gives ``i0 > i1``."""
    c = np.asarray(center_ras, dtype=float)
    s = np.asarray(size, dtype=float)
    m = np.asarray(ras_to_ijk, dtype=float).reshape(4, 4)
    p0 = m[:3, :3] @ (c - s / 2) + m[:3, 3]
    p1 = m[:3, :3] @ (c + s / 2) + m[:3, 3]
    return [int(round(p0[0])), int(round(p1[0])), int(round(p0[1])), int(round(p1[1])), int(round(p0[2])), int(round(p1[2]))]


def test_two_corner_method_breaks_on_flipped_axes():
    """Why all 8 corners + sorting: the stock plugin's 2-corner mapping inverts the box on a grid whose
    I axis points to R- (every LPS-aligned volume); ours stays ordered and equals the SimpleITK box."""
    img = make_image(direction=GRIDS["identity_lps"])
    inv = np.linalg.inv(geometry.ijk_to_ras_from_sitk(img))
    center, size = ras_of_index(img, (20, 16, 12)), (10.0, 8.0, 12.0)
    stock = two_corner_box(center, size, inv)
    assert stock[0] > stock[1] and stock[2] > stock[3]  # inverted on I and J
    ours = geometry.roi_to_box(center, size, inv, img.GetSize())
    assert ours == expected_box_via_sitk(img, center, size, np.eye(3))
    assert ours[0] < ours[1] and ours[2] < ours[3]


# --------------------------------------------------------------------------- study assembly
def per_sequence_volumes():
    """Per-sequence volumes as Slicer holds them (array [k,j,i] + IJK->RAS), each with its own grid."""
    ref = make_image(size=(36, 30, 12), spacing=(0.6, 0.6, 3.0), direction=GRIDS["ras_aligned"], seed=1)
    t2 = make_image(size=(30, 26, 10), spacing=(0.75, 0.8, 3.5), direction=rotation(0.05, 0.0, 0.1) @ FLIP,
                    origin=(-9.0, -7.0, 4.0), seed=2)
    adc = make_image(size=(16, 14, 8), spacing=(1.6, 1.6, 4.0), direction=GRIDS["oblique"], origin=(-12.0, -3.0, 0.0), seed=3)
    vols = {}
    for key, img in {"CET1": ref, "T2": t2, "ADC": adc}.items():
        arr, m = geometry.array_from_image(img)
        vols[key] = (arr, m)
    return vols


def test_study_assembly_matches_core(tmp_path):
    from parotid import study as core

    vols = per_sequence_volumes()
    imgs = {k: geometry.image_from_array(a, m) for k, (a, m) in vols.items()}
    mine, keys = study.assemble(imgs)
    theirs = core.assemble_study(imgs)
    assert keys == theirs.sequences == ("T2", "CET1", "ADC")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mine), sitk.GetArrayFromImage(theirs.image))
    assert core.same_grid(mine, theirs.image, tol=0)
    # the reference grid is the CE-T1 volume's grid, in Slicer terms too
    np.testing.assert_allclose(geometry.ijk_to_ras_from_sitk(mine), vols["CET1"][1], atol=1e-9)
    # the file is a valid server study file with the right descrip
    path = str(tmp_path / "case.nii.gz")
    study.write(mine, keys, path)
    assert study.read_descrip(path) == keys
    st = core.read_study(path)
    assert st.sequences == keys
    np.testing.assert_allclose(st.array(["CET1"])[0], vols["CET1"][0].transpose(2, 1, 0), atol=1e-4)


def test_study_assembly_errors():
    vols = per_sequence_volumes()
    imgs = {k: geometry.image_from_array(a, m) for k, (a, m) in vols.items()}
    with pytest.raises(study.StudyInputError, match="at least one"):
        study.assemble({})
    with pytest.raises(study.StudyInputError, match="unknown sequence"):
        study.assemble({"FLAIR": imgs["T2"]})
    flat = sitk.GetImageFromArray(np.zeros((1, 10, 10), np.float32))
    with pytest.raises(study.StudyInputError, match="not 3D"):
        study.assemble({"T2": flat})
    nan = sitk.GetArrayFromImage(imgs["ADC"])
    nan[0, 0, 0] = np.nan
    with pytest.raises(study.StudyInputError, match="NaN"):
        study.assemble({"ADC": sitk.GetImageFromArray(nan)})
    with pytest.raises(study.StudyInputError, match="reference sequence"):
        study.assemble({"T2": imgs["T2"]}, reference="CET1")


def test_study_id_and_label_map(tmp_path):
    img = make_image()
    a = study.make_study_id("Case 7 (CE-T1)", img)
    assert re.fullmatch(r"case-7-ce-t1-[0-9a-f]{8}", a)
    assert study.make_study_id("Case 7 (CE-T1)", img) == a
    assert study.make_study_id("Case 7 (CE-T1)", make_image(seed=5)) != a
    m = geometry.ijk_to_ras_from_sitk(make_image(direction=GRIDS["oblique"]))
    lab = np.zeros((24, 32, 40), np.uint8)
    lab[4:9, 10:20, 5:15] = 1
    lab[5:7, 12:15, 8:11] = 2
    assert labels.roi_from_label(lab) == [8, 11, 12, 15, 5, 7]
    assert labels.roi_from_label(np.zeros_like(lab)) is None
    path = labels.write_label_map(lab, m, str(tmp_path / "lab.nii.gz"))
    back = sitk.ReadImage(path)
    assert back.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(geometry.ijk_to_ras_from_sitk(back), m, atol=1e-5)
    with pytest.raises(ValueError, match="allowed"):
        labels.write_label_map(lab + 5, m, str(tmp_path / "bad.nii.gz"))


# --------------------------------------------------------------------------- responses
def _nifti_bytes(tmp_path, img):
    p = str(tmp_path / "h.nii.gz")
    sitk.WriteImage(img, p, useCompression=True)
    return open(p, "rb").read()


ADVERSARIAL = [
    b"",
    b"\r\n",
    b"--\r\n--",
    b"\r\n\r\n--not-the-boundary\r\n",
    bytes(range(256)) * 3,
    b"ends with cr\r",
]


@pytest.mark.parametrize("payload", ADVERSARIAL + [np.random.default_rng(7).bytes(50000)])
def test_multipart_roundtrip_with_server_encoder(payload):
    from requests_toolbelt import MultipartDecoder, MultipartEncoder

    params = {"predicted_class": "warthin", "prediction": [{"idx": 1, "label": "warthin", "score": 0.8}]}
    enc = MultipartEncoder(fields={"params": (None, json.dumps(params), "application/json"),
                                   "image": ("heat map.nii.gz", payload, "application/octet-stream")})
    body = enc.to_string()
    resp = responses.parse_infer_response(body, enc.content_type)
    assert resp.params == params
    assert resp.image == payload and resp.image_name == "heat map.nii.gz"
    # cross-check with requests_toolbelt's decoder
    dec = MultipartDecoder(body, enc.content_type)
    assert [p.content for p in dec.parts] == [json.dumps(params).encode(), payload]


def test_parse_json_only_and_bare_image(tmp_path):
    p = {"prediction": [{"idx": 0, "label": "benign", "score": 0.3}, {"idx": 1, "label": "malignant", "score": 0.7}],
         "predicted_class": "malignant", "malignancy_probability": 0.7, "undetermined": False, "model": "classify_malignancy"}
    r = responses.parse_infer_response(json.dumps(p).encode(), "application/json")
    assert r.params == p and not r.has_image
    c = results.ClassificationResult.from_response(r)
    assert c.predicted_class == "malignant" and c.heatmap is None
    assert [row[0] for row in c.table_rows()] == ["malignant", "benign"]
    assert "malignancy probability 70 %" in c.summary()
    img = make_image(direction=GRIDS["oblique"])
    raw = _nifti_bytes(tmp_path, img)
    r2 = responses.parse_infer_response(raw, "application/gzip")
    vol = results.ResultVolume.from_bytes(r2.image, r2.image_name)
    assert vol.shape_ijk == img.GetSize()
    assert vol.matches(img.GetSize(), geometry.ijk_to_ras_from_sitk(img))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img))


def test_multipart_errors_and_quoted_boundary():
    body = b'--abc\r\ncontent-disposition: form-data; name="params"\r\n\r\n{}\r\n--abc--\r\n'
    assert responses.parse_infer_response(body, 'multipart/form-data; boundary="abc"').params == {}
    with pytest.raises(responses.ResponseFormatError, match="truncated"):
        responses.parse_multipart(body[:-9], "multipart/form-data; boundary=abc")
    with pytest.raises(responses.ResponseFormatError, match="boundary"):
        responses.parse_multipart(body, "multipart/form-data")
    with pytest.raises(responses.ResponseFormatError, match="JSON"):
        responses.parse_infer_response(b"<html>oops</html>", "application/json")
    with pytest.raises(responses.ResponseFormatError, match="not a classification"):
        results.ClassificationResult.from_params({"label": "x"})
    with pytest.raises(responses.ResponseFormatError, match="cannot be read"):
        results.ResultVolume.from_bytes(b"garbage", "x.nii.gz")


def test_classification_result_fields():
    p = {"prediction": [{"idx": 0, "label": "pleomorphic_adenoma", "score": 0.2},
                        {"idx": 1, "label": "warthin", "score": 0.45},
                        {"idx": 2, "label": "basal_cell_adenoma", "score": 0.05},
                        {"idx": 3, "label": "malignant", "score": 0.3}],
         "predicted_class": "warthin", "malignancy_probability": 0.3, "undetermined": True,
         "model": "classify_subtype", "version": "0.1", "roi": [1, 5, 2, 6, 0, 3], "label_set": "subtype4"}
    c = results.ClassificationResult.from_params(p)
    assert c.prediction[0]["label"] == "warthin" and c.roi == [1, 5, 2, 6, 0, 3] and c.undetermined
    assert c.table_rows()[0] == ("warthin", "45.0 %", "predicted")
    assert "UNDETERMINED" in c.summary() and "classify_subtype 0.1" in c.summary()
    assert "Sequences" not in c.summary()  # an older server's answer has no sequence report
    assert "low confidence" in c.summary()  # an older server gives no reasons


def test_undetermined_result_says_why_and_commissioned_site_is_named():
    """The radiologist reads WHY a result is undetermined (the server's reasons, not a generic "low confidence"),
    and, when the images were accepted through a commissioned site (docs/input-check.md), which site."""
    base = {"prediction": [{"idx": 0, "label": "benign", "score": 0.9}, {"idx": 1, "label": "malignant", "score": 0.1}],
            "predicted_class": "benign", "model": "classify_malignancy"}
    why = "intensity statistics unlike the training cohort (Mahalanobis distance): ADC (40.1 > 12.0)" + " x" * 100
    und = results.ClassificationResult.from_params({**base, "undetermined": True,
                                                    "undetermined_reasons": [why, "no tumour found in the box"]})
    text = und.summary()
    assert "UNDETERMINED" in text and "intensity statistics unlike the training cohort" in text
    assert "no tumour found in the box" in text and "low confidence" not in text
    assert len(und.undetermined_text) < 2 * results.MAX_REASON_CHARS  # one line, not the server's full detail
    site = {"passed": True, "score": 0.4, "threshold": 1.0, "reference": "site:siteB_1.5T"}
    ok = results.ClassificationResult.from_params({**base, "undetermined": False,
                                                   "input_check": {"components": {"intensity": site}}})
    assert "commissioned site siteB_1.5T" in ok.summary() and "UNDETERMINED" not in ok.summary()
    training = {**site, "reference": "training"}
    assert L.input_check_summary({"input_check": {"components": {"intensity": training}}}) == ""
    failed = {**site, "passed": False}
    assert L.input_check_summary({"input_check": {"components": {"intensity": failed}}}) == ""


def test_result_text_names_sequences_and_expected_performance():
    p = {"prediction": [{"idx": 0, "label": "benign", "score": 0.7}, {"idx": 1, "label": "malignant", "score": 0.3}],
         "predicted_class": "benign", "undetermined": True, "model": "classify_malignancy",
         "sequences_used": ["T2", "DWI_B1000", "ADC"], "sequences_missing": ["CET1"],
         "expected_performance": {"validated": True, "subset": "no_CET1", "measured_with": ["T2", "DWI_B1000", "ADC"],
                                  "n": 72, "synthetic": True,
                                  "metrics": {"roc_auc": [0.71, 0.58, 0.83], "undetermined_rate": 0.1}}}
    c = results.ClassificationResult.from_params(p)
    assert c.sequences_used == ["T2", "DWI_B1000", "ADC"] and c.sequences_missing == ["CET1"]
    text = c.summary()
    assert "Sequences used: T2, DWI_B1000, ADC; MISSING: CET1" in text
    assert "ROC-AUC (benign/malignant) 0.71 (0.58-0.83)" in text and "SYNTHETIC validation, n = 72" in text
    seg = {"sequences_used": ["T1", "T2", "CET1", "DWI_B0", "DWI_B1000", "ADC"], "sequences_missing": [],
           "expected_performance": {"validated": True, "measured_with": ["T1", "T2"], "n": 30,
                                    "metrics": {"dice_tumor": [0.8, 0.75, 0.85], "dice_gland": [0.9, 0.88, 0.92]}}}
    text = L.sequences_summary(seg)
    assert "none missing" in text and "Dice tumour 0.80 (0.75-0.85); Dice gland 0.90" in text
    stale = {**seg, "expected_performance": {"validated": False, "reason": "measured for another checkpoint"}}
    assert "not validated (measured for another checkpoint)" in L.sequences_summary(stale)
    assert L.sequences_summary({"volumes_ml": {}}) == ""
    assert "weights for incomplete studies" not in text  # complete study: the full-sequence weights
    t2_only = {**seg, "sequences_used": ["T2"], "sequences_missing": ["T1", "CET1", "DWI_B0", "DWI_B1000", "ADC"],
               "weights": "incomplete"}
    assert "MISSING: T1, CET1" in L.sequences_summary(t2_only)
    assert "segmented with the model's weights for incomplete studies" in L.sequences_summary(t2_only)


# --------------------------------------------------------------------------- errors
def test_detail_and_user_messages():
    assert errors.detail_from_body(b'{"detail": "roi is inverted on axis i"}') == "roi is inverted on axis i"
    v = json.dumps({"detail": [{"loc": ["query", "image"], "msg": "field required", "type": "missing"}]})
    assert errors.detail_from_body(v) == "image: field required"
    assert errors.detail_from_body(b"Internal Server Error") == "Internal Server Error"
    m = errors.user_message
    assert "log in" in m(401, "Not authenticated")
    assert "not allowed" in m(403, "Forbidden")
    assert "Upload the study" in m(404, "Image NOT Found")
    assert "does not offer this model" in m(404, "Infer Task NOT Found: foo")
    assert "training run is already in progress" in m(429, "Training already running") == m(429, "Training already running")
    assert "training run is in progress" in m(409, "model not trained yet")
    assert m(422, "roi is empty on axis k", "Classify tumour").startswith("Classify tumour: the server rejected the input: roi is empty on axis k")
    assert "server failed (HTTP 500)" in m(500, "boom")
    assert errors.connection_message("http://x:1", "connection refused") == (
        "Cannot reach server at http://x:1 (connection refused). Check the address and that the MONAI Label server is running.")


class _Stub(http.server.BaseHTTPRequestHandler):
    """A loopback HTTP endpoint replying with a fixed status + FastAPI-style body (tests the mapping
    of real HTTP responses; the real server is exercised in test_slicer_lib_server.py)."""

    status, body = 200, b"{}"

    def _reply(self):
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = do_PUT = _reply

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("status,detail,expect", [
    (401, "Not authenticated", "log in"),
    (403, "Forbidden", "not allowed"),
    (404, "Image NOT Found", "Upload the study"),
    (429, "Training already running", "already in progress"),
    (422, "roi is inverted on axis j: j1=3 < j0=9", "roi is inverted on axis j"),
    (503, "model loading", "HTTP 503"),
])
def test_client_maps_http_errors(stub, status, detail, expect):
    _Stub.status, _Stub.body = status, json.dumps({"detail": detail}).encode()
    c = L.ParotidClient(f"http://127.0.0.1:{stub.server_address[1]}")
    with pytest.raises(L.ServerError) as e:
        c.infer("classify_subtype", "case", {"roi": [0, 1, 0, 1, 0, 1]}, what="Classify tumour")
    assert e.value.status == status and e.value.detail == detail
    assert expect in str(e.value) and str(e.value).startswith("Classify tumour: ")


def test_client_connection_refused_and_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = L.ParotidClient(f"127.0.0.1:{port}/")
    assert c.server_url == f"http://127.0.0.1:{port}"
    with pytest.raises(L.ServerError, match=rf"Cannot reach server at http://127.0.0.1:{port}") as e:
        c.info()
    assert e.value.status is None
    with pytest.raises(ValueError):
        L.normalize_url("  ")


def test_training_progress():
    assert L.training_progress(None)["running"] is False
    p = L.training_progress({"status": "RUNNING", "details": ["Epoch: 3/10, loss 0.4"]})
    assert p["running"] and p["fraction"] == pytest.approx(0.3) and "Epoch: 3/10" in p["text"]
    assert L.training_progress({"status": "DONE", "details": []})["fraction"] == 1.0


# --------------------------------------------------------------------------- the Slicer extension files
def test_extension_cmake_lists_every_script_and_resource():
    top = (EXT / "CMakeLists.txt").read_text()
    for var in ["EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"]:
        assert re.search(rf"set\({var}\s", top), var
    assert "find_package(Slicer REQUIRED)" in top and "include(${Slicer_USE_FILE})" in top
    assert "add_subdirectory(ParotidTumor)" in top and "include(${Slicer_EXTENSION_CPACK})" in top
    mod = (MOD / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in mod
    listed = set(re.findall(r"^\s+([\w/${}.\-]+\.(?:py|png|ui|txt|json))\s*$", mod, re.M))
    listed = {x.replace("${MODULE_NAME}", "ParotidTumor") for x in listed}
    on_disk = {str(p.relative_to(MOD)) for p in MOD.rglob("*") if p.is_file()
               and p.suffix in (".py", ".png", ".ui", ".json", ".txt") and "__pycache__" not in p.parts
               and p.name != "CMakeLists.txt" and "Testing" not in p.parts}
    assert on_disk and on_disk == listed, (sorted(on_disk - listed), sorted(listed - on_disk))


def test_extension_urls_resolve_in_the_extension_repository():
    """The extension is published as its own repository (slicer_extension/ is its root): the icon and
    screenshot URLs must point at files inside it, and it needs its LICENSE (ExtensionsIndex checks)."""
    top = (EXT / "CMakeLists.txt").read_text()
    urls = re.search(r'set\(EXTENSION_ICONURL "([^"]+)"\)', top).group(1).split()
    urls += re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]+)"\)', top).group(1).split()
    entry = json.loads((EXT / "ParotidTumor.json").read_text())
    repo = entry["scm_url"].replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert len(urls) >= 3
    for url in urls:
        prefix = f"{repo}/{entry['scm_revision']}/"
        assert url.startswith(prefix), url
        path = EXT / url[len(prefix):]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
    for lic in (EXT / "LICENSE", REPO / "LICENSE"):
        text = lic.read_text()
        assert "Apache License" in text and "Version 2.0, January 2004" in text, lic
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


def test_synthetic_sample_case(tmp_path):
    """The generated sample case (SampleData source of the in-Slicer offline test): files per sequence
    with the case's geometry, a label with gland and tumour."""
    from ParotidTumorLib import sampledata

    paths = sampledata.write_case(str(tmp_path))
    vols, label, m = sampledata.case()
    assert set(paths) == set(vols) | {"label"} and set(np.unique(label)) == {0, 1, 2}
    for key, path in paths.items():
        img = sitk.ReadImage(path)
        arr, mm = L.array_from_image(img)
        np.testing.assert_allclose(mm, m, atol=1e-5)
        np.testing.assert_array_equal(arr, label if key == "label" else vols[key])
    assert sampledata.write_case(str(tmp_path)) == paths  # cached: written once


def test_catalog_entry_follows_extensions_index_schema():
    entry = json.loads((EXT / "ParotidTumor.json").read_text())
    # Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json: required + additionalProperties=false
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert isinstance(entry["build_dependencies"], list) and 1 <= entry.get("tier", 1) <= 5


def test_module_file_structure():
    src = (MOD / "ParotidTumor.py").read_text()
    tree = ast.parse(src)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, base in [("ParotidTumor", "ScriptedLoadableModule"), ("ParotidTumorWidget", "ScriptedLoadableModuleWidget"),
                       ("ParotidTumorLogic", "ScriptedLoadableModuleLogic"), ("ParotidTumorTest", "ScriptedLoadableModuleTest")]:
        assert name in classes and base in [getattr(b, "id", None) for b in classes[name].bases], name
    pn = classes["ParotidTumorParameterNode"]
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in pn.decorator_list)
    # every self.ui.<name> used by the widget exists in the .ui file, and the .ui is well formed
    ui = ET.parse(MOD / "Resources" / "UI" / "ParotidTumor.ui").getroot()
    names = {w.get("name") for w in ui.iter("widget")} | {w.get("name") for w in ui.iter("layout")}
    used = set(re.findall(r"self\.ui\.(\w+)", src))
    assert used and used <= names, sorted(used - names)
    # parameterNodeWrapper bindings point at parameter names that exist
    params = {t.target.id for t in pn.body if isinstance(t, ast.AnnAssign)}
    bound = {p.find("string").text for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= params, sorted(bound - params)


def test_icon_is_a_real_png():
    data = (MOD / "Resources" / "Icons" / "ParotidTumor.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    im = Image.open(MOD / "Resources" / "Icons" / "ParotidTumor.png")
    assert im.size[0] == im.size[1] >= 64 and len(im.convert("RGB").getcolors(maxcolors=1 << 16)) > 20


class _AuthStub(http.server.BaseHTTPRequestHandler):
    """Loopback endpoint behaving like MONAI Label with auth enabled: /auth/ says enabled, /auth/token
    hands out a token for the right password, /info/ needs the bearer token."""

    seen = []

    def _send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        _AuthStub.seen.append((self.path, self.headers.get("authorization")))
        if self.path.startswith("/auth/"):
            return self._send(200, {"enabled": True, "client_id": "monailabel-app", "realm": "x"})
        if self.headers.get("authorization") != "Bearer tok123":
            return self._send(401, {"detail": "Not authenticated"})
        return self._send(200, {"name": "Parotid MRI", "models": {}})

    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        form = dict(p.split("=", 1) for p in self.rfile.read(n).decode().split("&"))
        if self.path == "/auth/token" and form.get("password") == "secret":
            return self._send(200, {"access_token": "tok123", "token_type": "bearer"})
        return self._send(401, {"detail": "Incorrect username or password"})

    def log_message(self, *a):
        pass


def test_client_login_sends_bearer_token():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthStub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = L.ParotidClient(f"http://127.0.0.1:{srv.server_address[1]}")
        assert c.auth_enabled() is True
        with pytest.raises(L.ServerError, match="log in") as e:
            c.info()
        assert e.value.status == 401
        with pytest.raises(L.ServerError) as e:
            c.login("radiologist", "wrong")
        assert e.value.status == 401 and c.token is None
        assert c.login("radiologist", "secret") == "tok123"
        assert c.info()["name"] == "Parotid MRI"
        assert _AuthStub.seen[-1] == ("/info/", "Bearer tok123")
    finally:
        srv.shutdown()
        srv.server_close()


STUB_SLICER_CONFIG = r"""
# Minimal stand-in for Slicer's SlicerConfig.cmake: just enough to configure the extension and to
# check the arguments of the Slicer macros it calls (every listed script/resource must exist).
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
  endif()
  foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "listed file does not exist: ${f}")
    endif()
    message(STATUS "PAROTID_LISTED ${f}")
  endforeach()
  message(STATUS "PAROTID_MODULE ${MY_NAME}")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  message(STATUS "PAROTID_UNITTEST ${MY_SCRIPT}")
endmacro()
"""


def test_extension_configures_with_cmake(tmp_path):
    """Configure slicer_extension/ with CMake against a stub Slicer: CMake syntax, macro arguments and
    every listed file are checked (a real build needs a Slicer build tree, not available in CI)."""
    import shutil as _sh

    cmake = _sh.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text("set(BUILD_TESTING ON)\n")
    (stub / "Empty.cmake").write_text("")
    out = subprocess.run([cmake, "-S", str(EXT), "-B", str(tmp_path / "build"), f"-DSlicer_DIR={stub}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    listed = set(re.findall(r"PAROTID_LISTED (\S+)", out.stdout))
    assert "ParotidTumor.py" in listed and "Resources/UI/ParotidTumor.ui" in listed
    assert "PAROTID_MODULE ParotidTumor" in out.stdout and "PAROTID_UNITTEST ParotidTumor.py" in out.stdout
