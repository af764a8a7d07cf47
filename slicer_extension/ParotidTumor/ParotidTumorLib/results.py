"""Inference results as plain Python objects the Slicer widget (or a script) can show.

* :class:`ResultVolume`: a result NIfTI (label map or classification heatmap) as a Slicer-ready
  ``[k, j, i]`` array plus its IJK->RAS matrix.
* :class:`ClassificationResult`: the JSON ``params`` of a classification task
  (``prediction: [{idx, label, score}]``, ``predicted_class``, ``malignancy_probability``,
  ``undetermined``, ``model``, ``version``, ``roi``, ``label_set``) and its heatmap, if any.
* :func:`sequences_summary`: what every result says about the study's sequences (``sequences_used``,
  ``sequences_missing``, ``expected_performance`` of that subset, validated on SYNTHETIC data).
* :func:`input_check_summary`: whether the images were accepted through a commissioned site.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from .geometry import array_from_image, same_grid
from .responses import InferResponse, ResponseFormatError


_METRIC_NAMES = {"roc_auc": "ROC-AUC (benign/malignant)", "macro_auc": "macro-AUC", "dice_tumor": "Dice tumour",
                 "dice_gland": "Dice gland"}


def _metric_text(name: str, value) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        return f"{_METRIC_NAMES.get(name, name)} {value[0]:.2f} ({value[1]:.2f}-{value[2]:.2f})"
    return f"{_METRIC_NAMES.get(name, name)} {float(value):.2f}"


def sequences_summary(params: dict) -> str:
    """One line for the user: the sequences the model used and lacked, and the performance validated for
    that subset; '' for an answer without these fields (an older server)."""
    if not isinstance(params, dict) or "sequences_used" not in params:
        return ""
    used = ", ".join(params.get("sequences_used") or []) or "-"
    missing = list(params.get("sequences_missing") or [])
    text = f"Sequences used: {used}" + (f"; MISSING: {', '.join(missing)}" if missing else "; none missing")
    if params.get("weights") == "incomplete":  # whole-study segmentation: the weights trained for incomplete studies
        text += " (segmented with the model's weights for incomplete studies)"
    perf = params.get("expected_performance") or {}
    if perf.get("validated"):
        shown = [_metric_text(k, v) for k, v in (perf.get("metrics") or {}).items() if k in _METRIC_NAMES]
        subset = ", ".join(perf.get("measured_with") or []) or perf.get("subset", "")
        text += (f". Expected performance with {subset} (SYNTHETIC validation, n = {perf.get('n', '?')}): "
                 + ("; ".join(shown) if shown else "see the server's answer"))
    elif perf:
        text += f". Expected performance: not validated ({perf.get('reason', 'no table')})"
    return text


MAX_REASON_CHARS = 160


def input_check_summary(params: dict) -> str:
    """One line when the images were accepted through a commissioned site (the server's input check matched the
    site's reference, not the training cohort's: docs/input-check.md); '' otherwise."""
    ic = params.get("input_check") if isinstance(params, dict) else None
    comp = ((ic or {}).get("components") or {}).get("intensity") if isinstance(ic, dict) else None
    ref = comp.get("reference", "") if isinstance(comp, dict) else ""
    if comp and comp.get("passed") and isinstance(ref, str) and ref.startswith("site:"):
        return f"Input check: images match commissioned site {ref[5:]} (accepted on that site's validation)"
    return ""


@dataclass
class ResultVolume:
    array: np.ndarray  # [k, j, i] like slicer.util.arrayFromVolume
    ijk_to_ras: np.ndarray  # 4x4
    name: str = "result"
    info: dict = field(default_factory=dict)  # the JSON params of the answer that carried the volume

    @property
    def shape_ijk(self):
        return tuple(int(n) for n in self.array.shape[:3][::-1])

    def matches(self, shape_ijk, ijk_to_ras, tol: float = 1e-3) -> bool:
        """Same grid as a reference volume (IJK shape + IJK->RAS)?"""
        return same_grid(self.shape_ijk, self.ijk_to_ras, tuple(shape_ijk), ijk_to_ras, tol)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "result.nii.gz") -> "ResultVolume":
        import SimpleITK as sitk

        suffix = ".nii.gz" if name.endswith(".gz") or data[:2] == b"\x1f\x8b" else os.path.splitext(name)[1] or ".nii"
        fd, path = tempfile.mkstemp(suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            try:
                img = sitk.ReadImage(path)
            except RuntimeError as e:
                raise ResponseFormatError(f"the server's result image cannot be read ({str(e).strip().splitlines()[-1][:150]})") from None
        finally:
            os.remove(path)
        if img.GetDimension() == 4 and img.GetSize()[3] == 1:
            img = img[:, :, :, 0]
        arr, m = array_from_image(img)
        base = os.path.basename(name)
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            if base.endswith(ext):
                base = base[: -len(ext)]
        return cls(array=arr, ijk_to_ras=m, name=base)


@dataclass
class ClassificationResult:
    predicted_class: str
    prediction: list  # [{"idx", "label", "score"}], sorted by score, best first
    malignancy_probability: float | None = None
    undetermined: bool = False
    model: str = ""
    version: str = ""
    roi: list | None = None
    label_set: str = ""
    sequences_used: list = field(default_factory=list)
    sequences_missing: list = field(default_factory=list)
    expected_performance: dict = field(default_factory=dict)
    undetermined_reasons: list = field(default_factory=list)
    heatmap: ResultVolume | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: dict, heatmap: ResultVolume | None = None) -> "ClassificationResult":
        if not isinstance(params, dict) or "prediction" not in params:
            raise ResponseFormatError(
                f"the server's answer is not a classification result (keys: {sorted(params) if isinstance(params, dict) else type(params).__name__})")
        preds = []
        for i, p in enumerate(params.get("prediction") or []):
            preds.append({"idx": int(p.get("idx", i)), "label": str(p.get("label", p.get("idx", i))),
                          "score": float(p.get("score", 0.0))})
        preds.sort(key=lambda p: -p["score"])
        mp = params.get("malignancy_probability")
        ls = params.get("label_set", "")
        if isinstance(ls, dict):
            ls = ls.get("name", "")
        return cls(
            predicted_class=str(params.get("predicted_class") or (preds[0]["label"] if preds else "")),
            prediction=preds,
            malignancy_probability=None if mp is None else float(mp),
            undetermined=bool(params.get("undetermined", False)),
            model=str(params.get("model", "")),
            version=str(params.get("version", "")),
            roi=[int(v) for v in params["roi"]] if params.get("roi") is not None else None,
            label_set=str(ls),
            sequences_used=list(params.get("sequences_used") or []),
            sequences_missing=list(params.get("sequences_missing") or []),
            expected_performance=dict(params.get("expected_performance") or {}),
            undetermined_reasons=[str(r) for r in params.get("undetermined_reasons") or []],
            heatmap=heatmap,
            raw=params,
        )

    @classmethod
    def from_response(cls, resp: InferResponse) -> "ClassificationResult":
        heat = ResultVolume.from_bytes(resp.image, resp.image_name or "heatmap.nii.gz") if resp.has_image else None
        result = cls.from_params(resp.params, heat)
        if heat is not None:
            heat.name = result.heatmap_name
        return result

    @property
    def heatmap_name(self) -> str:
        """What the heatmap is, as the server names it: our hybrid map (Grad-CAM x RoI-Align read-out
        weight, the default) or plain Grad-CAM; older servers do not say."""
        h = self.raw.get("heatmap") if isinstance(self.raw, dict) else None
        method = h.get("method") if isinstance(h, dict) else None
        return f"Heatmap: {method}" if method else "Heatmap"

    def table_rows(self) -> list:
        """Rows for the results table: (class, probability %, marker)."""
        return [(p["label"], f"{100 * p['score']:.1f} %", "predicted" if p["label"] == self.predicted_class else "")
                for p in self.prediction]

    def summary(self) -> str:
        s = f"{self.predicted_class.replace('_', ' ')}"
        if self.prediction:
            s += f" ({100 * self.prediction[0]['score']:.0f} %)"
        if self.malignancy_probability is not None:
            s += f"; malignancy probability {100 * self.malignancy_probability:.0f} %"
        if self.undetermined:
            s += f" -- UNDETERMINED, do not rely on this class: {self.undetermined_text}"
        if self.model:
            s += f"  [{self.model}{' ' + self.version if self.version else ''}]"
        lines = [s, sequences_summary(self.raw), input_check_summary(self.raw)]
        return "\n".join(line for line in lines if line)

    @property
    def undetermined_text(self) -> str:
        """Why the server answered "undetermined" (input unlike the training data, no tumour in the box, MC-dropout
        uncertainty), shortened for one line; older servers give no reasons."""
        if not self.undetermined_reasons:
            return "low confidence"
        shown = [r if len(r) <= MAX_REASON_CHARS else r[: MAX_REASON_CHARS - 3] + "..." for r in self.undetermined_reasons[:3]]
        more = len(self.undetermined_reasons) - len(shown)
        return "; ".join(shown) + (f" (+{more} more)" if more > 0 else "")

