"""MONAI Label's HTTP layer made to answer client mistakes with 4xx JSON, never a 500.

MONAI Label 0.8.5's own endpoints answer several client mistakes with HTTP 500 (found by fuzzing
the OpenAPI schema with schemathesis, tests/test_fuzz_openapi.py): form fields that are not JSON,
unknown model / strategy / scoring method, /infer without any input, /logs/gpu without a GPU, a
session upload that is not an archive. Others it accepts and lets fail later in a background
process (POST /train, /scoring, /batch/infer with an unknown name: 200, then nothing). The app
cannot change those endpoints, so at start-up it adds to the FastAPI app
- exception handlers that turn exactly these cases into 4xx JSON (every other exception stays a
  500, a real server fault, with its traceback in the server log as before), and
- a middleware that refuses background jobs for names this app does not have, before they start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sysconfig
import traceback
from typing import Callable, Iterable

from fastapi.responses import JSONResponse

from lib import errors

logger = logging.getLogger(__name__)

# Details MONAI Label raises as HTTPException(500) although the request is at fault: prefix -> (status, message)
_CLIENT_FAULT_500 = {
    "Neither Image nor File not Session ID input is provided":
        (422, "give a study id (`image`), an uploaded study (`file`) or a `session_id`"),
    "Model File Name NOT configured for": (404, "no checkpoint is configured for model '{}'"),
    "DICOM SEG format is not supported in a non-DICOM datastore":
        (400, "output=dicom_seg needs a DICOMweb (PACS) datastore; this server reads a study folder"),
}


def _json(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


async def _on_http_exception(request, exc):
    from fastapi.exception_handlers import http_exception_handler

    if exc.status_code == 500 and isinstance(exc.detail, str):
        for prefix, (status, message) in _CLIENT_FAULT_500.items():
            if exc.detail.startswith(prefix):
                return _json(status, message.format(exc.detail[len(prefix):].strip()))
    return await http_exception_handler(request, exc)


async def _on_json_error(request, exc):
    return _json(422, f"a form field or parameter is not valid JSON: {exc.msg} (position {exc.pos})")


async def _on_monailabel_exception(request, exc):
    from monailabel.interfaces.exception import MONAILabelError

    message = str(exc.msg)
    if "is not Initialized" in message or "not found" in message.lower():
        return _json(404, message)  # unknown model / strategy / scoring method / WSI task
    if exc.error == MONAILabelError.INVALID_INPUT:
        return _json(422, message)
    logger.error(f"MONAI Label error on {request.method} {request.url.path}: {exc.error}: {message}")
    return _json(500, message)


async def _on_file_not_found(request, exc):
    if exc.filename == "nvidia-smi":
        return _json(404, "no NVIDIA GPU on this server (nvidia-smi not found)")
    raise exc


def _raised_by_endpoint_parsing(exc: BaseException) -> bool:
    """True when the innermost frame of MONAI Label's or this app's code is MONAI Label's endpoint code
    (frames of the standard library and third-party packages such as json or pydantic may follow).
    Endpoints only unpack the request (json.loads, dict.update, pydantic parse_obj); the work happens
    deeper (app, datastore, tasks), so an error raised there means the request was malformed --
    e.g. params = '1.5'. An error raised deeper stays a 500."""
    paths = sysconfig.get_paths()
    libraries = tuple({paths["stdlib"], paths["platstdlib"], paths["purelib"], paths["platlib"]})
    own = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc.__traceback__)]
    own = [f for f in own if not f.startswith(libraries) or f"{os.sep}monailabel{os.sep}" in f]
    return bool(own) and f"{os.sep}monailabel{os.sep}endpoints{os.sep}" in own[-1]


async def _on_malformed_request(request, exc):
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if isinstance(exc, StarletteHTTPException):  # an HTTPException that is also a ValueError (e.g. a library's)
        return await _on_http_exception(request, exc)
    if _raised_by_endpoint_parsing(exc):
        return _json(422, f"malformed request: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError) and str(exc).startswith("unsupported hash"):  # HEAD ?check_sum=ALGO:digest
        return _json(422, f"check_sum: {exc}; use SHA256:<hex digest>")
    raise exc


async def _on_archive_error(request, exc):
    return _json(422, f"the upload is not an archive that can be unpacked: {exc}")


# POST /<kind>/<name> that start a background job -> the names this app offers for that kind
_JOB_PATH = re.compile(r"^/(train|scoring|batch/infer)/([^/]+)$")


class UnknownJobGuard:
    """ASGI middleware: POST /train/{model}, /scoring/{method} or /batch/infer/{model} for a name the
    app does not have is a 404 (MONAI Label would answer 200 and fail in the background); batch
    inference may not write `final` labels (annotators' work) and a training's `force` (the promotion
    gate's override) must be a boolean -- checked here because the async job's own check runs only
    after the 200."""

    def __init__(self, app, names: Callable[[str], Iterable[str]]):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        m = _JOB_PATH.match(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if not m:
            return await self.app(scope, receive, send)
        kind, name = m.groups()
        known = sorted(self.names(kind))
        if name not in known:
            return await _json(404, f"unknown {'method' if kind == 'scoring' else 'model'} '{name}' for /{kind}; "
                                    f"available: {known}")(scope, receive, send)
        if kind == "scoring":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # read the JSON body, then replay it to the endpoint
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            request = json.loads(body or b"{}") or {}
            tag, force = request.get("label_tag"), request.get("force", False)
        except (ValueError, AttributeError):
            tag, force = None, False  # malformed bodies are FastAPI's to reject (422)
        if kind == "batch/infer" and str(tag) == "final":
            return await _json(422, "batch inference cannot write the 'final' label; final labels come from "
                                    "annotators")(scope, receive, send)
        if kind == "train" and not isinstance(force, bool):  # the promotion gate's override (docs/admin.md)
            return await _json(422, f"force must be true or false (true: serve the trained model even if the "
                                    f"promotion gate rejects it), got {force!r}")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def install(app, names: Callable[[str], Iterable[str]]) -> None:
    """Add the handlers and the guard to MONAI Label's FastAPI app. Served through parotid.asgi
    (``--uvicorn_app parotid.asgi:app``) this runs before the app starts, with Starlette's public API.
    Otherwise it runs in the MONAI Label app's ``on_init_complete``, after Starlette built its middleware
    stack: that fallback rebuilds the stack (same router and routes) so that both take effect."""
    from monailabel.interfaces.exception import MONAILabelException
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(json.JSONDecodeError, _on_json_error)
    app.add_exception_handler(MONAILabelException, _on_monailabel_exception)
    app.add_exception_handler(FileNotFoundError, _on_file_not_found)
    app.add_exception_handler(shutil.ReadError, _on_archive_error)
    for exc_type in (TypeError, ValueError, KeyError, AttributeError):
        app.add_exception_handler(exc_type, _on_malformed_request)
    errors.install(app)  # domain errors (StudyError, RegistryError): the app's one mapping (lib/errors.py)
    if any(m.cls is UnknownJobGuard for m in app.user_middleware):
        return
    if app.middleware_stack is None:  # not started: the supported way; inside CORS so its 404s carry CORS headers
        app.add_middleware(UnknownJobGuard, names=names)
        cors = [i for i, m in enumerate(app.user_middleware) if m.cls is CORSMiddleware]
        if cors and cors[0] > 0:
            app.user_middleware.insert(cors[0], app.user_middleware.pop(0))
        return
    logger.warning("HTTP layer installed after start (middleware stack rebuilt); serve with "
                   "--uvicorn_app parotid.asgi:app to install it before start")
    app.user_middleware.append(Middleware(UnknownJobGuard, names=names))
    app.middleware_stack = app.build_middleware_stack()
