"""Mapping of domain errors to HTTP errors — the one place where that happens."""

from __future__ import annotations

import contextlib
import logging

from fastapi import HTTPException

from parotid.study import StudyError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def http_errors():
    """Turn StudyError / KeyError-like user errors into HTTP 4xx with a JSON `detail` message."""
    try:
        yield
    except HTTPException:
        raise
    except StudyError as e:
        logger.info(f"rejected request: {e}")
        raise HTTPException(status_code=422, detail=str(e)) from None
    except (ValueError, TypeError) as e:
        logger.info(f"rejected request: {e}")
        raise HTTPException(status_code=422, detail=f"invalid request: {e}") from None
