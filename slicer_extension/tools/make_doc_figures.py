"""Render the pictures of docs/radiologist.md and docs/annotator.md from REAL server results.

Everything shown is computed, nothing is drawn by hand: a synthetic study (``parotid-synth``) is
loaded the way 3D Slicer loads it (voxel array + IJK->RAS from the NIfTI header, via nibabel),
assembled and uploaded with ParotidTumorLib, then segmented, box-contoured and classified by a real
MONAI Label server; the module panel is the real ``.ui`` file rendered under Qt offscreen with plain
Qt stand-ins for Slicer widgets (see ui_preview.py), filled with those results.

    python slicer_extension/tools/make_doc_figures.py --out docs/img            # starts its own server
    python slicer_extension/tools/make_doc_figures.py --server http://127.0.0.1:8000 --out docs/img

Without --server it copies sample-data/studies and apps/parotid to a temporary folder, starts
``monailabel start_server`` on a free loopback port, and -- if ``classify_subtype`` has no
checkpoint -- trains one briefly first (recorded in figures.json as a DEMONSTRATION model). The
values used are written to ``<out>/figures.json``. ALL DATA ARE SYNTHETIC.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ParotidTumorLib as L  # noqa: E402
from ParotidTumorLib import geometry, labels, study  # noqa: E402

BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    def __init__(self, work: Path, models="all"):
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        studies = work / "studies"
        app = work / "app" / "parotid"
        shutil.copytree(ROOT / "sample-data" / "studies", studies, ignore=shutil.ignore_patterns(".lock", "raw", "dicom"))
        shutil.copytree(ROOT / "apps" / "parotid", app, ignore=shutil.ignore_patterns("logs", "__pycache__", "*.tmp"))
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.log = open(work / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies), "--conf", "models",
             models, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        c = L.ParotidClient(self.url)
        for _ in range(240):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited; see {work / 'server.log'}")
            try:
                c.info()
                return
            except L.ServerError:
                time.sleep(1)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def slicer_volume(path):
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj).transpose(2, 1, 0).astype(np.float32), img.affine


def ensure_classifier(client, record):
    models = L.models_from_info(client.info())
    m = models.get("classify_subtype")
    if m and (m.extra.get("version") or m.extra.get("trained")):
        record["classifier"] = {"source": "shipped checkpoint", "version": m.version}
        return
    params = {"epochs1": 2, "epochs2": 6, "threads": 1}
    t0 = time.time()
    client.train_start("classify_subtype", params)
    final = client.wait_for_training(poll_s=3, timeout_s=1800)
    if not final or final.get("status") != "DONE":
        raise RuntimeError(f"training failed: {final}")
    record["classifier"] = {"source": "DEMONSTRATION model trained for these pictures only",
                            "train_params": params, "train_seconds": round(time.time() - t0, 1)}


def contour_lines(ax, mask, color, lw=1.5):
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=lw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--server", default=None, help="use this running server instead of starting one")
    ap.add_argument("--seed", type=int, default=23, help="parotid-synth seed of the demonstration study")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    work = Path(tempfile.mkdtemp(prefix="parotid_docfig_"))
    server = None
    record = {"generated_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "synthetic": True}
    try:
        if a.server:
            url = a.server
        else:
            server = LocalServer(work)
            url = server.url
        client = L.ParotidClient(url)
        info = client.info()
        ensure_classifier(client, record)
        info = client.info()

        # 1) a synthetic study with native per-sequence acquisitions, loaded as Slicer loads NIfTI
        subprocess.run([str(BIN / "parotid-synth"), "--out", str(work / "synth"), "--n", "1", "--seed", str(a.seed),
                        "--keep", "CET1,T2", "--quiet"], check=True)
        case = sorted(os.listdir(work / "synth" / "raw"))[0]
        raw = work / "synth" / "raw" / case
        vols = {f.split(".")[0]: slicer_volume(raw / f) for f in sorted(os.listdir(raw))}
        image, keys = study.assemble({k: geometry.image_from_array(arr, m) for k, (arr, m) in vols.items()})
        sid = study.make_study_id(f"demo {case}", image)
        path = study.write(image, keys, str(work / f"{sid}.nii.gz"))
        if not client.study_exists(sid):
            client.upload_study(path, sid)
        record.update(study_id=sid, generator=f"parotid-synth --n 1 --seed {a.seed} --keep CET1,T2", sequences=list(keys))

        # 2) the radiologist's box: around the (synthetic) tumour, as a markups ROI would give it
        import SimpleITK as sitk

        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "synth" / "labels" / "final" / f"{case}.nii.gz")))
        box = labels.roi_from_label(gt)
        margin = [2, 2, 2, 2, 1, 1]
        n = image.GetSize()
        box = [max(0, box[0] - margin[0]), min(n[0], box[1] + margin[1]), max(0, box[2] - margin[2]),
               min(n[1], box[3] + margin[3]), max(0, box[4] - margin[4]), min(n[2], box[5] + margin[5])]
        ref_arr, ref_m = vols["CET1"]
        center, size, axes = geometry.box_to_roi(box, ref_m)
        assert geometry.roi_to_box(center, size, np.linalg.inv(ref_m), ref_arr.shape[::-1], axes) == box
        record.update(box=box, roi_center_ras_mm=[round(float(v), 1) for v in center],
                      roi_size_mm=[round(float(v), 1) for v in size])

        # 3) real server results
        seg = L.ResultVolume.from_bytes(*(lambda r: (r.image, r.image_name))(client.segment(sid)))
        con = L.ResultVolume.from_bytes(*(lambda r: (r.image, r.image_name))(client.contour_box(sid, box)))
        res = client.classify(sid, box, "classify_subtype")
        mal = None
        if "classify_malignancy" in L.models_from_info(info):
            try:
                mal = client.classify(sid, box, "classify_malignancy")
            except L.ServerError as e:
                record["classify_malignancy"] = str(e)
        assert res.heatmap is not None and res.heatmap.matches(ref_arr.shape[::-1], ref_m)
        record["classification"] = {k: v for k, v in res.raw.items() if k != "latencies"}
        if mal is not None:
            record["malignancy"] = {k: v for k, v in mal.raw.items() if k != "latencies"}
        record["true_class_synthetic"] = json.load(open(work / "synth" / "datastore_v2.json"))["objects"][case]["labels"]["final"]["info"]["tumor_class"]

        # the slice (inside the box) where the heatmap is strongest; the contour figure uses it too
        heat_per_slice = res.heatmap.array[box[4]:box[5]].reshape(box[5] - box[4], -1).sum(1)
        k = box[4] + int(np.argmax(heat_per_slice))
        mri = ref_arr[k]
        lo, hi = np.percentile(mri, [1, 99.5])

        # Figure: Grad-CAM over CE-T1 with the box and the results
        fig, axs = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [1.15, 1]})
        ax = axs[0]
        ax.imshow(mri, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        heat = np.ma.masked_less(res.heatmap.array[k], 0.05)
        im = ax.imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
        ax.add_patch(patches.Rectangle((box[0] - 0.5, box[2] - 0.5), box[1] - box[0], box[3] - box[2],
                                       fill=False, ec="#4fe3ff", lw=1.5, ls="--"))
        ax.set_title(f"CE-T1, slice k={k}: Grad-CAM (opacity 0.55) + tumour box", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01, label="Grad-CAM (0..1)")
        ax = axs[1]
        ax.set_axis_off()
        rows = [[p["label"].replace("_", " "), f"{100 * p['score']:.1f} %"] for p in res.prediction]
        t = ax.table(cellText=rows, colLabels=["class (classify_subtype)", "probability"], loc="upper center",
                     cellLoc="left", colWidths=[0.7, 0.3])
        t.scale(1, 1.5)
        for (r, c), cell in t.get_celld().items():
            if r > 0 and rows[r - 1][0] == res.predicted_class.replace("_", " "):
                cell.set_text_props(fontweight="bold")
        lines = [f"predicted class: {res.predicted_class.replace('_', ' ')}",
                 f"malignancy probability: {100 * res.malignancy_probability:.0f} %" if res.malignancy_probability is not None else "",
                 f"undetermined: {'YES' if res.undetermined else 'no'}",
                 f"model: {res.model} {res.version}".strip()]
        if mal is not None:
            lines.append(f"classify_malignancy: {mal.predicted_class} ({100 * mal.prediction[0]['score']:.0f} %)")
        lines.append(f"synthetic ground truth: {record['true_class_synthetic'].replace('_', ' ')}")
        ax.text(0.02, 0.32, "\n".join(x for x in lines if x), va="top", fontsize=9, family="monospace", transform=ax.transAxes)
        ax.text(0.02, 0.0, "SYNTHETIC phantom, demonstration only -- not patient data", fontsize=8, color="#b03a2e",
                transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / "gradcam_overlay.png", dpi=110)
        plt.close(fig)

        # Figure: contours (segmentation and box contour) on CE-T1 and T2
        fig, axs = plt.subplots(1, 3, figsize=(12, 4.2))
        t2 = image  # the assembled study: T2 on the reference grid
        t2_arr = sitk.GetArrayFromImage(sitk.VectorIndexSelectionCast(t2, keys.index("T2")))[k]
        for ax, (title, bg, lab, note) in zip(axs, [
            ("Segment (whole study)", mri, seg.array[k], "gland yellow, tumour red"),
            ("Contour in box", mri, con.array[k], "tumour red, box cyan"),
            ("T2 on the reference grid + Segment", t2_arr, seg.array[k], ""),
        ]):
            l2, h2 = np.percentile(bg, [1, 99.5])
            ax.imshow(bg, cmap="gray", vmin=l2, vmax=h2, interpolation="nearest")
            contour_lines(ax, lab == 1, "#f4d03f")
            contour_lines(ax, lab == 2, "#e74c3c", 2)
            if "box" in note:
                ax.add_patch(patches.Rectangle((box[0] - 0.5, box[2] - 0.5), box[1] - box[0], box[3] - box[2],
                                               fill=False, ec="#4fe3ff", lw=1.2, ls="--"))
            ax.set_title(f"{title}\n{note}".strip(), fontsize=9)
            ax.set_axis_off()
        notes = {}
        for name in ("segmentation", "contour_box"):
            card = ROOT / "apps" / "parotid" / "model" / f"{name}.json"
            if card.exists() and not a.server:
                notes[name] = json.loads(card.read_text()).get("note", "")
        record["segmentation_checkpoints"] = notes
        title = "Server results on a SYNTHETIC study (slice k=%d)" % k
        if any("placeholder" in (n or "") for n in notes.values()):
            title += " -- segmentation checkpoints are UNTRAINED PLACEHOLDERS in this build: contours not meaningful"
        fig.suptitle(title, fontsize=10, color="#b03a2e" if "PLACEHOLDER" in title else "black")
        fig.tight_layout()
        fig.savefig(out / "contours.png", dpi=100)
        plt.close(fig)

        # Figure: the module panel (.ui rendered offscreen, filled with these results)
        try:
            import ui_preview
            from PySide6 import QtWidgets

            w = ui_preview.load(str(ROOT / "slicer_extension" / "ParotidTumor" / "Resources" / "UI" / "ParotidTumor.ui"))
            f = lambda cls, name: w.findChild(cls, name)  # noqa: E731
            f(QtWidgets.QComboBox, "serverComboBox").setEditText("http://127.0.0.1:8000")
            lab = f(QtWidgets.QLabel, "serverInfoLabel")
            lab.setText(L.models_summary_html(info))
            lab.setWordWrap(True)
            names = {"CET1": "cet1Selector", "T2": "t2Selector", "T1": "t1Selector", "DWI_B0": "dwiB0Selector",
                     "DWI_B1000": "dwiB1000Selector", "ADC": "adcSelector"}
            for key, name in names.items():
                f(QtWidgets.QComboBox, name).addItem(f"{case} {key}" if key in keys else "None")
            f(QtWidgets.QComboBox, "roiSelector").addItem("Tumour box")
            f(QtWidgets.QLabel, "roiBoxLabel").setText(f"Voxel box [i0,i1,j0,j1,k0,k1]: {box}")
            f(QtWidgets.QComboBox, "classifierComboBox").addItem("classify_subtype")
            f(QtWidgets.QLabel, "sequenceStatusLabel").setText(
                f"Study sequences: {', '.join(keys)} (reference grid: CET1)")
            table = f(QtWidgets.QTableWidget, "resultsTable")
            table.setColumnCount(3)
            table.setHorizontalHeaderLabels(["Class", "Probability", ""])
            table.setRowCount(len(res.prediction))
            for r, row in enumerate(res.table_rows()):
                for c, text in enumerate(row):
                    table.setItem(r, c, QtWidgets.QTableWidgetItem(text))
            table.horizontalHeader().setStretchLastSection(True)
            table.setColumnWidth(0, 190)
            f(QtWidgets.QLabel, "predictedClassLabel").setText(res.predicted_class.replace("_", " "))
            if res.malignancy_probability is not None:
                f(QtWidgets.QLabel, "malignancyLabel").setText(f"{100 * res.malignancy_probability:.0f} %")
            f(QtWidgets.QLabel, "undeterminedLabel").setText("YES" if res.undetermined else "no")
            f(QtWidgets.QLabel, "modelVersionLabel").setText(f"{res.model} {res.version}".strip())
            s = f(QtWidgets.QSlider, "heatmapOpacitySlider")
            s.setRange(0, 100)
            s.setValue(55)
            tc = f(QtWidgets.QComboBox, "tumorClassComboBox")
            tc.addItem(res.predicted_class)
            f(QtWidgets.QComboBox, "strategyComboBox").addItem("random")
            f(QtWidgets.QComboBox, "trainModelComboBox").addItem("classify_subtype")
            f(QtWidgets.QProgressBar, "requestProgressBar").setVisible(False)
            f(QtWidgets.QPushButton, "cancelRequestButton").setVisible(False)  # shown only while a request runs
            f(QtWidgets.QLabel, "statusLabel").setText("Classifying the tumour ... done")
            ui_preview.render(w, str(out / "module_panel.png"), width=460)
            record["module_panel"] = "real .ui, Qt offscreen, plain-Qt stand-ins for Slicer widgets"
        except ImportError as e:
            record["module_panel"] = f"not rendered: {e}"

        (out / "figures.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        # the extension's screenshots (EXTENSION_SCREENSHOTURLS) are copies of these two figures
        shots = Path(__file__).resolve().parents[1] / "Screenshots"
        for name in ("module_panel.png", "gradcam_overlay.png"):
            if (out / name).exists():
                shutil.copyfile(out / name, shots / name)
        print(json.dumps({k: record[k] for k in ("study_id", "box", "classifier")}, default=str))
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
