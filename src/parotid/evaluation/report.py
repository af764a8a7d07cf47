"""Where every ``parotid-eval`` command leaves its results: ``<out>/<name>.json`` (numbers, per-study rows,
the command) and ``<out>/<name>.md`` (the table a person reads, also printed)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_report(out_dir: str, name: str, payload: dict[str, Any], markdown: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=1, default=float)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown + "\n")
    print(markdown)
