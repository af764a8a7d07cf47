"""The benchmarks' one way to report their figures: JSON on stdout and, with ``--json PATH``, in a file."""

from __future__ import annotations

import json
from pathlib import Path


def report(out: dict, path: str | None) -> None:
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
