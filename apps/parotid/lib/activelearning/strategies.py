"""Active-learning strategies that always answer: a study id, or nothing (`{}`) when no study is left.

MONAI Label 0.8.5's strategies answered HTTP 500 in cases a client can cause:
- `Random` weights each unlabeled study by the seconds since it was last served; when every one was
  served within the current second all weights are 0 and `random.choices` raises (seen: calling
  `/activelearning/random` twice within a second with one unlabeled study);
- `Epistemic` sorts by an image-info score and reads the served time from `info["strategy"]`; a score
  that is not a number or a `strategy` entry that is not an object (both settable with
  `PUT /datastore/image/info`) raised.
These versions keep MONAI Label's rules (random weighted by time since served; highest score first,
studies served within a day rotated to the back) and read image info defensively. The `strategy`
entry is also checked on every image-info update (`check_strategy_info`), because MONAI Label's
endpoint itself writes into it after each pick.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Dict, List

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from parotid.study import StudyError

DAY = 24 * 60 * 60


def check_strategy_info(info: Dict[str, Any]) -> None:
    """`info["strategy"]`, if given, must be {strategy: {"ts": seconds, ...}} (MONAI Label's record)."""
    record = info.get("strategy")
    if record is None:
        return
    if not isinstance(record, dict) or not all(isinstance(v, dict) for v in record.values()):
        raise StudyError('image info "strategy" is the server\'s record of served studies: '
                         'an object {strategy: {"ts": seconds}}; leave it out')
    if not all(_number(v.get("ts", 0)) is not None for v in record.values()):
        raise StudyError('image info "strategy": "ts" must be a time in seconds')


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, text, NaN, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _served_ago(info: Dict[str, Any], strategy: str, now: int) -> float:
    """Seconds since this strategy last served the study (`inf` if never or unreadable)."""
    record = info.get("strategy")
    entry = record.get(strategy) if isinstance(record, dict) else None
    ts = _number(entry.get("ts")) if isinstance(entry, dict) else None
    return math.inf if ts is None else max(0.0, now - ts)


def _candidates(request: Dict[str, Any], datastore: Datastore) -> Dict[str, Dict[str, Any]]:
    """Unlabeled studies (no final label) with their image info."""
    images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
    return {i: datastore.get_image_info(i) or {} for i in images}


class RandomStudy(Strategy):
    """Random unlabeled study, weighted as MONAI Label's by seconds since `random` last served it (never
    served: since 1970), + 1 so that a study served this very second keeps a small chance instead of
    making every weight 0."""

    def __init__(self):
        super().__init__("Random unlabeled study (those served longest ago are likeliest)")

    def __call__(self, request, datastore: Datastore):
        studies = _candidates(request, datastore)
        if not studies:
            return None
        now = int(time.time())
        ids: List[str] = sorted(studies)
        weights = [min(_served_ago(studies[i], request["strategy"], now), now) + 1 for i in ids]
        pick = random.choices(ids, weights=weights)[0]
        return {"id": pick, "weight": weights[ids.index(pick)]}


class FirstStudy(Strategy):
    def __init__(self):
        super().__init__("First unlabeled study (by id)")

    def __call__(self, request, datastore: Datastore):
        studies = _candidates(request, datastore)
        return {"id": sorted(studies)[0]} if studies else None


class ScoreRanked(Strategy):
    """Highest `key` score first (a study without a numeric score counts as 0); studies this strategy
    served within `reset` seconds go behind the others, the one served longest ago first (MONAI Label's
    Epistemic rule)."""

    def __init__(self, key: str, desc: str, reset: int = DAY):
        super().__init__(desc)
        self.key, self.reset = key, reset

    def __call__(self, request, datastore: Datastore):
        studies = _candidates(request, datastore)
        if not studies:
            return None
        now = int(time.time())

        def rank(i: str):
            score = _number(studies[i].get(self.key)) or 0.0
            return (-min(_served_ago(studies[i], request["strategy"], now), self.reset), -score, i)

        pick = min(studies, key=rank)
        return {"id": pick, self.key: _number(studies[pick].get(self.key))}
