"""Numbers read from environment variables (worker counts, cache budgets, batching), one parser for all:
an unset or empty variable gives the default, anything else must parse and be at least `minimum`, else a
ValueError that names the variable and what it takes (the server refuses to start with it)."""

from __future__ import annotations

import os


def env_number(name: str, default, kind=int, minimum=0, what: str = "a number"):
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        n = kind(value)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {n}")
    return n
