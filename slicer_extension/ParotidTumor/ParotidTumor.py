"""ParotidTumor: 3D Slicer client of the parotid MONAI Label server.

Layout (as SlicerMONAIAuto3DSeg keeps its Lib): this file holds Slicer's module class, the parameter
node, the Widget, the Test and a thin ``ParotidTumorLogic``. The logic itself lives in
``ParotidTumorLib``: Slicer-free parts (HTTP client, geometry, study files, response parsing,
background tasks) and ``ParotidTumorLib.mrml`` (MRML-bound: volumes <-> study, ROI <-> box,
label -> segmentation, heatmap, Next sample), which needs only Slicer's MRML classes and is tested in
CI on the ``slicer-core`` wheel (tests/test_slicer_mrml*.py).

Server requests run off the GUI thread (``ParotidTumorLib.background``): the widget shows progress,
offers Cancel, gives up after a timeout; only the GUI thread touches MRML. Scripts and tests use the
same actions synchronously (``logic.segment(p)`` ...).
"""

import os
import tempfile
from typing import Annotated, Optional

import numpy as np
import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
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
from ParotidTumorLib import background, mrml, sampledata, tasks
from ParotidTumorLib import sequences as seqlib
from ParotidTumorLib.labels import SEGMENTATION_LABELS

SETTINGS_URL = "ParotidTumor/ServerURL"
SETTINGS_URL_HISTORY = "ParotidTumor/ServerURLHistory"
SETTINGS_TIMEOUT = "ParotidTumor/RequestTimeoutSeconds"
DEFAULT_REQUEST_TIMEOUT_S = 900.0  # whole action (upload + inference); the client's per-request timeouts apply too
POLL_MS = 100  # how often the GUI looks at a running request
TRAIN_POLL_MS = 2000
SAMPLE_NAME = "ParotidTumorSynthetic"

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
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
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
            "template and SlicerMONAIAuto3DSeg (thin module over a library)."
        )
        # synthetic sample case in the Sample Data module (generated locally: works offline)
        slicer.app.connect("startupCompleted()", registerSampleData)


def sampleDataFolder() -> str:
    return os.path.join(slicer.app.cachePath, "ParotidTumor")


def registerSampleData() -> None:
    """Register the generated synthetic case with SampleData, from local files (file:// URIs)."""
    import pathlib

    import SampleData

    try:
        paths = sampledata.write_case(sampleDataFolder())
    except OSError as e:  # e.g. read-only cache folder: the module works without its sample case
        import logging

        logging.warning(f"ParotidTumor: synthetic sample case not registered ({e})")
        return
    keys = [k for k in paths if k != "label"]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Parotid tumour (synthetic)",
        sampleName=SAMPLE_NAME,
        uris=[pathlib.Path(paths[k]).as_uri() for k in keys],
        fileNames=[os.path.basename(paths[k]) for k in keys],
        nodeNames=[f"{sampledata.CASE} {k}" for k in keys],
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "ParotidTumor.png"),
        loadFileType=["VolumeFile"] * len(keys),
        checksums=None,
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
        self._trainTask = None
        self._observedRoi = None
        self._task = None  # the running request (one at a time)
        self._job = None
        self._onDone = None
        self._pollTimer = None

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
        self.ui.cancelRequestButton.connect("clicked(bool)", self.onCancelRequest)
        self.ui.classifierComboBox.connect("currentTextChanged(QString)", self.onClassifierChanged)
        self.ui.heatmapOpacitySlider.connect("valueChanged(double)", self.onHeatmapOpacity)
        for key, name in SEQUENCE_SELECTORS.items():
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_MS)
        self._pollTimer.connect("timeout()", self._pollTask)
        self._showBusy(False)
        self.ui.resultsTable.setColumnCount(3)
        self.ui.resultsTable.setHorizontalHeaderLabels([_("Class"), _("Probability"), ""])
        self.ui.resultsTable.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        self.initializeParameterNode()
        self.updateButtonStates()

    def cleanup(self) -> None:
        self.removeObservers()
        for timer in (self._trainTimer, self._pollTimer):
            if timer:
                timer.stop()
        if self._task:
            self._task.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # stop following the parameter node and the ROI while the module is not shown
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtonStates)
        self._observeRoi(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        # newly loaded volumes fill empty sequence slots by name -- only with volumes of the same
        # patient/study as those already selected (ParotidTumorLib.mrml.auto_assign)
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
        idle = self._task is None
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
        ready = connected and idle and not problem and bool(volumes)
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
            elif problem:
                button.toolTip = problem
            else:
                button.toolTip = ""
        self.ui.connectButton.enabled = idle
        self.ui.submitButton.enabled = ready and bool(p and p.segmentation)
        self.ui.nextSampleButton.enabled = connected and idle
        self.ui.trainButton.enabled = connected and idle and self.ui.trainModelComboBox.count > 0
        self.ui.stopTrainButton.enabled = connected and idle
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

    # ---------------------------------------------------------------- background requests
    def requestTimeout(self) -> float:
        value = qt.QSettings().value(SETTINGS_TIMEOUT)
        try:
            return float(value) if value else DEFAULT_REQUEST_TIMEOUT_S
        except (TypeError, ValueError):
            return DEFAULT_REQUEST_TIMEOUT_S

    def _showBusy(self, busy: bool) -> None:
        self.ui.requestProgressBar.visible = busy
        self.ui.cancelRequestButton.visible = busy
        self.ui.cancelRequestButton.enabled = busy
        if busy:
            self.ui.requestProgressBar.setRange(0, 0)  # indeterminate: the server reports no progress

    def runJob(self, text, makeJob, onDone=None) -> None:
        """Prepare `makeJob()` on the GUI thread (reads MRML), run its server part in a worker thread,
        apply its result on the GUI thread when done. Slicer stays responsive meanwhile."""
        if self._task is not None:
            slicer.util.warningDisplay(_("A request is still running: wait for it or click Cancel."))
            return
        try:
            job = makeJob()
        except Exception as e:  # bad input found before sending anything
            slicer.util.errorDisplay(str(e))
            return
        self._job, self._onDone = job, onDone
        self._task = background.BackgroundTask(job.work, timeout_s=self.requestTimeout(), name=text).start()
        self.ui.statusLabel.text = text + " ..."
        self._showBusy(True)
        self.updateButtonStates()
        self._pollTimer.start()

    def _pollTask(self) -> None:
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        state = task.poll()
        if state == background.RUNNING:
            self.ui.statusLabel.text = task.message()
            return
        self._pollTimer.stop()
        job, onDone = self._job, self._onDone
        self._task = self._job = self._onDone = None
        self._showBusy(False)
        try:
            if state == background.DONE:
                value = job.apply(task.result)  # MRML is touched here, on the GUI thread only
                self.ui.statusLabel.text = task.message()
                if onDone:
                    onDone(value)
            elif state == background.FAILED:
                self.ui.statusLabel.text = task.message()
                slicer.util.errorDisplay(str(task.error))
            else:  # cancelled / timed out
                self.ui.statusLabel.text = task.message()
        except Exception as e:
            self.ui.statusLabel.text = _("Failed: ") + str(e)
            slicer.util.errorDisplay(str(e))
        finally:
            self.updateButtonStates()

    def onCancelRequest(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._pollTask()

    # ---------------------------------------------------------------- actions
    def onConnect(self) -> None:
        try:
            url = lib.normalize_url(self.ui.serverComboBox.currentText)
        except ValueError as e:
            slicer.util.errorDisplay(str(e))
            return
        user, password = self.ui.userLineEdit.text or None, self.ui.passwordLineEdit.text or None

        def done(summary):
            self.ui.loginFrame.visible = self.logic.authEnabled
            self._rememberUrl(url)
            self.ui.serverInfoLabel.text = summary
            self._fillModelLists()
            self.logic.autoAssignVolumes(self._parameterNode, overwrite=False)

        self.runJob(_("Connecting to {url}").format(url=url), lambda: self.logic.connectJob(url, user, password), done)

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
        saved = self._parameterNode.classifier if self._parameterNode else ""
        # refilling emits currentTextChanged with the first item: keep it from overwriting the saved choice
        wasBlocked = self.ui.classifierComboBox.blockSignals(True)
        self.ui.classifierComboBox.clear()
        self.ui.classifierComboBox.addItems(classifiers)
        if saved in classifiers:
            self.ui.classifierComboBox.currentText = saved
        self.ui.classifierComboBox.blockSignals(wasBlocked)
        if self._parameterNode and classifiers and saved not in classifiers:
            self._parameterNode.classifier = self.ui.classifierComboBox.currentText
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
        p = self._parameterNode
        self.runJob(_("Segmenting (whole study)"), lambda: self.logic.segmentJob(p), lambda seg: self._showSegmentation())

    def onContour(self) -> None:
        p = self._parameterNode
        self.runJob(_("Contouring the tumour in the box"), lambda: self.logic.contourJob(p), lambda seg: self._showSegmentation())

    def onClassify(self) -> None:
        p = self._parameterNode
        self.runJob(_("Classifying the tumour"), lambda: self.logic.classifyJob(p), self._showClassification)

    def _showSegmentation(self):
        self.ui.statusLabel.text = _("Result loaded as segmentation '{name}'. Refine it in Segment Editor.").format(
            name=self._parameterNode.segmentation.GetName())
        self.ui.sequencesResultLabel.text = lib.sequences_summary(self.logic.lastLabelInfo) or "-"
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
        self.ui.undeterminedLabel.text = (_("YES - do not rely on the class: ") + result.undetermined_text
                                          if result.undetermined else _("no"))
        self.ui.undeterminedLabel.toolTip = "\n".join(result.undetermined_reasons)
        self.ui.undeterminedLabel.styleSheet = "color: #c0392b; font-weight: bold" if result.undetermined else ""
        self.ui.modelVersionLabel.text = f"{result.model} {result.version}".strip()
        self.ui.sequencesResultLabel.text = "\n".join(
            t for t in (lib.sequences_summary(result.raw), lib.input_check_summary(result.raw)) if t) or "-"
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
        p = self._parameterNode
        tumor_class = self.ui.tumorClassComboBox.currentText or None

        def done(res):
            self.ui.statusLabel.text = _("Saved label for study {study}").format(study=res.get("image", "?"))

        self.runJob(_("Submitting label, tumour class and box"), lambda: self.logic.submitJob(p, tumor_class), done)

    def onNextSample(self) -> None:
        p = self._parameterNode
        strategy = self.ui.strategyComboBox.currentText or "random"

        def done(sample):
            if not sample:
                slicer.util.infoDisplay(_("The server has no study left to annotate with this strategy."))
                return
            info = sample.get("label_info") or {}
            if info.get("tumor_class") and self.ui.tumorClassComboBox.findText(info["tumor_class"]) >= 0:
                self.ui.tumorClassComboBox.currentText = info["tumor_class"]
            self.ui.statusLabel.text = _("Loaded study {id}").format(id=sample.get("id"))

        self.runJob(_("Fetching the next study to annotate"), lambda: self.logic.nextSampleJob(p, strategy), done)

    # ---------------------------------------------------------------- training (polled, never blocking)
    def onTrain(self) -> None:
        model = self.ui.trainModelComboBox.currentText

        def done(_result):
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.value = 0
            if not self._trainTimer:
                self._trainTimer = qt.QTimer()
                self._trainTimer.setInterval(TRAIN_POLL_MS)
                self._trainTimer.connect("timeout()", self.onTrainTimer)
            self._trainTimer.start()

        self.runJob(_("Starting training"), lambda: self.logic.startTrainingJob(model), done)

    def onTrainTimer(self) -> None:
        """Each tick: show the answer of the previous status request, start the next one (in a worker
        thread: a slow server never blocks Slicer)."""
        task = self._trainTask
        if task is not None:
            state = task.poll()
            if state == background.RUNNING:
                return
            self._trainTask = None
            if state == background.DONE:
                self._showTrainingProgress(task.result)
                if not task.result["running"]:
                    self._trainTimer and self._trainTimer.stop()
                    return
            elif state == background.FAILED:
                self.ui.trainStatusLabel.text = str(task.error)
                self._trainTimer and self._trainTimer.stop()
                return
        client = self.logic.client
        if client is not None:
            self._trainTask = background.BackgroundTask(
                lambda token: lib.training_progress(client.train_status()), timeout_s=60, name=_("Training status")).start()

    def _showTrainingProgress(self, prog) -> None:
        if prog["fraction"] is None:
            self.ui.trainProgressBar.setRange(0, 0)
        else:
            self.ui.trainProgressBar.setRange(0, 100)
            self.ui.trainProgressBar.value = int(100 * prog["fraction"])
        self.ui.trainStatusLabel.text = prog["text"]
        if not prog["running"]:
            self.ui.trainProgressBar.setRange(0, 100)

    def onStopTrain(self) -> None:
        self.runJob(_("Stopping training"), lambda: self.logic.stopTrainingJob(), lambda _r: self.onTrainTimer())


#
# Logic
#
class Job:
    """One module action: ``work(token)`` talks to the server (any thread, no MRML), ``apply(result)``
    puts the result into the scene (GUI thread)."""

    def __init__(self, work, apply=None):
        self.work = work
        self.apply = apply or (lambda result: result)

    def run(self):
        """Synchronously, for scripts and tests."""
        return self.apply(self.work(background.CancelToken()))


class ParotidTumorLogic(ScriptedLoadableModuleLogic):
    """Everything the widget does, usable without GUI (scripts, tests, batch processing)::

        logic = ParotidTumorLogic()
        logic.connect("http://127.0.0.1:8000")
        p = logic.getParameterNode(); p.cet1Volume = ...; p.t2Volume = ...; p.roi = ...
        result = logic.classify(p)   # ClassificationResult, heatmap shown over the MRI

    Thin: MRML work is delegated to ``ParotidTumorLib.mrml``, server work to ``ParotidTumorLib.tasks``.
    Each action ``x(p)`` is ``xJob(p).run()``; the widget runs the same jobs in the background.
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
        self.lastLabelInfo = {}  # JSON params of the last segmentation/contour answer (sequences used, ...)
        self._uploadedKey = None

    @property
    def scene(self):
        return slicer.mrmlScene

    def getParameterNode(self):
        return ParotidTumorParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- server
    def connectJob(self, url, username=None, password=None) -> Job:
        def work(token):
            client = lib.ParotidClient(url)
            try:
                auth = client.auth_enabled()
            except lib.ServerError as e:
                if e.status is None:
                    raise
                auth = False  # older servers without /auth
            if auth:
                if not username:
                    raise lib.ServerError(_("This server requires a login: enter user name and password, then Connect."))
                client.login(username, password or "")
            return client, auth, client.info()

        def apply(result):
            self.client, self.authEnabled, self.info = result
            self.models = lib.models_from_info(self.info)
            self.trainers = sorted(self.info.get("trainers", {}))
            self.strategies = sorted(self.info.get("strategies", {}))
            return lib.models_summary_html(self.info)

        return Job(work, apply)

    def connect(self, url, username=None, password=None) -> str:
        """Connect (log in when the server has auth enabled); returns an HTML summary of the models."""
        return self.connectJob(url, username, password).run()

    def _client(self):
        if self.client is None:
            raise lib.ServerError(_("Not connected: enter the server address and click Connect."))
        return self.client

    def hasModel(self, name) -> bool:
        return name in self.models

    def missingSequences(self, model, volumes) -> list:
        """The sequences `model` requires that `volumes` lack (its other inputs may be missing)."""
        m = self.models.get(model)
        return [s for s in (m.required if m else ()) if s not in volumes]

    def tumorClasses(self) -> list:
        """Classes an annotator can assign: those of every label set the server accepts (/info label_sets)."""
        return lib.tumor_classes_from_info(self.info)

    # ---------------------------------------------------------------- volumes
    def selectedVolumes(self, p) -> dict:
        return {k: getattr(p, a) for k, a in SEQUENCE_PARAMS.items() if getattr(p, a) is not None}

    def volumeProblem(self, p) -> str:
        """Same volume twice, or volumes of different patients/studies: '' when fine."""
        return mrml.study_volume_problem(self.scene, self.selectedVolumes(p))

    def autoAssignVolumes(self, p, overwrite=False) -> dict:
        """Fill sequence slots from volume names (``*t2*``, ``*post*``, ``*adc*`` ...), with volumes of
        one patient/study only; returns ``{key: volume name}``."""
        if p is None:
            return {}
        got = mrml.auto_assign(self.scene, {k: getattr(p, a) for k, a in SEQUENCE_PARAMS.items()}, overwrite)
        for key, node in got.items():
            setattr(p, SEQUENCE_PARAMS[key], node)
        return {k: n.GetName() for k, n in got.items()}

    def referenceVolume(self, p):
        return mrml.reference_volume(self.selectedVolumes(p))

    @staticmethod
    def worldIJKToRAS(volume) -> np.ndarray:
        """IJK -> world RAS of a volume, including a linear parent transform."""
        return mrml.world_ijk_to_ras(volume)

    def buildStudyFile(self, p, path) -> tuple:
        """Write the study file (vector NIfTI on the reference grid) from the selected volumes."""
        problem = self.volumeProblem(p)
        if problem:
            raise ValueError(problem)
        image, keys = lib.assemble(mrml.study_images(self.selectedVolumes(p)))
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

    def prepareStudy(self, p) -> tasks.PreparedStudy:
        """GUI thread: the study file of the selected volumes (skipped when they were sent before)."""
        client = self._client()
        vkey = (client.server_url, self._volumesKey(p))
        if p.studyId and self._uploadedKey == vkey:
            return tasks.PreparedStudy(p.studyId, None, volumes_key=vkey)
        tmp = tempfile.mkdtemp(prefix="parotid-study-")
        try:
            path = os.path.join(tmp, "study.nii.gz")
            image, keys = self.buildStudyFile(p, path)
            study_id = lib.make_study_id(self.referenceVolume(p).GetName(), image)
        except Exception:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tasks.PreparedStudy(study_id, path, keys, tmp, vkey)

    def _studyUploaded(self, p, prepared, study_id) -> None:
        """GUI thread, after the server answered: refuse results for volumes changed meanwhile."""
        if (self._client().server_url, self._volumesKey(p)) != prepared.volumes_key:
            raise ValueError(_("The selected volumes changed while the request ran: run it again."))
        p.studyId = study_id
        p.studyFingerprint = study_id + ":" + ",".join(prepared.keys) if prepared.keys else p.studyFingerprint
        self._uploadedKey = prepared.volumes_key

    def ensureStudyUploaded(self, p) -> str:
        """Upload the study once per set of volumes; returns its id on the server."""
        prepared = self.prepareStudy(p)
        study_id = tasks.ensure_uploaded(self._client(), prepared)
        self._studyUploaded(p, prepared, study_id)
        return study_id

    # ---------------------------------------------------------------- ROI
    def createRoi(self, reference=None):
        return mrml.create_roi(self.scene, reference)

    def roiBox(self, roi, reference) -> list:
        """The ROI as a voxel box on the reference grid (all 8 corners, world frame)."""
        return mrml.roi_box(roi, reference)

    def setRoiFromBox(self, p, box, reference):
        p.roi = mrml.set_roi_from_box(self.scene, p.roi, box, reference)
        return p.roi

    # ---------------------------------------------------------------- inference
    def _labelJob(self, p, work) -> Job:
        prepared = self.prepareStudy(p)
        client = self._client()

        def apply(result):
            study_id, label = result
            self._studyUploaded(p, prepared, study_id)
            self.lastLabelInfo = label.info
            return self._loadLabel(p, label)

        return Job(lambda token: work(client, prepared, token), apply)

    def segmentJob(self, p) -> Job:
        return self._labelJob(p, lambda c, prep, token: tasks.segment(c, prep, token))

    def contourJob(self, p) -> Job:
        if not p.roi:
            raise ValueError(_("Place a box around the tumour first."))
        box = self.roiBox(p.roi, self.referenceVolume(p))
        return self._labelJob(p, lambda c, prep, token: tasks.contour_box(c, prep, box, token))

    def classifyJob(self, p, model=None) -> Job:
        box = self.roiBox(p.roi, self.referenceVolume(p)) if p.roi else None
        model = model or p.classifier
        prepared = self.prepareStudy(p)
        client = self._client()

        def apply(result):
            study_id, res = result
            self._studyUploaded(p, prepared, study_id)
            self.lastClassification = res
            if res.heatmap is not None:
                self._showHeatmap(p, res.heatmap)
            return res

        return Job(lambda token: tasks.classify(client, prepared, box, model, token), apply)

    def segment(self, p):
        return self.segmentJob(p).run()

    def contourBox(self, p):
        return self.contourJob(p).run()

    def classify(self, p, model=None):
        return self.classifyJob(p, model).run()

    def _loadLabel(self, p, label):
        reference = self.referenceVolume(p)
        p.segmentation = mrml.label_to_segmentation(self.scene, p.segmentation, label.array, label.ijk_to_ras, reference)
        mrml.set_slice_layers(self.scene, background=reference)
        return p.segmentation

    def _showHeatmap(self, p, vol):
        reference = self.referenceVolume(p)
        p.heatmap = mrml.show_heatmap(self.scene, p.heatmap, vol.array, vol.ijk_to_ras, name=vol.name or "Heatmap")
        mrml.set_slice_layers(self.scene, background=reference, foreground=p.heatmap, opacity=p.heatmapOpacity)

    def heatColorNodeID(self):
        return mrml.heat_color_node_id(self.scene)

    def setHeatmapOpacity(self, opacity):
        mrml.set_slice_layers(self.scene, opacity=opacity)

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
        return mrml.label_array(p.segmentation, self.referenceVolume(p))

    def submitJob(self, p, tumor_class=None, tag="final") -> Job:
        """Save the refined label + tumour class + box (from the tumour segment, else the ROI)."""
        if p.segmentation is None:
            raise ValueError(_("Nothing to submit: run Segment / Contour in box, or draw the label first."))
        reference = self.referenceVolume(p)
        arr = self.labelArray(p)
        box = lib.roi_from_label(arr, SEGMENTATION_LABELS["tumor"])
        if box is None and p.roi:
            box = self.roiBox(p.roi, reference)
        prepared = self.prepareStudy(p)
        path = lib.write_label_map(arr, self.worldIJKToRAS(reference),
                                   os.path.join(tempfile.mkdtemp(prefix="parotid-label-"), "label.nii.gz"))
        client = self._client()

        def apply(result):
            study_id, res = result
            self._studyUploaded(p, prepared, study_id)
            return res

        return Job(lambda token: tasks.submit_label(client, prepared, path, tumor_class, box, tag, token), apply)

    def submitLabel(self, p, tumor_class=None, tag="final") -> dict:
        return self.submitJob(p, tumor_class, tag).run()

    def nextSampleJob(self, p, strategy="random") -> Job:
        """Fetch the next study to annotate; load its sequences (and existing label, class, box).
        Sequences the study lacks are CLEARED, never filled from other volumes in the scene."""
        client = self._client()

        def apply(fetched):
            if not fetched:
                return {}
            sample, study_id = fetched["sample"], fetched["sample"]["id"]
            nodes = mrml.load_study_volumes(self.scene, study_id, fetched["components"])
            for key, attr in SEQUENCE_PARAMS.items():
                setattr(p, attr, nodes.get(key))
            p.segmentation = None
            p.studyId, p.studyFingerprint = study_id, study_id + ":" + ",".join(nodes)
            self._uploadedKey = (client.server_url, self._volumesKey(p))  # it IS that server study
            reference = self.referenceVolume(p)
            mrml.set_slice_layers(self.scene, background=reference, foreground=None)
            app = getattr(slicer, "app", None)  # None when run on MRML alone (slicer-core)
            if app is not None and app.layoutManager():
                slicer.util.resetSliceViews()
            if fetched["label"] is not None:
                self._loadLabel(p, fetched["label"])
            if fetched["label_info"].get("roi"):
                self.setRoiFromBox(p, fetched["label_info"]["roi"], reference)
            return sample

        return Job(lambda token: tasks.next_sample(client, strategy, token), apply)

    def nextSample(self, p, strategy="random") -> dict:
        return self.nextSampleJob(p, strategy).run()

    # ---------------------------------------------------------------- training
    def startTrainingJob(self, model=None, params=None) -> Job:
        client = self._client()
        return Job(lambda token: client.train_start(model, params))

    def stopTrainingJob(self) -> Job:
        client = self._client()
        return Job(lambda token: client.train_stop())

    def startTraining(self, model=None, params=None):
        return self.startTrainingJob(model, params).run()

    def stopTraining(self):
        return self.stopTrainingJob().run()

    def trainingProgress(self) -> dict:
        return lib.training_progress(self._client().train_status())


#
# Test
#
class ParotidTumorTest(ScriptedLoadableModuleTest):
    """In-Slicer tests. ctest runs them through ``slicer_add_python_unittest`` (its unittest loader
    calls every ``test_*`` method WITHOUT arguments); by hand, from the repository root::

        Slicer --no-splash --testing --additional-module-paths slicer_extension/ParotidTumor \\
          --python-code "import slicer.testing; slicer.testing.runUnitTest(['slicer_extension/ParotidTumor'], 'ParotidTumor')"

    (``--no-main-window`` cannot be combined with ``selectModule``; the tests need neither.)

    * ``test_ParotidTumor_offline``: no network, no server. The synthetic sample case (generated
      locally, registered with SampleData from local files) is loaded; ROI <-> box round trip, result
      label -> segmentation -> label array, refusal to mix two patients' volumes.
    * ``test_ParotidTumor_workflow``: the whole workflow against ``PAROTID_SERVER_URL`` (skipped when
      unset). Optional PAROTID_RAW_CASE: a folder of native per-sequence acquisitions <SEQ>.nii.gz
      (``parotid-synth`` without --no-raw writes raw/<id>/); without it the synthetic sample case.

    CI runs the same test methods on Slicer's real MRML (slicer-core wheel, tests/test_slicer_mrml_module.py).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Reload & Test in the module panel."""
        self.setUp()
        self.test_ParotidTumor_offline()
        if not os.environ.get("PAROTID_SERVER_URL"):
            self.delayDisplay("PAROTID_SERVER_URL is not set: skipping the server workflow test")
            return
        self.setUp()
        self.test_ParotidTumor_workflow()

    def _sampleVolumes(self):
        """The synthetic sample case as volume nodes ``{key: node}`` (through SampleData in Slicer)."""
        try:
            import SampleData
        except ImportError:  # MRML only (slicer-core): load the generated files directly
            SampleData = None
        if SampleData is not None:
            registerSampleData()
            sampleLogic = SampleData.SampleDataLogic()
            if hasattr(sampleLogic, "downloadSamples"):  # every file of the source
                nodes = sampleLogic.downloadSamples(SAMPLE_NAME)
            else:
                nodes = [sampleLogic.downloadSample(SAMPLE_NAME)]
            return {n.GetName().split()[-1]: n for n in nodes}
        vols, label, m = sampledata.case()
        out = {}
        for key, arr in vols.items():
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{sampledata.CASE} {key}")
            slicer.util.updateVolumeFromArray(node, arr)
            node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
            node.CreateDefaultDisplayNodes()
            out[key] = node
        return out

    def test_ParotidTumor_offline(self):
        nodes = self._sampleVolumes()
        self.assertEqual(set(nodes), set(sampledata.CONTRAST))
        logic = ParotidTumorLogic()
        p = logic.getParameterNode()
        got = logic.autoAssignVolumes(p, overwrite=True)
        self.assertEqual(set(got), set(nodes))
        self.assertEqual(logic.volumeProblem(p), "")
        reference = logic.referenceVolume(p)
        self.assertIs(reference, nodes["CET1"])

        # the tumour box of the sample label: ROI round trip exact, MRML agrees on the voxels inside
        _vols, label, m = sampledata.case()
        box = lib.roi_from_label(label, SEGMENTATION_LABELS["tumor"])
        logic.setRoiFromBox(p, box, reference)
        self.assertEqual(logic.roiBox(p.roi, reference), box)
        centre = logic.worldIJKToRAS(reference) @ [(box[0] + box[1]) // 2, (box[2] + box[3]) // 2, (box[4] + box[5]) // 2, 1]
        outside = logic.worldIJKToRAS(reference) @ [box[1], (box[2] + box[3]) // 2, (box[4] + box[5]) // 2, 1]
        self.assertTrue(p.roi.IsPointInROIWorld(centre[:3]))
        self.assertFalse(p.roi.IsPointInROIWorld(outside[:3]))

        # a result label -> segmentation -> the same label array
        seg = logic._loadLabel(p, lib.ResultVolume(label, m))
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 2)
        np.testing.assert_array_equal(logic.labelArray(p), label)

        # another patient's ADC is never taken, and is refused when chosen by hand
        other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other ADC")
        other.SetAttribute(mrml.ATTR_STUDY, "another-patient")
        slicer.util.updateVolumeFromArray(other, np.zeros((4, 4, 4), np.float32))
        p.adcVolume = None
        self.assertEqual(logic.autoAssignVolumes(p, overwrite=False), {"ADC": nodes["ADC"].GetName()})
        p.adcVolume = other
        self.assertIn("different patients", logic.volumeProblem(p))
        with self.assertRaises(ValueError):
            logic.buildStudyFile(p, os.path.join(tempfile.mkdtemp(), "s.nii.gz"))
        self.delayDisplay("ParotidTumor offline test passed")

    def _loadRawCase(self, raw):
        case = os.path.basename(os.path.normpath(raw))
        nodes = {}
        for fn in sorted(os.listdir(raw)):
            key = fn.split(".")[0]
            nodes[key] = slicer.util.loadVolume(os.path.join(raw, fn), {"name": f"{case} {key}"})
        return case, nodes

    def test_ParotidTumor_workflow(self):
        url = os.environ.get("PAROTID_SERVER_URL")
        if not url:
            self.skipTest("PAROTID_SERVER_URL is not set (the workflow test needs a running parotid server)")
        logic = ParotidTumorLogic()
        summary = logic.connect(url)
        self.assertIn("classify_subtype", summary)

        raw = os.environ.get("PAROTID_RAW_CASE")
        nodes = self._loadRawCase(raw)[1] if raw else self._sampleVolumes()
        p = logic.getParameterNode()
        got = logic.autoAssignVolumes(p, overwrite=True)
        self.assertEqual(set(got), set(nodes), "every sequence volume should be auto-assigned by its name")
        self.assertEqual(logic.volumeProblem(p), "")

        # same volume twice is refused
        p.t2Volume, saved = p.cet1Volume, p.t2Volume
        self.assertIn("same volume", logic.volumeProblem(p))
        p.t2Volume = saved

        # segmentation of the whole study, then a box around the tumour it found (or the sample's)
        seg = logic.segment(p)
        self.assertTrue(seg.GetSegmentation().GetSegmentIdBySegmentName("tumor"))
        reference = logic.referenceVolume(p)
        box = lib.roi_from_label(logic.labelArray(p), SEGMENTATION_LABELS["tumor"])
        if box is None:
            box = lib.roi_from_label(sampledata.case()[1], SEGMENTATION_LABELS["tumor"])
        logic.setRoiFromBox(p, box, reference)
        self.assertEqual(logic.roiBox(p.roi, reference), box)

        # classification with the box: table values and a heatmap on the reference grid
        result = logic.classify(p, "classify_subtype")
        self.assertAlmostEqual(sum(r["score"] for r in result.prediction), 1.0, places=3)
        self.assertIsNotNone(p.heatmap)
        self.assertEqual(p.heatmap.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions())
        np.testing.assert_allclose(logic.worldIJKToRAS(p.heatmap), logic.worldIJKToRAS(reference), atol=1e-3)
        composite = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
        if composite is not None:  # none without slice views
            self.assertEqual(composite.GetForegroundVolumeID(), p.heatmap.GetID())

        # box contour, then submit the label with the predicted class
        logic.contourBox(p)
        res = logic.submitLabel(p, result.predicted_class)
        info = logic.client.label_info(res["image"])
        self.assertEqual(info.get("tumor_class"), result.predicted_class)
        self.assertEqual(len(info.get("roi", [])), 6)

        # admin: next sample (never mixed with the volumes already in the scene) and training status
        sample = logic.nextSample(p, "random")  # {} when every study is labelled
        if sample.get("id"):
            self.assertTrue(logic.referenceVolume(p).GetName().startswith(sample["id"]))
            self.assertEqual(logic.volumeProblem(p), "")
            self.assertEqual({n.GetAttribute(mrml.ATTR_STUDY) for n in logic.selectedVolumes(p).values()}, {sample["id"]})
        logic.trainingProgress()
        self.delayDisplay("ParotidTumor workflow test passed")
