"""Load the module's .ui with PySide6 outside 3D Slicer (Qt offscreen), for tests and doc pictures.

Slicer/CTK widgets do not exist outside Slicer; :class:`PreviewLoader` creates plain Qt stand-ins
(ctkCollapsibleButton -> QGroupBox, qMRMLNodeComboBox -> QComboBox, ctkSliderWidget -> QSlider,
qMRMLWidget -> QWidget) so that the layout, every named widget and every text of the real .ui can be
checked and rendered. What it shows is the real .ui file, not Slicer's rendering of it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtUiTools, QtWidgets  # noqa: E402

STAND_INS = {
    "ctkCollapsibleButton": QtWidgets.QGroupBox,
    "qMRMLNodeComboBox": QtWidgets.QComboBox,
    "ctkSliderWidget": QtWidgets.QSlider,
    "qMRMLWidget": QtWidgets.QWidget,
}


class PreviewLoader(QtUiTools.QUiLoader):
    def createWidget(self, className, parent=None, name=""):
        cls = STAND_INS.get(className)
        if cls is None:
            return super().createWidget(className, parent, name)
        w = cls(parent)
        w.setObjectName(name)
        w.setProperty("slicerClass", className)
        if cls is QtWidgets.QSlider:
            w.setOrientation(QtCore.Qt.Horizontal)
        return w


def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load(ui_path: str) -> QtWidgets.QWidget:
    """The .ui as a QWidget tree; collapsible-button texts become group-box titles."""
    app()
    f = QtCore.QFile(ui_path)
    if not f.open(QtCore.QFile.ReadOnly):
        raise OSError(f"cannot open {ui_path}")
    loader = PreviewLoader()
    w = loader.load(f)
    f.close()
    if w is None:
        raise RuntimeError(f"QUiLoader failed: {loader.errorString()}")
    root = ET.parse(ui_path).getroot()
    for node in root.iter("widget"):
        if node.get("class") == "ctkCollapsibleButton":
            text = next((p.find("string").text for p in node.findall("property") if p.get("name") == "text"), "")
            box = w.findChild(QtWidgets.QGroupBox, node.get("name"))
            box.setTitle(text)
    return w


def render(widget: QtWidgets.QWidget, path: str, width: int = 440) -> str:
    widget.show()
    app().processEvents()
    lay = widget.layout()
    if lay is not None:
        lay.activate()
    h = max(widget.sizeHint().height(), widget.minimumSizeHint().height(),
            lay.totalMinimumSize().height() if lay is not None else 0)
    widget.resize(width, h)
    app().processEvents()
    widget.grab().save(path)
    return path
