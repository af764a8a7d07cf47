"""The module's Qt Designer file loads under Qt (offscreen, PySide6 from the test extra).

3D Slicer widgets are replaced by plain Qt stand-ins (slicer_extension/tools/ui_preview.py); the test
checks that the XML is a loadable Qt form, that every widget the module code uses exists with the
right (stand-in) class, and that it renders.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOD = ROOT / "slicer_extension" / "ParotidTumor"
UI = MOD / "Resources" / "UI" / "ParotidTumor.ui"
sys.path.insert(0, str(ROOT / "slicer_extension" / "tools"))

import ui_preview  # noqa: E402
from PySide6 import QtWidgets  # noqa: E402


@pytest.fixture(scope="module")
def form():
    w = ui_preview.load(str(UI))
    yield w
    w.deleteLater()


def test_every_widget_used_by_the_module_exists(form):
    used = set(re.findall(r"self\.ui\.(\w+)", (MOD / "ParotidTumor.py").read_text()))
    missing = [n for n in sorted(used) if form.findChild(QtWidgets.QWidget, n) is None]
    assert not missing


def test_widget_kinds_and_bindings(form):
    for name in ("cet1Selector", "t2Selector", "t1Selector", "dwiB0Selector", "dwiB1000Selector", "adcSelector", "roiSelector"):
        w = form.findChild(QtWidgets.QComboBox, name)
        assert w is not None and w.property("slicerClass") == "qMRMLNodeComboBox", name
    assert form.findChild(QtWidgets.QSlider, "heatmapOpacitySlider").property("slicerClass") == "ctkSliderWidget"
    titles = [g.title() for g in form.findChildren(QtWidgets.QGroupBox)]
    assert titles == ["Server", "Sequences", "Tumour box and analysis", "Annotator", "Administrator"]
    buttons = {b.objectName(): b.text() for b in form.findChildren(QtWidgets.QPushButton)}
    assert buttons["segmentButton"] == "Segment" and buttons["contourButton"] == "Contour in box"
    assert buttons["classifyButton"] == "Classify tumour" and buttons["submitButton"].startswith("Submit")
    assert form.findChild(QtWidgets.QLineEdit, "passwordLineEdit").echoMode() == QtWidgets.QLineEdit.Password


def test_renders_offscreen(form, tmp_path):
    path = ui_preview.render(form, str(tmp_path / "panel.png"))
    from PIL import Image

    im = Image.open(path)
    assert im.size[0] >= 400 and im.size[1] >= 600
