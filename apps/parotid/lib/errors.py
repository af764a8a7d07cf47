"""Domain errors -> HTTP errors: the one place that maps them. The library (src/parotid) raises domain
errors only; the app answers them as 4xx JSON ``{"detail": message}``:

- ``parotid.study.NotFoundError`` (an unknown study or label): 404;
- ``parotid.study.StudyError`` (a study, label or parameter that cannot be used): 422;
- ``parotid.registry.RegistryError``: its status (404 unknown version, 409 read-only model dir);
- inside ``http_errors()`` (the app's inference and checks) also any ValueError / TypeError: 422.

``http_errors()`` maps inside a request the app runs (``ParotidApp.infer``, uploads); ``install(app)``
adds handlers for the domain errors raised anywhere else (MONAI Label's own endpoints calling the
datastore, e.g. ``GET /datastore/label``), so they are never a 500.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from parotid.registry import RegistryError
from parotid.study import NotFoundError, StudyError

logger = logging.getLogger(__name__)


def http_error(exc: BaseException) -> HTTPException | None:
    """The HTTP error for a domain error (None: not a client error, it stays a 500)."""
    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, NotFoundError):
        return HTTPException(404, str(exc))
    if isinstance(exc, StudyError):
        return HTTPException(422, str(exc))
    if isinstance(exc, RegistryError):
        return HTTPException(exc.status, str(exc))
    return None


@contextlib.contextmanager
def http_errors():
    """Turn domain errors and ValueError / TypeError into HTTP 4xx with a JSON `detail` message."""
    try:
        yield
    except HTTPException:
        raise
    except (StudyError, RegistryError) as e:
        logger.info(f"rejected request: {e}")
        raise http_error(e) from None
    except (ValueError, TypeError) as e:
        logger.info(f"rejected request: {e}")
        raise HTTPException(status_code=422, detail=f"invalid request: {e}") from None


async def _on_domain_error(request, exc):
    http = http_error(exc)
    logger.info(f"rejected request {request.method} {request.url.path}: {exc}")
    return JSONResponse(status_code=http.status_code, content={"detail": http.detail})


def install(app) -> None:
    """Answer domain errors raised outside ``http_errors()`` (FastAPI exception handlers)."""
    for exc_type in (StudyError, RegistryError):
        app.add_exception_handler(exc_type, _on_domain_error)
