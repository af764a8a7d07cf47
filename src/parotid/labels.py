"""Label values and label sets: the one place that names them.

- the segmentation label map (background / parotid gland / tumour) on the reference grid: code, not data,
  because the segmentation networks' output channels are these values (the Slicer lib's copy,
  ``ParotidTumorLib.labels``, is checked against this one by tests/test_slicer_lib.py);
- classification label sets (4-class subtype, benign/malignant, sinonasal ...) are data: JSON in
  ``parotid/labelsets``. A label set may declare ``map_from`` to derive its class from another set's
  class (e.g. subtype -> benign/malignant).
Extra label sets can be dropped into a folder named by ``PAROTID_LABELSETS``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources

SEGMENTATION_LABELS: dict[str, int] = {"background": 0, "parotid_gland": 1, "tumor": 2}
GLAND, TUMOR = SEGMENTATION_LABELS["parotid_gland"], SEGMENTATION_LABELS["tumor"]

# Label-info keys of the public contract (MONAI Label datastore final-label info).
INFO_TUMOR_CLASS = "tumor_class"
INFO_ROI = "roi"


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple[str, ...]
    malignant: tuple[str, ...] = ()
    description: str = ""
    map_from: dict[str, str] = field(default_factory=dict)

    def index(self, cls: str) -> int:
        """Class index of `cls`, mapping it first through ``map_from`` if needed."""
        cls = self.map_from.get(cls, cls)
        if cls not in self.classes:
            raise ValueError(f"class '{cls}' is not in label set '{self.name}' {list(self.classes)}")
        return self.classes.index(cls)

    def accepts(self, cls: str) -> bool:
        return self.map_from.get(cls, cls) in self.classes

    @property
    def malignant_indices(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c in self.malignant]

    def to_dict(self) -> dict:
        return {"name": self.name, "classes": list(self.classes), "malignant": list(self.malignant),
                "description": self.description}


def _read_all() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for entry in resources.files("parotid.labelsets").iterdir():
        if entry.name.endswith(".json"):
            d = json.loads(entry.read_text())
            out[d["name"]] = d
    extra = os.environ.get("PAROTID_LABELSETS")
    if extra and os.path.isdir(extra):
        for fn in sorted(os.listdir(extra)):
            if fn.endswith(".json"):
                with open(os.path.join(extra, fn)) as f:
                    d = json.load(f)
                out[d["name"]] = d
    return out


def classification_label_sets() -> dict[str, LabelSet]:
    return {
        n: LabelSet(n, tuple(d["classes"]), tuple(d.get("malignant", ())), d.get("description", ""), d.get("map_from", {}))
        for n, d in _read_all().items()
        if d.get("kind") == "classification"
    }


def get_label_set(name: str) -> LabelSet:
    sets = classification_label_sets()
    if name not in sets:
        raise KeyError(f"unknown label set '{name}'; known: {sorted(sets)}")
    return sets[name]
