"""ParotidTumor.py itself -- parameter node, thin Logic, the in-Slicer test methods -- on REAL MRML
(slicer-core wheel), against the real MONAI Label server where a server is needed.

What is real: every MRML class (scene, volumes, markups ROI, segmentations, transforms, subject
hierarchy, scripted module node), ``slicer.util``, the module's code, the server.
What is stubbed, because the wheel has no Qt and no Slicer application:
  * ``qt`` / ``ctk``: empty modules (the Logic and Test never call them; the Widget does, and is only
    checked through its .ui under PySide6 in test_slicer_lib_ui.py);
  * Slicer's pure-Python application layer, absent from the wheel: ``slicer.i18n`` (tr/translate
    return the text), ``slicer.ScriptedLoadableModule`` (base classes: Logic keeps a singleton
    vtkMRMLScriptedModuleNode in the scene, Test is a unittest.TestCase) and
    ``slicer.parameterNodeWrapper`` (stores typed values in that real scripted module node, applies
    the declared defaults and WithinRange). These are small stand-ins written here, not Slicer's code.
Inside the Slicer application only: the widget, Qt event loop, slice views, SampleData download.
"""

from __future__ import annotations

import os
import sys
import types
import typing
import unittest
from pathlib import Path

import numpy as np
import pytest
import slicer
import slicer.util as sutil

import ParotidTumorLib as L
from ParotidTumorLib import background, mrml, sequences

sys.path.insert(0, str(Path(__file__).resolve().parent))
MODULE_DIR = Path(__file__).resolve().parents[1] / "slicer_extension" / "ParotidTumor"
from test_slicer_mrml import INDEX, SAMPLE_IDS, STUDIES, new_scene  # noqa: E402


# --------------------------------------------------------------------------- stand-ins (see docstring)
class WithinRange:
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def validate(self, name, value):
        if not self.lo <= value <= self.hi:
            raise ValueError(f"{name}={value} is outside [{self.lo}, {self.hi}]")


def parameterNodeWrapper(cls):
    """Typed attributes over a vtkMRMLScriptedModuleNode: nodes as node references, others as strings."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {n: cls.__dict__[n] for n in hints if n in cls.__dict__}

    def split(name):
        t = hints[name]
        if typing.get_origin(t) is typing.Annotated:
            base, *meta = typing.get_args(t)
            return base, meta
        return t, []

    class Wrapper:
        allParameters = hints

        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            for n, v in defaults.items():
                if not node.GetParameter(n):
                    setattr(self, n, v)

        def __getattr__(self, name):
            if name not in hints:
                raise AttributeError(name)
            base, _ = split(name)
            if isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
                return self.parameterNode.GetNodeReference(name)
            raw = self.parameterNode.GetParameter(name)
            return base(raw) if raw != "" or base is str else None

        def __setattr__(self, name, value):
            if name not in hints:
                raise AttributeError(f"{cls.__name__} has no parameter {name}")
            base, meta = split(name)
            if isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
                if value is not None and not isinstance(value, base):
                    raise TypeError(f"{name} must be a {base.__name__}, not {type(value).__name__}")
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                return
            if not isinstance(value, base) and not (base is float and isinstance(value, int)):
                raise TypeError(f"{name} must be {base.__name__}, not {type(value).__name__}")
            for m in meta:
                m.validate(name, value)
            self.parameterNode.SetParameter(name, str(value))

    Wrapper.__name__ = cls.__name__
    return Wrapper


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        print(message)


def _install_stand_ins(scene):
    stubs = {"qt": types.ModuleType("qt"), "ctk": types.ModuleType("ctk")}
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper, pnw.WithinRange = parameterNodeWrapper, WithinRange
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = type("Base", (), {})
    slm.ScriptedLoadableModuleLogic, slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest
    stubs.update({"slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw, "slicer.ScriptedLoadableModule": slm})
    return stubs


@pytest.fixture
def module(monkeypatch):
    """ParotidTumor.py imported on a real scene (slicer.mrmlScene), stand-ins as described above."""
    scene = new_scene()
    for name, mod in _install_stand_ins(scene).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.syspath_prepend(str(MODULE_DIR))  # ParotidTumor.py is not part of the installed package
    monkeypatch.delitem(sys.modules, "ParotidTumor", raising=False)
    import ParotidTumor

    yield ParotidTumor
    scene.Clear(1)
    sys.modules.pop("ParotidTumor", None)


# --------------------------------------------------------------------------- parameter node
def test_parameter_node_defaults_and_types(module):
    logic = module.ParotidTumorLogic()
    p = logic.getParameterNode()
    hints = module.ParotidTumorParameterNode.allParameters  # the declared annotations
    for key, attr in module.SEQUENCE_PARAMS.items():
        assert hints[attr] is slicer.vtkMRMLScalarVolumeNode and getattr(p, attr) is None, attr
    assert set(module.SEQUENCE_PARAMS) == set(sequences.SEQUENCE_KEYS)
    assert hints["roi"] is slicer.vtkMRMLMarkupsROINode and hints["segmentation"] is slicer.vtkMRMLSegmentationNode
    assert typing.get_args(hints["heatmapOpacity"])[0] is float
    assert p.heatmapOpacity == 0.5 and isinstance(p.heatmapOpacity, float)
    assert p.classifier == "classify_subtype" and p.studyId == "" and p.studyFingerprint == ""
    # stored in the scene's singleton scripted module node: a second wrapper sees the same values
    vol = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "case CET1")
    p.cet1Volume, p.heatmapOpacity, p.classifier = vol, 0.25, "classify_malignancy"
    q = logic.getParameterNode()
    assert q.cet1Volume is vol and q.heatmapOpacity == 0.25 and q.classifier == "classify_malignancy"
    with pytest.raises(ValueError):
        p.heatmapOpacity = 1.5
    with pytest.raises(TypeError):
        p.roi = vol  # a volume is not an ROI


# --------------------------------------------------------------------------- ctest's loader (bug c)
def _run_like_ctest(module_name):
    """What slicer.testing.runUnitTest does for slicer_add_python_unittest: loadTestsFromName."""
    suite = unittest.TestLoader().loadTestsFromName(module_name)
    result = unittest.TestResult()
    suite.run(result)
    return suite.countTestCases(), result


def test_module_tests_run_under_ctests_loader_without_server(module, monkeypatch):
    monkeypatch.delenv("PAROTID_SERVER_URL", raising=False)
    n, result = _run_like_ctest("ParotidTumor")
    assert n == 2
    assert not result.errors and not result.failures, result.errors + result.failures
    assert [t.id().rsplit(".", 1)[-1] for t, _ in result.skipped] == ["test_ParotidTumor_workflow"]
    # Reload & Test path: runTest runs the offline test and skips the server part cleanly
    module.ParotidTumorTest().runTest()


def test_a_test_method_with_an_argument_fails_under_the_loader(tmp_path, monkeypatch):
    """The bad twin of bug (c): the old signature test_ParotidTumor_workflow(self, url)."""
    (tmp_path / "old_module_test.py").write_text(
        "import unittest\nclass T(unittest.TestCase):\n    def test_workflow(self, url):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _, result = _run_like_ctest("old_module_test")
    assert len(result.errors) == 1 and "TypeError" in result.errors[0][1] and "url" in result.errors[0][1]


# --------------------------------------------------------------------------- logic against the real server
def _upload_study_without(client, sid, missing, new_id, tmp_path):
    comps = L.read_components(str(STUDIES / f"{sid}.nii.gz"))
    images = {k: L.image_from_array(a, m) for k, (a, m) in comps.items() if k not in missing}
    path = str(tmp_path / f"{new_id}.nii.gz")
    L.write(*L.assemble(images), path)
    return client.upload_study(path, new_id, {"source": "test"})


def test_next_sample_on_a_study_missing_a_sequence_never_mixes_patients(module, server, tmp_path):
    """Bug (b) end to end: previous case fully loaded, Next sample brings a study without ADC; the
    deferred auto-assignment the widget runs after every added volume must not take the previous
    patient's ADC; the study is then re-used on the server, not re-uploaded as a mixture."""
    logic = module.ParotidTumorLogic()
    logic.connect(server.url)
    p = logic.getParameterNode()
    prev = mrml.load_study_volumes(slicer.mrmlScene, SAMPLE_IDS[0], L.read_components(str(STUDIES / f"{SAMPLE_IDS[0]}.nii.gz")))
    assert len(logic.autoAssignVolumes(p, overwrite=True)) == 6
    new_id = _upload_study_without(logic.client, SAMPLE_IDS[5], {"ADC", "T1"}, "0000-slicer-no-adc", tmp_path)
    try:
        sample = logic.nextSample(p, "first")  # the only unlabelled study sorting first
        assert sample["id"] == new_id
        assert logic.autoAssignVolumes(p, overwrite=False) == {}  # what onNodeAdded triggers
        assert p.adcVolume is None and p.t1Volume is None
        sel = logic.selectedVolumes(p)
        assert set(sel) == {"CET1", "T2", "DWI_B0", "DWI_B1000"}
        assert {n.GetAttribute(mrml.ATTR_STUDY) for n in sel.values()} == {new_id}
        assert logic.volumeProblem(p) == ""
        assert logic.ensureStudyUploaded(p) == new_id  # the server's study, not a new upload
        p.adcVolume = prev["ADC"]  # chosen by hand: refused before anything is sent
        assert "different patients" in logic.volumeProblem(p)
        with pytest.raises(ValueError, match="different patients"):
            logic.segmentJob(p)
    finally:
        logic.client.delete_study(new_id)


def test_logic_segment_and_classify_on_real_mrml(module, server, sample_ids):
    """The synchronous Logic (as scripts use it): a study from volume nodes, segmentation result as
    segments on the reference grid, classification heatmap shown over the reference volume."""
    logic = module.ParotidTumorLogic()
    logic.connect(server.url)
    p = logic.getParameterNode()
    sid = sample_ids[4]
    mrml.load_study_volumes(slicer.mrmlScene, sid, L.read_components(str(STUDIES / f"{sid}.nii.gz")))
    logic.autoAssignVolumes(p, overwrite=True)
    for name in ("Red", "Green", "Yellow"):
        c = slicer.vtkMRMLSliceCompositeNode()
        c.SetLayoutName(name)
        slicer.mrmlScene.AddNode(c)
    box = INDEX[sid]["labels"]["final"]["info"]["roi"]
    ref = logic.referenceVolume(p)
    logic.setRoiFromBox(p, box, ref)
    assert logic.roiBox(p.roi, ref) == box
    seg = logic.contourBox(p)
    arr = logic.labelArray(p)
    assert arr.shape == sutil.arrayFromVolume(ref).shape and seg is p.segmentation
    assert set(np.unique(arr)) <= {0, 1, 2}
    result = logic.classify(p, "classify_subtype")
    assert abs(sum(r["score"] for r in result.prediction) - 1) < 1e-3
    comp = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert comp.GetForegroundVolumeID() == p.heatmap.GetID() and comp.GetBackgroundVolumeID() == ref.GetID()
    assert comp.GetForegroundOpacity() == pytest.approx(p.heatmapOpacity)
    np.testing.assert_allclose(mrml.world_ijk_to_ras(p.heatmap), mrml.world_ijk_to_ras(ref), atol=1e-3)


def test_logic_on_a_t2_only_study_shows_sequences_used_and_missing(module, server, sample_ids):
    """Issue 15 in the module: with only a T2 volume every action is offered (T2 is the minimum), and the
    result text names the sequences used, the missing ones and the performance validated for them."""
    logic = module.ParotidTumorLogic()
    logic.connect(server.url)
    p = logic.getParameterNode()
    sid = sample_ids[6]
    comps = L.read_components(str(STUDIES / f"{sid}.nii.gz"))
    t2 = mrml.load_study_volumes(slicer.mrmlScene, sid, {"T2": comps["T2"]})["T2"]
    logic.autoAssignVolumes(p, overwrite=True)
    vols = logic.selectedVolumes(p)
    assert set(vols) == {"T2"}
    for model in ("segmentation", "contour_box", "classify_malignancy", "classify_subtype"):
        assert logic.missingSequences(model, vols) == [], model
        assert logic.missingSequences(model, {"CET1": t2}) == ["T2"], model  # without T2: the button stays off
    for name in ("Red", "Green", "Yellow"):
        c = slicer.vtkMRMLSliceCompositeNode()
        c.SetLayoutName(name)
        slicer.mrmlScene.AddNode(c)
    ref = logic.referenceVolume(p)
    logic.setRoiFromBox(p, INDEX[sid]["labels"]["final"]["info"]["roi"], ref)
    logic.contourBox(p)
    info = logic.lastLabelInfo
    assert info["sequences_used"] == ["T2"] and info["sequences_missing"] == ["T1", "CET1", "DWI_B0", "DWI_B1000", "ADC"]
    text = L.sequences_summary(info)
    assert text.startswith("Sequences used: T2; MISSING: T1, CET1, DWI_B0, DWI_B1000, ADC") and "Expected performance" in text
    result = logic.classify(p, "classify_malignancy")
    assert result.sequences_used == ["T2"] and result.sequences_missing == ["CET1", "DWI_B1000", "ADC"]
    assert "MISSING: CET1, DWI_B1000, ADC" in result.summary()
    logic.client.delete_study(p.studyId)


# --------------------------------------------------------------------------- background runner, real server
def test_background_task_done_cancel_timeout_against_the_server(server, sample_ids):
    client = L.ParotidClient(server.url)
    t = background.BackgroundTask(lambda token: client.info(), name="Connect").start()
    assert t.wait(max_s=60) == background.DONE and "models" in t.result
    # Cancel while an inference runs: the GUI is free at once, the late result is discarded
    slow = background.BackgroundTask(lambda token: client.segment(sample_ids[0]), name="Segment").start()
    assert slow.poll() == background.RUNNING and slow.cancel()
    assert slow.state == background.CANCELLED and slow.result is None and "cancelled" in slow.message()
    slow._thread.join(120)
    assert not slow.worker_alive() and slow.state == background.CANCELLED and slow.result is None
    # timeout: gives up waiting with a clear message
    late = background.BackgroundTask(lambda token: client.segment(sample_ids[1]), timeout_s=0.05, name="Segment").start()
    assert late.wait() == background.TIMED_OUT and "no answer within 0.05 s" in late.message()
    late._thread.join(120)
    # a cancelled token stops a multi-request action before its next request
    calls = []

    def two_requests(token):
        calls.append(client.info())
        token.check()
        calls.append(client.segment(sample_ids[0]))

    t2 = background.BackgroundTask(two_requests, name="Two")
    t2.token.cancel()
    t2.start()._thread.join(60)
    assert len(calls) == 1 and t2.state == background.CANCELLED
    # server errors come back as FAILED with the server's message
    bad = background.BackgroundTask(lambda token: client.segment("no-such-study"), name="Segment").start()
    assert bad.wait(max_s=60) == background.FAILED and isinstance(bad.error, L.ServerError)
