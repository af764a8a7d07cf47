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


def test_request_runs_off_the_gui_thread_and_cancel_button_stops_waiting(form):
    """The widget's pattern under a real Qt event loop (PySide6 offscreen): a request runs in a
    BackgroundTask, a QTimer polls it, the .ui's Cancel button cancels it. The event loop keeps
    ticking the whole time (a blocking request would freeze it: the bad twin below)."""
    import time

    from PySide6 import QtCore

    from ParotidTumorLib import background

    app = ui_preview.app()
    cancel = form.findChild(QtWidgets.QPushButton, "cancelRequestButton")
    bar = form.findChild(QtWidgets.QProgressBar, "requestProgressBar")
    assert cancel is not None and cancel.text() == "Cancel"

    def slow_request(token):  # stands for an HTTP request that takes long
        token._event.wait(10)
        return "late"

    def run_loop(task, click_after_s=None, limit_s=5.0):
        ticks, loop = [], QtCore.QEventLoop()
        heartbeat = QtCore.QTimer(interval=10, timeout=lambda: ticks.append(time.monotonic()))
        poll = QtCore.QTimer(interval=20)
        t0 = time.monotonic()

        def on_poll():
            if click_after_s is not None and time.monotonic() - t0 > click_after_s and task.state == background.RUNNING:
                cancel.click()
            if task.poll() != background.RUNNING or time.monotonic() - t0 > limit_s:
                bar.setVisible(False)
                loop.quit()

        poll.timeout.connect(on_poll)
        cancel.clicked.connect(task.cancel)
        bar.setVisible(True)
        heartbeat.start()
        poll.start()
        loop.exec()
        heartbeat.stop()
        poll.stop()
        cancel.clicked.disconnect(task.cancel)
        return ticks, time.monotonic() - t0

    task = background.BackgroundTask(slow_request, name="Segment").start()
    ticks, took = run_loop(task, click_after_s=0.4)
    assert task.state == background.CANCELLED and task.result is None
    assert 0.35 < took < 2.0 and len(ticks) >= 15  # the GUI kept running while the request was pending
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.25

    late = background.BackgroundTask(slow_request, timeout_s=0.3, name="Segment").start()
    _, took = run_loop(late)
    assert late.state == background.TIMED_OUT and 0.25 < took < 2.0

    # bad twin: the same wait on the GUI thread -> no tick for its whole duration
    ticks = []
    beat = QtCore.QTimer(interval=10, timeout=lambda: ticks.append(time.monotonic()))
    beat.start()
    t0 = time.monotonic()
    time.sleep(0.3)  # a blocking request
    app.processEvents()
    beat.stop()
    assert len([t for t in ticks if t < t0 + 0.29]) == 0
