"""MRML-bound logic of the ParotidTumor module (volumes <-> study, ROI <-> box, label -> segmentation,
heatmap display, Next sample, patient/study provenance).

Needs Slicer's MRML classes and ``slicer.util`` only -- no Qt, no ``slicer.app``, no module widgets --
so it runs inside 3D Slicer and, outside it, on the ``slicer-core`` wheel (the CI harness
``tests/test_slicer_mrml.py`` runs it on a real ``vtkMRMLScene``). Every function takes the scene and
plain parameters (nodes, arrays, boxes), never the module's parameter node. It is NOT imported by
``ParotidTumorLib/__init__`` so that the rest of the library stays importable without Slicer.
"""

from __future__ import annotations

import numpy as np
import slicer
import slicer.util as sutil
import vtk

from .geometry import box_to_roi, image_from_array, roi_to_box
from .labels import SEGMENT_COLORS, SEGMENT_NAMES
from .sequences import check_distinct, reference_key

ATTR_RESULT = "ParotidTumor.Result"  # set on nodes the module creates for results
ATTR_STUDY = "ParotidTumor.StudyId"  # set on volumes loaded from a server study (Next sample)
DICOM_UID = "DICOM"  # subject hierarchy UID name of DICOM patient / study / series items
HEATMAP_COLOR_NAMES = ("Inferno", "ColdToHotRainbow")  # first one present in the scene is used
HEATMAP_COLOR_FALLBACK_ID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
HEATMAP_LOWER_THRESHOLD = 0.05  # leave the MRI visible where the model did not look


# --------------------------------------------------------------------------- geometry
def world_ijk_to_ras(volume) -> np.ndarray:
    """IJK -> world RAS of a volume, including a linear parent transform."""
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return _node_to_world(volume, f"Volume '{volume.GetName()}'") @ sutil.arrayFromVTKMatrix(m)


def _node_to_world(node, what: str) -> np.ndarray:
    tnode = node.GetParentTransformNode()
    if tnode is None:
        return np.eye(4)
    if not tnode.IsTransformToWorldLinear():
        raise ValueError(f"{what} is under a non-linear transform: harden it first (Data module).")
    t = vtk.vtkMatrix4x4()
    tnode.GetMatrixTransformToWorld(t)
    return sutil.arrayFromVTKMatrix(t)


def roi_box(roi, reference) -> list:
    """The ROI as a voxel box ``[i0, i1, j0, j1, k0, k1]`` on the reference grid (world frame: both
    nodes' parent transforms are applied; all 8 corners, see ``geometry.roi_to_box``)."""
    # ObjectToWorld: columns 0-2 the box axes (incl. any parent-transform scaling), column 3 its
    # centre; GetSize() is the edge length along those axes.
    object_to_world = sutil.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
    ras_to_ijk = np.linalg.inv(world_ijk_to_ras(reference))
    shape = reference.GetImageData().GetDimensions()
    return roi_to_box(object_to_world[:3, 3], list(roi.GetSize()), ras_to_ijk, shape,
                      axes_ras=object_to_world[:3, :3])


def create_roi(scene, reference=None, name="Tumour box"):
    """A new markups ROI with a display node (made directly, so also without the Markups logic);
    with `reference`: a 30 mm box in the middle of that volume."""
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", scene.GenerateUniqueName(name))
    roi.CreateDefaultDisplayNodes()
    roi.GetDisplayNode().SetSelectedColor(0.3, 0.9, 1.0)
    if reference is not None:
        bounds = [0.0] * 6
        reference.GetRASBounds(bounds)
        roi.SetCenterWorld([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
        roi.SetSize(30.0, 30.0, 30.0)
    return roi


def set_roi_from_box(scene, roi, box, reference):
    """Place `roi` (a new one when None) exactly on the voxel box, in WORLD coordinates: when the ROI
    is under a linear parent transform the box is mapped into the ROI's node frame. Returns the ROI."""
    center_w, size_w, axes_w = box_to_roi(box, world_ijk_to_ras(reference))
    if roi is None:
        roi = create_roi(scene)
    world_to_node = np.linalg.inv(_node_to_world(roi, f"ROI '{roi.GetName()}'"))
    edges = world_to_node[:3, :3] @ (axes_w * size_w)  # box edges (columns) in the node frame
    size = np.linalg.norm(edges, axis=0)
    axes = edges / size
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-6):
        raise ValueError(f"ROI '{roi.GetName()}' is under a shearing transform: harden it first (Data module).")
    if np.linalg.det(axes) < 0:  # the ROI needs a proper rotation; flipping one axis keeps the box
        axes[:, 2] *= -1
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes
    object_to_node[:3, 3] = world_to_node[:3, :3] @ center_w + world_to_node[:3, 3]
    roi.SetAndObserveObjectToNodeMatrix(sutil.vtkMatrixFromArray(object_to_node))
    roi.SetSize(*[float(v) for v in size])
    return roi


# --------------------------------------------------------------------------- provenance
def volume_identity(scene, node) -> dict:
    """What Slicer knows about which patient / study a volume belongs to.

    * ``study``: the server study a volume was loaded from (Next sample sets :data:`ATTR_STUDY`);
    * ``patient`` / ``dicom_study``: DICOM PatientID / StudyInstanceUID of the subject-hierarchy
      ancestors (Slicer's DICOM loader stores them as the items' ``DICOM`` UID).
    Empty dict when nothing is known (e.g. a volume loaded from a NIfTI file).
    """
    ident = {}
    if node.GetAttribute(ATTR_STUDY):
        ident["study"] = node.GetAttribute(ATTR_STUDY)
    sh = scene.GetSubjectHierarchyNode() if hasattr(scene, "GetSubjectHierarchyNode") else None
    if sh is None:
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    while item and item != sh.GetSceneItemID():
        level, uid = sh.GetItemLevel(item), sh.GetItemUID(item, DICOM_UID)
        if uid and level == "Patient":
            ident["patient"] = uid
        elif uid and level == "Study":
            ident["dicom_study"] = uid
        item = sh.GetItemParent(item)
    return ident


def compatible(a: dict, b: dict) -> bool:
    """Two identities may form one study: both unknown, or they share a field and all shared agree."""
    if not a and not b:
        return True
    shared = set(a) & set(b)
    return bool(shared) and all(a[f] == b[f] for f in shared)


def _describe(node, ident) -> str:
    parts = [f"{k.replace('dicom_study', 'study UID')} {v}" for k, v in sorted(ident.items())]
    return f"'{node.GetName()}' ({', '.join(parts) if parts else 'no patient/study information'})"


def mixing_problem(scene, volumes: dict) -> str:
    """A user message when the selected volumes (``{sequence key: node}``) do not all come from one
    patient/study, else ''. Patient safety: a study is never assembled from two patients."""
    items = [(k, n, volume_identity(scene, n)) for k, n in volumes.items() if n is not None]
    for k1, n1, i1 in items:
        for k2, n2, i2 in items:
            if k1 < k2 and not compatible(i1, i2):
                return (f"{k1} {_describe(n1, i1)} and {k2} {_describe(n2, i2)} may come from different "
                        "patients or studies. A study must be built from one patient's volumes only: "
                        "select volumes of the same study (or clear the wrong sequence slot).")
    return ""


def study_volume_problem(scene, volumes: dict) -> str:
    """Why the selected volumes cannot form a study ('' when they can)."""
    try:
        check_distinct({k: v.GetID() for k, v in volumes.items() if v is not None})
    except ValueError as e:
        return str(e)
    return mixing_problem(scene, volumes)


def candidate_volumes(scene) -> list:
    """Scalar volumes a user may assign to a sequence (not label maps, not the module's results)."""
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        n = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetAttribute(ATTR_RESULT):
            nodes.append(n)
    return nodes


def auto_assign(scene, current: dict, overwrite: bool = False) -> dict:
    """``{sequence key: node}`` to set, chosen by volume name (``*t2*``, ``*adc*`` ...) among volumes of
    ONE patient/study only.

    `current` maps every sequence key to its selected node (or None). Without `overwrite` only empty
    slots are filled, and only with volumes compatible with those already selected (a deferred
    auto-assignment after Next sample can no longer pull in the previous patient's ADC). With
    `overwrite` the group of mutually compatible volumes that fills most slots wins (ties: the group
    holding the most recently added volume).
    """
    from .sequences import auto_assign as by_name

    keys = [k for k, n in current.items() if overwrite or n is None]
    kept = [] if overwrite else [n for n in current.values() if n is not None]
    taken = {n.GetID() for n in kept}
    kept_ids = [volume_identity(scene, n) for n in kept]
    groups = []  # [(identity, [nodes])]: volumes grouped by provenance, in scene order
    for n in candidate_volumes(scene):
        if n.GetID() in taken:
            continue
        ident = volume_identity(scene, n)
        if not all(compatible(ident, k) for k in kept_ids):
            continue
        for gid, members in groups:
            if gid == ident:
                members.append(n)
                break
        else:
            groups.append((ident, [n]))
    best, best_rank = {}, (0, -1)
    for gi, (_, members) in enumerate(groups):
        byname = {n.GetName(): n for n in members}
        got = {k: byname[name] for k, name in by_name(list(byname), keys=tuple(keys)).items()}
        rank = (len(got), gi)  # later groups hold later-added volumes
        if got and rank > best_rank:
            best, best_rank = got, rank
    return best


def study_images(volumes: dict) -> dict:
    """``{key: SimpleITK image}`` (world geometry) of the selected volume nodes."""
    return {k: image_from_array(sutil.arrayFromVolume(n), world_ijk_to_ras(n)) for k, n in volumes.items() if n is not None}


def reference_volume(volumes: dict):
    present = {k: n for k, n in volumes.items() if n is not None}
    if not present:
        raise ValueError("Select at least one sequence volume.")
    return present[reference_key(present)]


# --------------------------------------------------------------------------- results
def _result_node(scene, class_name: str, name: str):
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    node.SetAttribute(ATTR_RESULT, "1")
    return node


def _set_volume(node, array, ijk_to_ras) -> None:
    sutil.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetIJKToRASMatrix(sutil.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=float)))


def _labelmap_node(scene, array, ijk_to_ras, name="__ParotidTumor temp__"):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName(name))
    _set_volume(node, np.asarray(array).astype(np.uint8), ijk_to_ras)
    return node


def _segment_ids(*ids) -> vtk.vtkStringArray:
    a = vtk.vtkStringArray()
    for i in ids:
        a.InsertNextValue(i)
    return a


def label_to_segmentation(scene, segmentation, array, ijk_to_ras, reference, name="Parotid segmentation"):
    """Result label map (``[k, j, i]`` on the grid `ijk_to_ras`; 1 gland, 2 tumour) -> segments
    ``parotid_gland`` / ``tumor`` with fixed colours in `segmentation` (a new node when None), whose
    reference geometry is `reference`. Uses the Segmentations logic's static import (no module
    singletons needed: ``slicer.util.updateSegmentBinaryLabelmapFromArray`` reads slicer.modules)."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    arr = np.asarray(array)
    if segmentation is None:
        segmentation = _result_node(scene, "vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    seg = segmentation.GetSegmentation()
    for value, sname in SEGMENT_NAMES.items():
        sid = seg.GetSegmentIdBySegmentName(sname)
        if sid:
            seg.RemoveSegment(sid)
    for value, sname in SEGMENT_NAMES.items():
        sid = seg.AddEmptySegment(sname, sname, SEGMENT_COLORS[value])
        if not np.any(arr == value):
            continue
        labelmap = _labelmap_node(scene, arr == value, ijk_to_ras)
        try:
            if not logic.ImportLabelmapToSegmentationNode(labelmap, segmentation, _segment_ids(sid)):
                raise RuntimeError(f"importing the {sname} label into '{segmentation.GetName()}' failed")
        finally:
            scene.RemoveNode(labelmap)
    return segmentation


def segment_mask(segmentation, segment_id, reference) -> np.ndarray:
    """One segment as a ``[k, j, i]`` 0/1 array on the reference volume's grid."""
    scene = segmentation.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__ParotidTumor temp__"))
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation, _segment_ids(segment_id), labelmap, reference):
            raise RuntimeError(f"exporting segment {segment_id} of '{segmentation.GetName()}' failed")
        return (sutil.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        display = labelmap.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        if color is not None and color.GetName().startswith(labelmap.GetName()):  # export made it
            scene.RemoveNode(color)
        scene.RemoveNode(labelmap)


def label_array(segmentation, reference) -> np.ndarray:
    """The segmentation as a label map ``[k, j, i]`` on the reference grid (1 gland, 2 tumour)."""
    if reference.GetParentTransformNode() is not None:
        raise ValueError(f"Harden the transform of '{reference.GetName()}' before submitting (Data module).")
    out = np.zeros(sutil.arrayFromVolume(reference).shape, np.uint8)
    for value, name in sorted(SEGMENT_NAMES.items()):  # tumour written last: it wins on overlap
        sid = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
        if sid:
            out[segment_mask(segmentation, sid, reference) > 0] = value
    return out


def heat_color_node_id(scene) -> str:
    for name in HEATMAP_COLOR_NAMES:
        node = scene.GetFirstNodeByName(name)
        if node is not None and node.IsA("vtkMRMLColorNode"):
            return node.GetID()
    return HEATMAP_COLOR_FALLBACK_ID


def show_heatmap(scene, heat, array, ijk_to_ras, name="Heatmap"):
    """Heatmap volume (a new node when `heat` is None) with its display: heat colours, window 0..1,
    values below :data:`HEATMAP_LOWER_THRESHOLD` transparent."""
    if heat is None:
        heat = _result_node(scene, "vtkMRMLScalarVolumeNode", name)
    _set_volume(heat, np.asarray(array).astype(np.float32), ijk_to_ras)
    heat.CreateDefaultDisplayNodes()
    display = heat.GetDisplayNode()
    display.SetAndObserveColorNodeID(heat_color_node_id(scene))
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetLowerThreshold(HEATMAP_LOWER_THRESHOLD)
    display.ApplyThresholdOn()
    return heat


def set_slice_layers(scene, background=None, foreground="keep", opacity=None) -> int:
    """Set the layers of every slice view's composite node in the scene (what the slice views show);
    `foreground` None clears it, "keep" leaves it. Returns the number of views changed."""
    n = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(n):
        c = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            c.SetBackgroundVolumeID(background.GetID())
        if foreground != "keep":
            c.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        if opacity is not None:
            c.SetForegroundOpacity(float(opacity))
    return n


# --------------------------------------------------------------------------- Next sample
def load_study_volumes(scene, study_id: str, components: dict) -> dict:
    """A server study's components (``{key: (array [k,j,i], IJK->RAS)}``) as volume nodes named
    ``"<study> <key>"``, each tagged with the study id (:data:`ATTR_STUDY`): their provenance."""
    nodes = {}
    for key, (array, ijk_to_ras) in components.items():
        node = slicer.vtkMRMLScalarVolumeNode()
        node.SetName(f"{study_id} {key}")
        node.SetAttribute(ATTR_STUDY, study_id)  # before it enters the scene: observers see it at once
        node = scene.AddNode(node)
        _set_volume(node, array, ijk_to_ras)
        node.CreateDefaultDisplayNodes()
        nodes[key] = node
    return nodes
