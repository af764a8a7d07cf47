"""Active-learning strategies that rank studies."""

from __future__ import annotations

from typing import Dict

from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random


def default_strategies() -> Dict[str, Strategy]:
    from lib.activelearning.uncertainty import uncertainty_strategies

    return {"random": Random(), "first": First(), **uncertainty_strategies()}
