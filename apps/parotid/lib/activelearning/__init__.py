"""Active-learning strategies that rank studies (see strategies.py: they never answer HTTP 500)."""

from __future__ import annotations

from typing import Dict

from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.strategies import FirstStudy, RandomStudy


def default_strategies() -> Dict[str, Strategy]:
    from lib.activelearning.uncertainty import uncertainty_strategies

    return {"random": RandomStudy(), "first": FirstStudy(), **uncertainty_strategies()}
