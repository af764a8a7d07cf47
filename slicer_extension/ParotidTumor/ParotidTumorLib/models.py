"""What the server offers, from ``GET /info/``: models, their type, required sequences, label sets."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from .sequences import DESCRIPTIONS


@dataclass
class ModelInfo:
    name: str
    type: str = ""
    sequences: tuple = ()  # what the model uses
    required: tuple = ()  # what a study must have (the others may be missing); older servers: = sequences
    description: str = ""
    label_set: str = ""
    classes: tuple = ()
    version: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def needs_box(self) -> bool:
        """True when the model takes a ``roi`` param (box contour); classification uses it optionally."""
        return "roi" in (self.extra.get("config") or {}) and self.type != "classification"


def models_from_info(info: dict) -> dict:
    """``{name: ModelInfo}`` from an /info/ answer (missing fields tolerated)."""
    out = {}
    for name, m in (info.get("models") or {}).items():
        m = m or {}
        ls = m.get("label_set") or {}
        if isinstance(ls, str):
            ls = {"name": ls}
        out[name] = ModelInfo(
            name=name,
            type=str(m.get("type", "")),
            sequences=tuple(m.get("sequences") or ()),
            required=tuple(m.get("required_sequences") or m.get("sequences") or ()),
            description=str(m.get("description", "")),
            label_set=str(ls.get("name", "")),
            classes=tuple(ls.get("classes") or ()),
            version="" if m.get("version") is None else str(m.get("version")),
            extra=m,
        )
    return out


DEFAULT_TUMOR_CLASSES = ("pleomorphic_adenoma", "warthin", "basal_cell_adenoma", "malignant")


def tumor_classes_from_info(info: dict | None) -> list:
    """The ``tumor_class`` values an annotator may assign: the classes of every label set in /info
    ``label_sets`` (what the server's datastore accepts), in order, without repeats; from the
    classification models' label sets for servers without that key; the subtype classes otherwise."""
    info = info or {}
    sets = list((info.get("label_sets") or {}).values())
    if not sets:
        sets = [m.get("label_set") for m in (info.get("models") or {}).values() if isinstance((m or {}).get("label_set"), dict)]
    out = []
    for s in sets:
        for c in (s or {}).get("classes") or ():
            if c not in out:
                out.append(str(c))
    return out or list(DEFAULT_TUMOR_CLASSES)


def models_summary_html(info: dict) -> str:
    """A short HTML list for the Connect panel: each model, its type and required sequences."""
    models = models_from_info(info)
    title = html.escape(f"{info.get('name', 'MONAI Label')} {info.get('version', '')}".strip())
    if not models:
        return f"<b>{title}</b>: the server offers no models."
    rows = []
    for m in models.values():
        def names(keys):
            return ", ".join(f"<span title='{html.escape(DESCRIPTIONS.get(s, s))}'>{html.escape(s)}</span>" for s in keys)

        seqs = names(m.required) or "?"
        optional = [s for s in m.sequences if s not in m.required]
        uses = f" (uses also {names(optional)} when present)" if optional else ""
        extra = f" &ndash; classes: {html.escape(', '.join(m.classes))}" if m.classes else ""
        ver = f" v{html.escape(m.version)}" if m.version else ""
        rows.append(f"<li><b>{html.escape(m.name)}</b>{ver} ({html.escape(m.type or 'model')}): needs {seqs}{uses}{extra}</li>")
    return f"<b>{title}</b><ul style='margin:0'>{''.join(rows)}</ul>"
