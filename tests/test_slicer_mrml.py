"""The module's MRML-bound logic (ParotidTumorLib.mrml) on REAL Slicer code: the ``slicer-core`` wheel
(test extra; Slicer 5.13's MRML, Markups, Segmentations, Volumes, Colors, Subject hierarchy).

Nothing of MRML is faked: the scene, nodes, transforms, markups ROI and segmentation logic are
Slicer's own C++ classes. What the wheel lacks is Slicer's *application* (Qt, slicer.app, module
widgets); the fixture below does by hand, with the same real classes, what the application's module
setup would do (singleton selection/interaction nodes, module logics attached to the scene,
segmentation converter rules). No qt/ctk is needed here at all; ``test_slicer_mrml_module.py``
imports ParotidTumor.py itself with qt/ctk stubbed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # slicer-core wheel (pinned in the test extra of pyproject.toml)
import slicer.util as sutil
import vtk

import ParotidTumorLib as L
from conftest import rotation
from ParotidTumorLib import geometry, mrml, sequences

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "sample-data" / "studies"
INDEX = json.loads((STUDIES / "datastore_v2.json").read_text())["objects"]
SAMPLE_IDS = sorted(INDEX)


def _register_segmentation_converters():
    """What qSlicerSegmentationsModule::setup() does in the app: register the converter rules."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules() or factory.GetConverterRules().__len__() == 0:
        for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                     slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
            factory.RegisterConverterRule(rule())


def new_scene(markups_logic=True):
    """A real vtkMRMLScene set up like the app's: singleton nodes + module logics on the scene."""
    _register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    for cls in ("vtkMRMLSelectionNode", "vtkMRMLInteractionNode"):
        n = scene.CreateNodeByClass(cls)
        n.SetSingletonTag("Singleton")
        scene.AddNode(n)
    logics = [slicer.vtkSlicerSubjectHierarchyModuleLogic(), slicer.vtkSlicerVolumesLogic(),
              slicer.vtkSlicerSegmentationsModuleLogic()]
    if markups_logic:
        logics.append(slicer.vtkSlicerMarkupsLogic())
    for lg in logics:
        lg.SetMRMLScene(scene)
    scene._parotid_logics = logics  # keep them alive with the scene
    return scene


@pytest.fixture
def scene():
    s = new_scene()
    yield s
    s.Clear(1)


def volume(scene, shape_ijk, ijk_to_ras, name="ref", array=None):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    arr = np.zeros(tuple(shape_ijk)[::-1], np.uint8) if array is None else array
    sutil.updateVolumeFromArray(node, arr)
    node.SetIJKToRASMatrix(sutil.vtkMatrixFromArray(np.asarray(ijk_to_ras, float)))
    return node


def study_geometry(sid):
    """(shape IJK, IJK->RAS) of a sample study, from its header only (fast)."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(STUDIES / f"{sid}.nii.gz"))
    r.ReadImageInformation()
    return r.GetSize()[:3], geometry.ijk_to_ras_from_lps(r.GetSpacing()[:3], np.asarray(r.GetDirection()).reshape(
        len(r.GetSize()), len(r.GetSize()))[:3, :3].ravel(), r.GetOrigin()[:3])


def voxel_centre_world(reference, ijk):
    return (mrml.world_ijk_to_ras(reference) @ np.r_[np.asarray(ijk, float), 1.0])[:3]


def check_roi_against_mrml(roi, reference, box):
    """MRML's own IsPointInROIWorld agrees with the box: the voxel centres on the box's faces are in
    the ROI, those one voxel outside are not (on every face)."""
    i0, i1, j0, j1, k0, k1 = box
    lo, hi = np.array([i0, j0, k0]), np.array([i1 - 1, j1 - 1, k1 - 1])
    mid = (lo + hi) // 2
    for axis in range(3):
        for inside, outside in ((lo[axis], lo[axis] - 1), (hi[axis], hi[axis] + 1)):
            p_in, p_out = mid.copy(), mid.copy()
            p_in[axis], p_out[axis] = inside, outside
            assert roi.IsPointInROIWorld(voxel_centre_world(reference, p_in)), (axis, p_in)
            assert not roi.IsPointInROIWorld(voxel_centre_world(reference, p_out)), (axis, p_out)


# --------------------------------------------------------------------------- ROI <-> box (bug a)
def test_world_ijk_to_ras_matches_mrml(scene):
    shape, m = study_geometry(SAMPLE_IDS[0])
    ref = volume(scene, shape, m)
    ras_to_ijk = vtk.vtkMatrix4x4()
    ref.GetRASToIJKMatrix(ras_to_ijk)
    np.testing.assert_allclose(np.linalg.inv(mrml.world_ijk_to_ras(ref)), sutil.arrayFromVTKMatrix(ras_to_ijk), atol=1e-9)


def test_roi_round_trip_exact_on_every_sample_study(scene):
    """Bug (a): setRoiFromBox then roiBox came back one voxel larger on 10/20 sample studies (float32
    ROI centre vs a 1e-6 face tolerance). Now n/n exact, and MRML's IsPointInROIWorld agrees."""
    exact = []
    for sid in SAMPLE_IDS:
        box = INDEX[sid]["labels"]["final"]["info"]["roi"]
        shape, m = study_geometry(sid)
        ref = volume(scene, shape, m, name=sid)
        roi = mrml.set_roi_from_box(scene, None, box, ref)
        got = mrml.roi_box(roi, ref)
        exact.append(got == box)
        assert got == box, (sid, box, got)
        check_roi_against_mrml(roi, ref, box)
    assert len(exact) == len(SAMPLE_IDS) == 20 and all(exact)


def test_roi_round_trip_needs_float32_tolerance(scene, monkeypatch):
    """The bad twin: with the old 1e-6 face tolerance the same round trip is off by one voxel."""
    monkeypatch.setattr(geometry, "FACE_TOL", -1e-6)  # old rounding: faces must match to 1e-6
    off = 0
    for sid in SAMPLE_IDS:
        box = INDEX[sid]["labels"]["final"]["info"]["roi"]
        shape, m = study_geometry(sid)
        ref = volume(scene, shape, m, name=sid)
        off += mrml.roi_box(mrml.set_roi_from_box(scene, None, box, ref), ref) != box
    assert off > 0


GRIDS = {  # IJK->RAS 3x3 direction (columns) and spacing
    "oblique": (rotation(0.3, -0.2, 0.5), (0.7, 0.9, 3.3)),
    "flipped": (np.array([[-1, 0, 0], [0, 0, -1], [0, 1, 0]], float), (0.5, 0.5, 4.0)),  # LPS-stored, coronal
    "oblique_mirrored": (rotation(-0.4, 0.25, 1.1) @ np.diag([1, -1, 1]), (1.2, 0.4, 2.5)),
    "anisotropic": (np.eye(3), (0.3, 1.7, 6.0)),
}


def grid_matrix(direction, spacing, origin=(12.5, -33.25, 7.125)):
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def linear_transform(scene, matrix, name="T"):
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    t.SetMatrixTransformToParent(sutil.vtkMatrixFromArray(matrix))
    return t


RIGID = np.eye(4)
RIGID[:3, :3] = rotation(0.2, 0.1, -0.3)
RIGID[:3, 3] = (5.0, -7.5, 12.0)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("frame", ["world", "roi_transformed", "both_transformed"])
def test_roi_round_trip_on_oblique_flipped_anisotropic_grids(scene, grid, frame):
    direction, spacing = GRIDS[grid]
    shape = (40, 32, 24)
    ref = volume(scene, shape, grid_matrix(direction, spacing))
    roi = mrml.create_roi(scene)
    if frame in ("roi_transformed", "both_transformed"):
        roi.SetAndObserveTransformNodeID(linear_transform(scene, RIGID, "roi parent").GetID())
    if frame == "both_transformed":
        scaled = RIGID @ np.diag([1.1, 1.1, 1.1, 1.0])  # a uniformly scaling transform on the volume
        ref.SetAndObserveTransformNodeID(linear_transform(scene, scaled, "volume parent").GetID())
    rng = np.random.default_rng(len(grid) + len(frame))
    for _ in range(5):
        lo = rng.integers(0, np.array(shape) - 3)
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape)]
        box = [int(v) for a, b in zip(lo, hi) for v in (a, b)]
        mrml.set_roi_from_box(scene, roi, box, ref)
        assert mrml.roi_box(roi, ref) == box
        check_roi_against_mrml(roi, ref, box)


def test_box_is_written_in_world_frame_under_a_parent_transform(scene):
    """A box written into the ROI's NODE frame (the old code) lands elsewhere under a parent
    transform; in the world frame it encloses the same voxels (checked with IsPointInROIWorld)."""
    shape, m = study_geometry(SAMPLE_IDS[0])
    ref = volume(scene, shape, m)
    box = INDEX[SAMPLE_IDS[0]]["labels"]["final"]["info"]["roi"]
    roi = mrml.create_roi(scene)
    roi.SetAndObserveTransformNodeID(linear_transform(scene, RIGID).GetID())
    # old behaviour (bad twin): centre/axes of the world box used as ObjectToNode
    center, size, axes = geometry.box_to_roi(box, mrml.world_ijk_to_ras(ref))
    o2n = np.eye(4)
    o2n[:3, :3], o2n[:3, 3] = axes, center
    roi.SetAndObserveObjectToNodeMatrix(sutil.vtkMatrixFromArray(o2n))
    roi.SetSize(*size)
    assert mrml.roi_box(roi, ref) != box
    assert not roi.IsPointInROIWorld(voxel_centre_world(ref, [(box[0] + box[1]) // 2, (box[2] + box[3]) // 2, (box[4] + box[5]) // 2]))
    mrml.set_roi_from_box(scene, roi, box, ref)
    assert mrml.roi_box(roi, ref) == box
    check_roi_against_mrml(roi, ref, box)


def test_create_roi_has_display_node_without_markups_logic():
    s = new_scene(markups_logic=False)
    bare = s.AddNewNodeByClass("vtkMRMLMarkupsROINode", "bare")
    assert bare.GetDisplayNode() is None  # what the old createRoi relied on: None without Markups logic
    roi = mrml.create_roi(s)
    assert roi.GetDisplayNode() is not None and roi.GetDisplayNode().GetSelectedColor() == pytest.approx((0.3, 0.9, 1.0))
    ref = volume(s, (40, 32, 24), grid_matrix(*GRIDS["oblique"]))
    roi2 = mrml.create_roi(s, ref)
    c = [0.0] * 3
    roi2.GetCenterWorld(c)
    b = [0.0] * 6
    ref.GetRASBounds(b)
    np.testing.assert_allclose(c, [(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2], atol=1e-4)
    assert list(roi2.GetSize()) == pytest.approx([30.0] * 3)


# --------------------------------------------------------------------------- study assembly
def test_study_assembly_from_volume_nodes(scene, tmp_path):
    """Volumes loaded from a study file -> study images -> assembled study == the original file."""
    sid = SAMPLE_IDS[1]
    comps = L.read_components(str(STUDIES / f"{sid}.nii.gz"))
    nodes = mrml.load_study_volumes(scene, sid, comps)
    assert {k: n.GetName() for k, n in nodes.items()} == {k: f"{sid} {k}" for k in comps}
    assert all(n.GetAttribute(mrml.ATTR_STUDY) == sid for n in nodes.values())
    assert mrml.study_volume_problem(scene, nodes) == ""
    assert mrml.reference_volume(nodes) is nodes["CET1"]
    image, keys = L.assemble(mrml.study_images(nodes))
    assert keys == tuple(comps)
    orig = sitk.ReadImage(str(STUDIES / f"{sid}.nii.gz"))
    # the non-reference components are resampled again onto the (same) grid: equal to ~1e-10
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(orig), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), orig.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), orig.GetDirection(), atol=1e-6)
    # the same volume in two slots is refused
    assert "same volume" in mrml.study_volume_problem(scene, {"CET1": nodes["CET1"], "T2": nodes["CET1"]})


# --------------------------------------------------------------------------- label -> segmentation
def test_label_to_segmentation_to_label_array_identical(scene):
    sid = SAMPLE_IDS[2]
    comps = L.read_components(str(STUDIES / f"{sid}.nii.gz"))
    nodes = mrml.load_study_volumes(scene, sid, {k: comps[k] for k in ("CET1", "T2")})
    ref = nodes["CET1"]
    label = sitk.ReadImage(str(STUDIES / "labels" / "final" / f"{sid}.nii.gz"))
    arr, m = L.array_from_image(label)
    assert set(np.unique(arr)) == {0, 1, 2}
    seg = mrml.label_to_segmentation(scene, None, arr, m, ref)
    names = [seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments())]
    assert names == ["parotid_gland", "tumor"] and seg.GetAttribute(mrml.ATTR_RESULT) == "1"
    tumor = seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetSegmentIdBySegmentName("tumor"))
    assert tumor.GetColor() == pytest.approx(L.labels.SEGMENT_COLORS[2])
    np.testing.assert_array_equal(mrml.label_array(seg, ref), arr)
    # a second result replaces the segments (no duplicates), an empty class still gets its segment
    only_gland = np.where(arr == 2, 0, arr).astype(np.uint8)
    assert mrml.label_to_segmentation(scene, seg, only_gland, m, ref) is seg
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    np.testing.assert_array_equal(mrml.label_array(seg, ref), only_gland)
    # no temporary node is left in the scene
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    # labelArray refuses a transformed reference (the server would get the wrong geometry)
    ref.SetAndObserveTransformNodeID(linear_transform(scene, RIGID).GetID())
    with pytest.raises(ValueError, match="Harden"):
        mrml.label_array(seg, ref)


# --------------------------------------------------------------------------- heatmap display
def test_heatmap_display_settings(scene):
    shape, m = (20, 16, 12), grid_matrix(*GRIDS["oblique"])
    ref = volume(scene, shape, m)
    views = []
    for name in ("Red", "Green", "Yellow"):
        c = slicer.vtkMRMLSliceCompositeNode()
        c.SetLayoutName(name)
        views.append(scene.AddNode(c))
    heat_arr = np.linspace(0, 1, np.prod(shape[::-1])).reshape(shape[::-1])
    assert mrml.heat_color_node_id(scene) == mrml.HEATMAP_COLOR_FALLBACK_ID  # no Inferno table in this scene
    heat = mrml.show_heatmap(scene, None, heat_arr, m)
    d = heat.GetDisplayNode()
    assert heat.GetAttribute(mrml.ATTR_RESULT) == "1"
    assert d.GetColorNodeID() == mrml.HEATMAP_COLOR_FALLBACK_ID
    assert not d.GetAutoWindowLevel() and (d.GetWindowLevelMin(), d.GetWindowLevelMax()) == (0.0, 1.0)
    assert d.GetApplyThreshold() and d.GetLowerThreshold() == pytest.approx(0.05)
    np.testing.assert_allclose(mrml.world_ijk_to_ras(heat), m)
    np.testing.assert_allclose(sutil.arrayFromVolume(heat), heat_arr.astype(np.float32))
    assert mrml.set_slice_layers(scene, background=ref, foreground=heat, opacity=0.4) == 3
    for c in views:
        assert (c.GetBackgroundVolumeID(), c.GetForegroundVolumeID()) == (ref.GetID(), heat.GetID())
        assert c.GetForegroundOpacity() == pytest.approx(0.4)
    # a named heat colour table is preferred when present; a second result reuses the node
    inferno = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "Inferno")
    assert mrml.show_heatmap(scene, heat, heat_arr * 0.5, m) is heat
    assert heat.GetDisplayNode().GetColorNodeID() == inferno.GetID()
    mrml.set_slice_layers(scene, foreground=None)
    assert all(c.GetForegroundVolumeID() is None and c.GetBackgroundVolumeID() == ref.GetID() for c in views)


# --------------------------------------------------------------------------- provenance (bug b)
def _load(scene, sid, keys=None):
    comps = L.read_components(str(STUDIES / f"{sid}.nii.gz"))
    return mrml.load_study_volumes(scene, sid, {k: v for k, v in comps.items() if keys is None or k in keys})


def test_next_sample_missing_sequence_never_mixes_patients(scene):
    """Bug (b): after Next sample loads a study without ADC, the deferred auto-assignment filled the
    empty ADC slot with the PREVIOUS patient's ADC. Now only volumes of the same study qualify."""
    prev = _load(scene, SAMPLE_IDS[0])
    nxt = _load(scene, SAMPLE_IDS[3], keys=("CET1", "T2", "DWI_B0", "DWI_B1000"))  # no T1, no ADC
    current = {k: nxt.get(k) for k in sequences.SEQUENCE_KEYS}  # what nextSample sets
    # bad twin: name-only assignment (the old autoAssignVolumes) pulls in the previous case
    names = [n.GetName() for n in mrml.candidate_volumes(scene) if n not in nxt.values()]
    old = sequences.auto_assign(names, keys=("T1", "ADC"))
    assert old == {"T1": f"{SAMPLE_IDS[0]} T1", "ADC": f"{SAMPLE_IDS[0]} ADC"}
    assert mrml.auto_assign(scene, current, overwrite=False) == {}
    # if a user picks the other patient's ADC by hand, the study is refused with a clear message
    mixed = dict(current, ADC=prev["ADC"])
    msg = mrml.study_volume_problem(scene, mixed)
    assert "different patients or studies" in msg and SAMPLE_IDS[0] in msg and SAMPLE_IDS[3] in msg
    # a volume of unknown origin (no study/DICOM information) is not mixed into a known study either
    loose = volume(scene, (8, 8, 8), np.eye(4), name="my adc")
    assert "no patient/study information" in mrml.study_volume_problem(scene, dict(current, ADC=loose))
    assert mrml.auto_assign(scene, current, overwrite=False) == {}
    # overwrite: the group of one study that fills most slots wins, never a mix
    got = mrml.auto_assign(scene, {k: None for k in sequences.SEQUENCE_KEYS}, overwrite=True)
    assert {n.GetAttribute(mrml.ATTR_STUDY) for n in got.values()} == {SAMPLE_IDS[0]} and len(got) == 6


def _dicom_item(sh, parent, level, uid, name):
    item = sh.CreateFolderItem(parent, name)
    sh.SetItemLevel(item, level)
    sh.SetItemUID(item, mrml.DICOM_UID, uid)
    return item


def test_dicom_subject_hierarchy_provenance(scene):
    """Volumes loaded by Slicer's DICOM module sit under Patient/Study items carrying the DICOM
    PatientID / StudyInstanceUID as their 'DICOM' UID: two patients are refused, one study passes."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    C = slicer.vtkMRMLSubjectHierarchyConstants
    vols = {}
    for pid, suid, keys in (("P1", "1.2.3.1", ("CET1", "T2")), ("P2", "1.2.3.2", ("CET1", "ADC"))):
        patient = _dicom_item(sh, sh.GetSceneItemID(), C.GetDICOMLevelPatient(), pid, pid)
        st = _dicom_item(sh, patient, C.GetDICOMLevelStudy(), suid, "MR study")
        for k in keys:
            v = volume(scene, (8, 8, 8), np.eye(4), name=f"{k.lower()} series")
            sh.SetItemParent(sh.GetItemByDataNode(v) or sh.CreateItem(st, v), st)  # (the DICOM loader makes the item)
            vols[(pid, k)] = v
    assert mrml.volume_identity(scene, vols[("P1", "T2")]) == {"patient": "P1", "dicom_study": "1.2.3.1"}
    assert mrml.study_volume_problem(scene, {"CET1": vols[("P1", "CET1")], "T2": vols[("P1", "T2")]}) == ""
    msg = mrml.study_volume_problem(scene, {"CET1": vols[("P1", "CET1")], "ADC": vols[("P2", "ADC")]})
    assert "P1" in msg and "P2" in msg
    got = mrml.auto_assign(scene, {"CET1": vols[("P1", "CET1")], "T2": None, "ADC": None}, overwrite=False)
    assert got == {"T2": vols[("P1", "T2")]}  # P2's ADC is not offered for P1's study
