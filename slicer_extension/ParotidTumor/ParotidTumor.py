"""ParotidTumor: 3D Slicer client of the parotid MONAI Label server.

This file is deliberately thin: Slicer glue only (nodes, views, widgets). All logic that can live
outside Slicer -- the HTTP client, ROI -> voxel-box conversion, study assembly, response parsing,
error messages -- is in the Slicer-free package ``ParotidTumorLib`` (tested in CI without Slicer).
"""

import os
import tempfile
from typing import Annotated, Optional

import numpy as np
import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

import ParotidTumorLib as lib
from ParotidTumorLib import sequences as seqlib
from ParotidTumorLib.labels import SEGMENT_COLORS, SEGMENT_NAMES, SEGMENTATION_LABELS

SETTINGS_URL = "ParotidTumor/ServerURL"
SETTINGS_URL_HISTORY = "ParotidTumor/ServerURLHistory"
HEATMAP_COLOR_NAMES = ("Inferno", "ColdToHotRainbow")  # first one present in the scene is used
HEATMAP_COLOR_FALLBACK_ID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"

# Parameter-node attribute of each sequence key (same names as in Resources/UI/ParotidTumor.ui).
SEQUENCE_PARAMS = {
    "T1": "t1Volume",
    "T2": "t2Volume",
    "CET1": "cet1Volume",
    "DWI_B0": "dwiB0Volume",
    "DWI_B1000": "dwiB1000Volume",
    "ADC": "adcVolume",
}
SEQUENCE_SELECTORS = {k: v.replace("Volume", "Selector") for k, v in SEQUENCE_PARAMS.items()}


#
# ParotidTumor
#
class ParotidTumor(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Parotid Tumor")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Markups", "SegmentEditor"]
        self.parent.contributors = ["Parotid MRI project team"]
        self.parent.helpText = _(
            "Contour the parotid gland and tumour on multi-sequence MRI and classify the tumour with a "
            "parotid MONAI Label server. Select one volume per sequence, place a box around the tumour, "
            "then Segment / Contour in box / Classify tumour. Annotators submit refined labels with the "
            "tumour class; administrators fetch the next sample and train. Research use only."
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer and MONAI Label. Module structure follows Slicer's scripted-module "
            "template and SlicerMONAIAuto3DSeg (thin module over a Slicer-free library)."
        )


#
# Parameter node
#
@parameterNodeWrapper
class ParotidTumorParameterNode:
    """Module state, saved with the scene.

    One volume per MRI sequence (unset = not available), the tumour box, the classification model,
    and the results of the last run.
    """

    t1Volume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    cet1Volume: vtkMRMLScalarVolumeNode
    dwiB0Volume: vtkMRMLScalarVolumeNode
    dwiB1000Volume: vtkMRMLScalarVolumeNode
    adcVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    segmentation: vtkMRMLSegmentationNode
    heatmap: vtkMRMLScalarVolumeNode
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    classifier: str = "classify_subtype"
    studyId: str = ""
    studyFingerprint: str = ""


#
# Widget
#
class ParotidTumorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._trainTimer = None
        self._observedRoi = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ParotidTumor.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ParotidTumorLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        # server URL persisted across sessions
        settings = qt.QSettings()
        history = settings.value(SETTINGS_URL_HISTORY) or []
        if isinstance(history, str):
            history = [history]
        self.ui.serverComboBox.addItems(list(history) or [lib.client.DEFAULT_URL])
        self.ui.serverComboBox.currentText = settings.value(SETTINGS_URL) or (history[0] if history else lib.client.DEFAULT_URL)
        self.ui.loginFrame.visible = False

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.autoAssignButton.connect("clicked(bool)", self.onAutoAssign)
        self.ui.placeRoiButton.connect("clicked(bool)", self.onPlaceRoi)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.contourButton.connect("clicked(bool)", self.onContour)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassify)
        self.ui.editSegmentationButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)
        self.ui.classifierComboBox.connect("currentTextChanged(QString)", self.onClassifierChanged)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onHeatmapOpacity)
        for key, name in SEQUENCE_SELECTORS.items():
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)

        self.ui.requestProgressBar.visible = False
        self.ui.resultsTable.setColumnCount(3)
        self.ui.resultsTable.setHorizontalHeaderLabels([_("Class"), _("Probability"), ""])
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        self.initializeParameterNode()
        self.updateButtonStates()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._trainTimer:
            self._trainTimer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        # newly loaded volumes are assigned to empty sequence slots by name
        if isinstance(node, slicer.vtkMRMLScalarVolumeNode) and self._parameterNode:
            qt.QTimer.singleShot(0, lambda: self.logic.autoAssignVolumes(self._parameterNode, overwrite=False))

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.autoAssignVolumes(self._parameterNode, overwrite=False)

    def setParameterNode(self, inputParameterNode: Optional[ParotidTumorParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # binds every widget with a SlicerParameterName property in the .ui file
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)
            self.updateButtonStates()

    # ---------------------------------------------------------------- state
    def updateButtonStates(self, caller=None, event=None) -> None:
        p = self._parameterNode
        connected = self.logic is not None and self.logic.info is not None
        volumes = self.logic.selectedVolumes(p) if p else {}
        has_box = bool(p and p.roi)
        problem = self.logic.volumeProblem(p) if p else _("no parameter node")
        if problem:
            self.ui.sequenceStatusLabel.text = problem
        elif volumes:
            self.ui.sequenceStatusLabel.text = _("Study sequences: {seqs} (reference grid: {ref})").format(
                seqs=", ".join(volumes), ref=seqlib.reference_key(volumes))
        else:
            self.ui.sequenceStatusLabel.text = _("Select at least one sequence volume")
        ready = connected and not problem and bool(volumes)
        for button, needs_box, model in [
            (self.ui.segmentButton, False, "segmentation"),
            (self.ui.contourButton, True, "contour_box"),
            (self.ui.classifyButton, True, p.classifier if p else ""),
        ]:
            missing = self.logic.missingSequences(model, volumes) if connected else []
            button.enabled = ready and (has_box or not needs_box) and not missing and self.logic.hasModel(model)
            if not connected:
                button.toolTip = _("Connect to the server first")
            elif not self.logic.hasModel(model):
                button.toolTip = _("The server does not offer model '{model}'").format(model=model)
            elif missing:
                button.toolTip = _("Model '{model}' needs sequence(s): {seqs}").format(model=model, seqs=", ".join(missing))
            elif needs_box and not has_box:
                button.toolTip = _("Place a box around the tumour first")
            else:
                button.toolTip = ""
        self.ui.submitButton.enabled = ready and bool(p and p.segmentation)
        self.ui.nextSampleButton.enabled = connected
        self.ui.trainButton.enabled = connected and self.ui.trainModelComboBox.count > 0
        self.ui.stopTrainButton.enabled = connected
        self._observeRoi(p.roi if p else None)
        self.updateRoiLabel()

    def _observeRoi(self, roi) -> None:
        """Follow the box while the user drags it (ROI edits do not modify the parameter node)."""
        if roi is self._observedRoi:
            return
        if self._observedRoi is not None:
            self.removeObserver(self._observedRoi, vtk.vtkCommand.ModifiedEvent, self.updateRoiLabel)
        self._observedRoi = roi
        if roi is not None:
            self.addObserver(roi, vtk.vtkCommand.ModifiedEvent, self.updateRoiLabel)

    def updateRoiLabel(self, caller=None, event=None) -> None:
        p = self._parameterNode
        volumes = self.logic.selectedVolumes(p) if p else {}
        if p and p.roi and volumes:
            try:
                box = self.logic.roiBox(p.roi, self.logic.referenceVolume(p))
                self.ui.roiBoxLabel.text = _("Voxel box [i0,i1,j0,j1,k0,k1]: {box}").format(box=box)
            except Exception as e:  # the box may be off the image while the user drags it
                self.ui.roiBoxLabel.text = str(e)
        else:
            self.ui.roiBoxLabel.text = ""

    class _Busy:
        """Progress indicator + wait cursor during a blocking request."""

        def __init__(self, widget, text):
            self.w, self.text = widget, text

        def __enter__(self):
            self.w.ui.requestProgressBar.visible = True
            self.w.ui.requestProgressBar.setRange(0, 0)  # indeterminate
            self.w.ui.statusLabel.text = self.text
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            slicer.app.processEvents()
            return self

        def __exit__(self, exc_type, exc, tb):
            qt.QApplication.restoreOverrideCursor()
            self.w.ui.requestProgressBar.visible = False
            self.w.ui.statusLabel.text = (self.text + _(" done")) if exc is None else _("Failed: ") + str(exc)
            return False

    def busy(self, text):
        return self._Busy(self, text)

    # ---------------------------------------------------------------- actions
    def onConnect(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot connect to the server."), waitCursor=True):
            url = lib.normalize_url(self.ui.serverComboBox.currentText)
            with self.busy(_("Connecting to {url} ...").format(url=url)):
                summary = self.logic.connect(url, self.ui.userLineEdit.text or None, self.ui.passwordLineEdit.text or None)
            self.ui.loginFrame.visible = self.logic.authEnabled
            self._rememberUrl(url)
            self.ui.serverInfoLabel.text = summary
            self._fillModelLists()
            self.logic.autoAssignVolumes(self._parameterNode, overwrite=False)
            self.updateButtonStates()

    def _rememberUrl(self, url):
        settings = qt.QSettings()
        history = [self.ui.serverComboBox.itemText(i) for i in range(self.ui.serverComboBox.count)]
        history = [url] + [h for h in history if h != url]
        settings.setValue(SETTINGS_URL, url)
        settings.setValue(SETTINGS_URL_HISTORY, history[:10])
        self.ui.serverComboBox.clear()
        self.ui.serverComboBox.addItems(history[:10])
        self.ui.serverComboBox.currentText = url

    def _fillModelLists(self):
        models = self.logic.models
        classifiers = [m.name for m in models.values() if m.type == "classification"]
        self.ui.classifierComboBox.clear()
        self.ui.classifierComboBox.addItems(classifiers)
        if self._parameterNode and self._parameterNode.classifier in classifiers:
            self.ui.classifierComboBox.currentText = self._parameterNode.classifier
        self.ui.trainModelComboBox.clear()
        self.ui.trainModelComboBox.addItems(self.logic.trainers)
        self.ui.strategyComboBox.clear()
        self.ui.strategyComboBox.addItems(self.logic.strategies or ["random"])
        self.ui.tumorClassComboBox.clear()
        self.ui.tumorClassComboBox.addItem("")
        self.ui.tumorClassComboBox.addItems(self.logic.tumorClasses())

    def onClassifierChanged(self, text) -> None:
        if self._parameterNode and text:
            self._parameterNode.classifier = text

    def onAutoAssign(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Auto-assignment failed."), waitCursor=True):
            got = self.logic.autoAssignVolumes(self._parameterNode, overwrite=True)
            self.ui.statusLabel.text = _("Assigned: ") + ", ".join(f"{k}={v}" for k, v in got.items()) if got else _(
                "No volume name matched a sequence pattern")

    def onPlaceRoi(self) -> None:
        """A 30 mm box at the centre of the reference volume (or the existing one), handles on:
        the user drags it onto the tumour in any slice view."""
        with slicer.util.tryWithErrorDisplay(_("Cannot place the box."), waitCursor=True):
            p = self._parameterNode
            if not p.roi:
                p.roi = self.logic.createRoi(self.logic.referenceVolume(p))
            p.roi.SetDisplayVisibility(True)
            p.roi.GetDisplayNode().SetHandlesInteractive(True)
            center = [0.0, 0.0, 0.0]
            p.roi.GetCenterWorld(center)
            slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
            self.ui.statusLabel.text = _("Drag the box faces/handles in the slice views until the box encloses the tumour.")

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            with self.busy(_("Segmenting (whole study) ...")):
                self.logic.segment(self._parameterNode)
            self._showSegmentation()

    def onContour(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Contouring in the box failed."), waitCursor=True):
            with self.busy(_("Contouring the tumour in the box ...")):
                self.logic.contourBox(self._parameterNode)
            self._showSegmentation()

    def onClassify(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Classification failed."), waitCursor=True):
            with self.busy(_("Classifying the tumour ...")):
                result = self.logic.classify(self._parameterNode)
            self._showClassification(result)

    def _showSegmentation(self):
        self.ui.statusLabel.text = _("Result loaded as segmentation '{name}'. Refine it in Segment Editor.").format(
            name=self._parameterNode.segmentation.GetName())
        self.updateButtonStates()

    def _showClassification(self, result):
        table = self.ui.resultsTable
        rows = result.table_rows()
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = qt.QTableWidgetItem(text)
                if row[2]:
                    font = item.font()
                    font.setBold(True)
                    item.setFont(font)
                table.setItem(r, c, item)
        mp = "-" if result.malignancy_probability is None else f"{100 * result.malignancy_probability:.0f} %"
        self.ui.predictedClassLabel.text = result.predicted_class.replace("_", " ")
        self.ui.malignancyLabel.text = mp
        self.ui.undeterminedLabel.text = _("YES - low confidence, do not rely on the class") if result.undetermined else _("no")
        self.ui.undeterminedLabel.styleSheet = "color: #c0392b; font-weight: bold" if result.undetermined else ""
        self.ui.modelVersionLabel.text = f"{result.model} {result.version}".strip()
        if self.ui.tumorClassComboBox.findText(result.predicted_class) >= 0:
            self.ui.tumorClassComboBox.currentText = result.predicted_class  # annotator starts from the prediction
        self.ui.heatmapOpacitySlider.enabled = result.heatmap is not None
        self.updateButtonStates()

    def onHeatmapOpacity(self, value) -> None:
        self.logic.setHeatmapOpacity(value)

    def onOpenSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open Segment Editor."), waitCursor=True):
            self.logic.openInSegmentEditor(self._parameterNode)

    def onSubmit(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Submitting the label failed."), waitCursor=True):
            tumor_class = self.ui.tumorClassComboBox.currentText or None
            with self.busy(_("Submitting label, tumour class and box ...")):
                res = self.logic.submitLabel(self._parameterNode, tumor_class)
            self.ui.statusLabel.text = _("Saved label for study {study}").format(study=res.get("image", "?"))

    def onNextSample(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Fetching the next sample failed."), waitCursor=True):
            with self.busy(_("Fetching the next study to annotate ...")):
                sample = self.logic.nextSample(self._parameterNode, self.ui.strategyComboBox.currentText or "random")
            if not sample:
                slicer.util.infoDisplay(_("The server has no study left to annotate with this strategy."))
                return
            info = sample.get("label_info") or {}
            if info.get("tumor_class") and self.ui.tumorClassComboBox.findText(info["tumor_class"]) >= 0:
                self.ui.tumorClassComboBox.currentText = info["tumor_class"]
            self.ui.statusLabel.text = _("Loaded study {id}").format(id=sample.get("id"))

    def onTrain(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot start training."), waitCursor=True):
            model = self.ui.trainModelComboBox.currentText
            self.logic.startTraining(model)
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.value = 0
            if not self._trainTimer:
                self._trainTimer = qt.QTimer()
                self._trainTimer.setInterval(2000)
                self._trainTimer.connect("timeout()", self.onTrainTimer)
            self._trainTimer.start()

    def onTrainTimer(self) -> None:
        try:
            prog = self.logic.trainingProgress()
        except lib.ServerError as e:
            self.ui.trainStatusLabel.text = str(e)
            self._trainTimer.stop()
            return
        if prog["fraction"] is None:
            self.ui.trainProgressBar.setRange(0, 0)
        else:
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.value = int(100 * prog["fraction"])
        self.ui.trainStatusLabel.text = prog["text"]
        if not prog["running"]:
            self._trainTimer.stop()
            self.ui.trainProgressBar.setRange(0, 100)

    def onStopTrain(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot stop training."), waitCursor=True):
            self.logic.stopTraining()
            self.onTrainTimer()


#
# Logic
#
class ParotidTumorLogic(ScriptedLoadableModuleLogic):
    """Everything the widget does, usable without GUI (scripts, tests, batch processing)::

        logic = ParotidTumorLogic()
        logic.connect("http://127.0.0.1:8000")
        p = logic.getParameterNode(); p.cet1Volume = ...; p.t2Volume = ...; p.roi = ...
        result = logic.classify(p)   # ClassificationResult, heatmap shown over the MRI
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = None
        self.info = None
        self.models = {}
        self.trainers = []
        self.strategies = []
        self.authEnabled = False
        self.lastClassification = None

    def getParameterNode(self):
        return ParotidTumorParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- server
    def connect(self, url, username=None, password=None) -> str:
        """Connect (log in when the server has auth enabled); returns an HTML summary of the models."""
        client = lib.ParotidClient(url)
        try:
            self.authEnabled = client.auth_enabled()
        except lib.ServerError as e:
            if e.status is None:
                raise
            self.authEnabled = False  # older servers without /auth
        if self.authEnabled:
            if not username:
                raise lib.ServerError(_("This server requires a login: enter user name and password, then Connect."))
            client.login(username, password or "")
        self.info = client.info()
        self.client = client
        self.models = lib.models_from_info(self.info)
        self.trainers = sorted(self.info.get("trainers", {}))
        self.strategies = sorted(self.info.get("strategies", {}))
        return lib.models_summary_html(self.info)

    def _client(self):
        if self.client is None:
            raise lib.ServerError(_("Not connected: enter the server address and click Connect."))
        return self.client

    def hasModel(self, name) -> bool:
        return name in self.models

    def missingSequences(self, model, volumes) -> list:
        m = self.models.get(model)
        return [s for s in (m.sequences if m else ()) if s not in volumes]

    def tumorClasses(self) -> list:
        """Classes an annotator can assign (the subtype label set when the server offers it)."""
        for name in ("classify_subtype", "classify_malignancy"):
            if name in self.models and self.models[name].classes:
                return list(self.models[name].classes)
        return ["pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant"]

    # ---------------------------------------------------------------- volumes
    def selectedVolumes(self, p) -> dict:
        return {k: getattr(p, a) for k, a in SEQUENCE_PARAMS.items() if getattr(p, a) is not None}

    def volumeProblem(self, p) -> str:
        try:
            seqlib.check_distinct({k: v.GetID() for k, v in self.selectedVolumes(p).items()})
        except ValueError as e:
            return str(e)
        return ""

    def autoAssignVolumes(self, p, overwrite=False) -> dict:
        """Fill sequence slots from volume names (``*t2*``, ``*post*``, ``*adc*`` ...)."""
        if p is None:
            return {}
        nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                 if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetAttribute("ParotidTumor.Result")]
        taken = {v.GetID() for v in self.selectedVolumes(p).values()} if not overwrite else set()
        free_keys = [k for k, a in SEQUENCE_PARAMS.items() if overwrite or getattr(p, a) is None]
        byname = {n.GetName(): n for n in nodes if n.GetID() not in taken}
        got = seqlib.auto_assign(list(byname), keys=tuple(free_keys))
        for key, name in got.items():
            setattr(p, SEQUENCE_PARAMS[key], byname[name])
        return got

    def referenceVolume(self, p):
        volumes = self.selectedVolumes(p)
        if not volumes:
            raise ValueError(_("Select at least one sequence volume."))
        return volumes[seqlib.reference_key(volumes)]

    @staticmethod
    def worldIJKToRAS(volume) -> np.ndarray:
        """IJK -> world RAS of a volume, including a linear parent transform."""
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
        tnode = volume.GetParentTransformNode()
        if tnode is not None:
            if not tnode.IsTransformToWorldLinear():
                raise ValueError(_("Volume '{name}' is under a non-linear transform: harden it first (Data module).").format(
                    name=volume.GetName()))
            t = vtk.vtkMatrix4x4()
            tnode.GetMatrixTransformToWorld(t)
            ijk_to_ras = slicer.util.arrayFromVTKMatrix(t) @ ijk_to_ras
        return ijk_to_ras

    def buildStudyFile(self, p, path) -> tuple:
        """Write the study file (vector NIfTI on the reference grid) from the selected volumes."""
        problem = self.volumeProblem(p)
        if problem:
            raise ValueError(problem)
        images = {}
        for key, node in self.selectedVolumes(p).items():
            images[key] = lib.image_from_array(slicer.util.arrayFromVolume(node), self.worldIJKToRAS(node))
        image, keys = lib.assemble(images)
        lib.write(image, keys, path)
        return image, keys

    def _volumesKey(self, p) -> tuple:
        """Changes whenever a selected volume, its voxels or its geometry change."""
        key = []
        for k, node in sorted(self.selectedVolumes(p).items()):
            t = node.GetParentTransformNode()
            key.append((k, node.GetID(), node.GetMTime(), node.GetImageData().GetMTime() if node.GetImageData() else 0,
                        t.GetMTime() if t else 0))
        return tuple(key)

    def ensureStudyUploaded(self, p) -> str:
        """Upload the study once per set of volumes; returns its id on the server."""
        client = self._client()
        vkey = (client.server_url, self._volumesKey(p))
        if p.studyId and getattr(self, "_uploadedKey", None) == vkey and client.study_exists(p.studyId):
            return p.studyId  # nothing changed since the last upload: skip re-assembling the study
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "study.nii.gz")
            image, keys = self.buildStudyFile(p, path)
            ref = self.referenceVolume(p)
            study_id = lib.make_study_id(ref.GetName(), image)
            fingerprint = study_id + ":" + ",".join(keys)
            if not client.study_exists(study_id):  # same content -> same id: upload once
                study_id = client.upload_study(path, study_id, {"source": "slicer", "sequences": list(keys)})
        p.studyId, p.studyFingerprint = study_id, fingerprint
        self._uploadedKey = vkey
        return study_id

    # ---------------------------------------------------------------- ROI
    def createRoi(self, reference=None):
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Tumour box")
        roi.GetDisplayNode().SetSelectedColor(0.3, 0.9, 1.0)
        if reference is not None:
            # start with a 30 mm box in the middle of the reference volume
            bounds = [0.0] * 6
            reference.GetRASBounds(bounds)
            roi.SetCenter([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
            roi.SetSize(30.0, 30.0, 30.0)
        return roi

    def roiBox(self, roi, reference) -> list:
        """The ROI as a voxel box on the reference grid (all 8 corners, see ParotidTumorLib.geometry)."""
        # Object (box) -> world RAS: columns 0-2 are the box axes (incl. any parent-transform scaling),
        # column 3 its centre; GetSize() is the edge length along those axes.
        object_to_world = slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
        size = list(roi.GetSize())  # edge lengths along the ROI's own axes
        ras_to_ijk = np.linalg.inv(self.worldIJKToRAS(reference))
        shape = reference.GetImageData().GetDimensions()
        return lib.roi_to_box(object_to_world[:3, 3], size, ras_to_ijk, shape, axes_ras=object_to_world[:3, :3])

    def setRoiFromBox(self, p, box, reference):
        center, size, axes = lib.box_to_roi(box, self.worldIJKToRAS(reference))
        if not p.roi:
            p.roi = self.createRoi()
        object_to_node = np.eye(4)
        object_to_node[:3, :3], object_to_node[:3, 3] = axes, center
        p.roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
        p.roi.SetSize(*[float(v) for v in size])
        return p.roi

    # ---------------------------------------------------------------- inference
    def segment(self, p):
        study_id = self.ensureStudyUploaded(p)
        resp = self._client().segment(study_id)
        return self._loadLabelResult(p, resp, "segmentation")

    def contourBox(self, p):
        if not p.roi:
            raise ValueError(_("Place a box around the tumour first."))
        box = self.roiBox(p.roi, self.referenceVolume(p))
        study_id = self.ensureStudyUploaded(p)
        resp = self._client().contour_box(study_id, box)
        return self._loadLabelResult(p, resp, "box contour")

    def classify(self, p, model=None):
        box = self.roiBox(p.roi, self.referenceVolume(p)) if p.roi else None
        study_id = self.ensureStudyUploaded(p)
        result = self._client().classify(study_id, box, model or p.classifier)
        self.lastClassification = result
        if result.heatmap is not None:
            self._showHeatmap(p, result.heatmap)
        return result

    def _resultNode(self, className, name):
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
        node.SetAttribute("ParotidTumor.Result", "1")
        return node

    def _loadLabelResult(self, p, resp, what):
        if not resp.has_image:
            raise lib.ServerError(_("The server returned no label image for {what}.").format(what=what))
        vol = lib.ResultVolume.from_bytes(resp.image, resp.image_name or "label.nii.gz")
        reference = self.referenceVolume(p)
        labelmap = self._resultNode("vtkMRMLLabelMapVolumeNode", "ParotidTumor label")
        slicer.util.updateVolumeFromArray(labelmap, vol.array.astype(np.uint8))
        labelmap.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(vol.ijk_to_ras))
        seg = p.segmentation
        if seg is None:
            seg = self._resultNode("vtkMRMLSegmentationNode", "Parotid segmentation")
            seg.CreateDefaultDisplayNodes()
            p.segmentation = seg
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        self._replaceSegmentsFromLabelmap(seg, labelmap)
        slicer.mrmlScene.RemoveNode(labelmap)
        slicer.util.setSliceViewerLayers(background=reference)
        return seg

    @staticmethod
    def _replaceSegmentsFromLabelmap(seg, labelmap):
        """Segments named parotid_gland / tumor with fixed colours, whatever the server sent."""
        segmentation = seg.GetSegmentation()
        for value, name in SEGMENT_NAMES.items():
            sid = segmentation.GetSegmentIdBySegmentName(name)
            if sid:
                segmentation.RemoveSegment(sid)
        arr = slicer.util.arrayFromVolume(labelmap)
        for value, name in SEGMENT_NAMES.items():
            sid = segmentation.AddEmptySegment(name, name, SEGMENT_COLORS[value])
            if np.any(arr == value):
                slicer.util.updateSegmentBinaryLabelmapFromArray((arr == value).astype(np.uint8), seg, sid, labelmap)

    def _showHeatmap(self, p, vol):
        reference = self.referenceVolume(p)
        heat = p.heatmap
        if heat is None:
            heat = self._resultNode("vtkMRMLScalarVolumeNode", "Grad-CAM heatmap")
            p.heatmap = heat
        slicer.util.updateVolumeFromArray(heat, vol.array.astype(np.float32))
        heat.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(vol.ijk_to_ras))
        heat.CreateDefaultDisplayNodes()
        display = heat.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heatColorNodeID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetLowerThreshold(0.05)  # leave the MRI visible where the model did not look
        display.ApplyThresholdOn()
        slicer.util.setSliceViewerLayers(background=reference, foreground=heat, foregroundOpacity=p.heatmapOpacity)

    @staticmethod
    def heatColorNodeID():
        for name in HEATMAP_COLOR_NAMES:
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            if node is not None and node.IsA("vtkMRMLColorNode"):
                return node.GetID()
        return HEATMAP_COLOR_FALLBACK_ID

    def setHeatmapOpacity(self, opacity):
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetForegroundOpacity(float(opacity))

    def openInSegmentEditor(self, p):
        if p.segmentation is None:
            raise ValueError(_("Run Segment or Contour in box first."))
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.segmentation)
        if hasattr(editor, "setSourceVolumeNode"):  # Slicer >= 5.2
            editor.setSourceVolumeNode(self.referenceVolume(p))
        else:
            editor.setMasterVolumeNode(self.referenceVolume(p))

    # ---------------------------------------------------------------- annotation
    def labelArray(self, p) -> np.ndarray:
        """The segmentation as a label map array ``[k, j, i]`` on the reference grid (1 gland, 2 tumour)."""
        reference = self.referenceVolume(p)
        if reference.GetParentTransformNode() is not None:
            raise ValueError(_("Harden the transform of '{name}' before submitting (Data module).").format(
                name=reference.GetName()))
        seg = p.segmentation
        out = np.zeros(slicer.util.arrayFromVolume(reference).shape, np.uint8)
        for value, name in sorted(SEGMENT_NAMES.items()):  # tumour written last: it wins on overlap
            sid = seg.GetSegmentation().GetSegmentIdBySegmentName(name)
            if sid:
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, reference)
                out[mask > 0] = value
        return out

    def submitLabel(self, p, tumor_class=None, tag="final") -> dict:
        """Save the refined label + tumour class + box (from the tumour segment, else the ROI)."""
        if p.segmentation is None:
            raise ValueError(_("Nothing to submit: run Segment / Contour in box, or draw the label first."))
        reference = self.referenceVolume(p)
        study_id = self.ensureStudyUploaded(p)
        arr = self.labelArray(p)
        box = lib.roi_from_label(arr, SEGMENTATION_LABELS["tumor"])
        if box is None and p.roi:
            box = self.roiBox(p.roi, reference)
        with tempfile.TemporaryDirectory() as tmp:
            path = lib.write_label_map(arr, self.worldIJKToRAS(reference), os.path.join(tmp, f"{study_id}.nii.gz"))
            return self._client().save_label(study_id, path, tumor_class=tumor_class, roi=box, tag=tag)

    def nextSample(self, p, strategy="random") -> dict:
        """Fetch the next study to annotate, load its sequences (and existing label) into the scene."""
        client = self._client()
        sample = client.next_sample(strategy)
        if not sample or not sample.get("id"):
            return {}
        study_id = sample["id"]
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_study(study_id, os.path.join(tmp, f"{study_id}.nii.gz"))
            components = lib.study.read_components(path)
        for key, (array, ijk_to_ras) in components.items():
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{study_id} {key}")
            slicer.util.updateVolumeFromArray(node, array)
            node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
            node.CreateDefaultDisplayNodes()
            setattr(p, SEQUENCE_PARAMS[key], node)
        for key in SEQUENCE_PARAMS:
            if key not in components:
                setattr(p, SEQUENCE_PARAMS[key], None)
        p.studyId, p.studyFingerprint = study_id, ""
        p.segmentation = None
        reference = self.referenceVolume(p)
        slicer.util.setSliceViewerLayers(background=reference, foreground=None, fit=True)
        # an existing final label (e.g. to review it): load it with its class and box
        try:
            with tempfile.TemporaryDirectory() as tmp:
                lpath = client.download_label(study_id, os.path.join(tmp, "label.nii.gz"))
                with open(lpath, "rb") as f:
                    data = f.read()
            self._loadLabelResult(p, lib.InferResponse(params={}, image=data, image_name="label.nii.gz"), "label")
            info = client.label_info(study_id)
            sample["label_info"] = info
            if info.get("roi"):
                self.setRoiFromBox(p, info["roi"], reference)
        except lib.ServerError as e:
            if e.status != 404:  # 404: not labelled yet, the usual case
                raise
        return sample

    # ---------------------------------------------------------------- training
    def startTraining(self, model=None, params=None):
        return self._client().train_start(model, params)

    def stopTraining(self):
        return self._client().train_stop()

    def trainingProgress(self) -> dict:
        return lib.training_progress(self._client().train_status())


#
# Test
#
class ParotidTumorTest(ScriptedLoadableModuleTest):
    """Whole-workflow test, run INSIDE 3D Slicer against a running parotid MONAI Label server.

    It cannot run in this repository's CI: there is no 3D Slicer there. CI instead tests the
    Slicer-free ParotidTumorLib against the real server (tests/test_slicer_lib*.py). Run it with

        PAROTID_SERVER_URL=http://127.0.0.1:8000 PAROTID_SAMPLE_STUDIES=/path/to/sample-data/studies \\
        Slicer --no-main-window --python-code "import slicer.util; slicer.util.selectModule('ParotidTumor'); \\
          slicer.modules.ParotidTumorWidget.onReload(); import ParotidTumor; ParotidTumor.ParotidTumorTest().runTest(); exit()"

    (or ctest, through slicer_add_python_unittest). Optional PAROTID_RAW_CASE: a folder of native
    per-sequence acquisitions <SEQ>.nii.gz (``parotid-synth`` without --no-raw writes raw/<id>/);
    without it the first sample study is split into its sequences. Skipped when PAROTID_SERVER_URL
    is unset.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        url = os.environ.get("PAROTID_SERVER_URL")
        if not url:
            self.delayDisplay("PAROTID_SERVER_URL is not set: skipping the server workflow test")
            return
        self.test_ParotidTumor_workflow(url)

    def _loadSequences(self, studies):
        """One volume per sequence, named like a scanner would ("<case> CET1" ...).

        PAROTID_RAW_CASE: a folder of native acquisitions <SEQ>.nii.gz (parotid-synth without --no-raw),
        each with its own grid -- the realistic case. Otherwise the first study file of
        PAROTID_SAMPLE_STUDIES is split into its sequences (all on the reference grid).
        """
        raw = os.environ.get("PAROTID_RAW_CASE")
        nodes = {}
        if raw:
            case = os.path.basename(os.path.normpath(raw))
            for fn in sorted(os.listdir(raw)):
                key = fn.split(".")[0]
                nodes[key] = slicer.util.loadVolume(os.path.join(raw, fn), {"name": f"{case} {key}"})
            return case, nodes
        fn = sorted(f for f in os.listdir(studies) if f.endswith(".nii.gz"))[0]
        case = fn[: -len(".nii.gz")]
        for key, (array, ijk_to_ras) in lib.study.read_components(os.path.join(studies, fn)).items():
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{case} {key}")
            slicer.util.updateVolumeFromArray(node, array)
            node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
            node.CreateDefaultDisplayNodes()
            nodes[key] = node
        return case, nodes

    def test_ParotidTumor_workflow(self, url):
        studies = os.environ.get("PAROTID_SAMPLE_STUDIES")
        self.assertTrue(studies and os.path.isdir(studies), "set PAROTID_SAMPLE_STUDIES to sample-data/studies")
        logic = ParotidTumorLogic()
        summary = logic.connect(url)
        self.assertIn("classify_subtype", summary)

        case, nodes = self._loadSequences(studies)
        p = logic.getParameterNode()
        got = logic.autoAssignVolumes(p, overwrite=True)
        self.assertEqual(set(got), set(nodes), "every raw sequence volume should be auto-assigned by its name")
        self.assertEqual(logic.volumeProblem(p), "")

        # same volume twice is refused
        p.t2Volume, saved = p.cet1Volume, p.t2Volume
        self.assertIn("same volume", logic.volumeProblem(p))
        p.t2Volume = saved

        # segmentation of the whole study, then a box around the tumour it found
        seg = logic.segment(p)
        self.assertTrue(seg.GetSegmentation().GetSegmentIdBySegmentName("tumor"))
        reference = logic.referenceVolume(p)
        arr = logic.labelArray(p)
        box = lib.roi_from_label(arr, SEGMENTATION_LABELS["tumor"])
        self.assertIsNotNone(box, "the segmentation model found no tumour in the sample study")
        logic.setRoiFromBox(p, box, reference)
        self.assertEqual(logic.roiBox(p.roi, reference), box)

        # classification with the box: table values and a heatmap on the reference grid
        result = logic.classify(p, "classify_subtype")
        self.assertAlmostEqual(sum(r["score"] for r in result.prediction), 1.0, places=3)
        self.assertIsNotNone(p.heatmap)
        self.assertEqual(p.heatmap.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        np.testing.assert_allclose(logic.worldIJKToRAS(p.heatmap), logic.worldIJKToRAS(reference), atol=1e-3)
        layoutManager = slicer.app.layoutManager()
        if layoutManager:  # None with --no-main-window
            composite = layoutManager.sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
            self.assertEqual(composite.GetForegroundVolumeID(), p.heatmap.GetID())

        # box contour, then submit the label with the predicted class
        logic.contourBox(p)
        res = logic.submitLabel(p, result.predicted_class)
        info = logic.client.label_info(res["image"])
        self.assertEqual(info.get("tumor_class"), result.predicted_class)
        self.assertEqual(len(info.get("roi", [])), 6)

        # admin: next sample and training status
        sample = logic.nextSample(p, "random")  # {} when every study is labelled
        if sample.get("id"):
            self.assertTrue(logic.referenceVolume(p).GetName().startswith(sample["id"]))
        logic.trainingProgress()
        self.delayDisplay("ParotidTumor workflow test passed")
