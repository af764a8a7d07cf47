"""The ASGI app to serve: MONAI Label's FastAPI app with this app's HTTP layer added BEFORE it starts.

    monailabel start_server --app apps/parotid --studies STUDIES --uvicorn_app parotid.asgi:app

MONAI Label 0.8.5 builds its FastAPI app at import (``monailabel.app:app``) and creates the MONAI Label
app (apps/parotid/main.py) only in the lifespan, when Starlette has already built its middleware
stack, which may then not change (``add_middleware`` raises). Served through this module, the
exception handlers, the unknown-job guard (apps/parotid/lib/http_api.py) and the CORS origins
(apps/parotid/lib/cors.py) are installed with Starlette's public API before the first request, and
the app's ``on_init_complete`` skips its post-start fallback. Importing this module needs MONAI
Label's settings initialised (``monailabel start_server`` does that before uvicorn imports it).
"""

from __future__ import annotations

import os
import socket
import sys

from monailabel.app import app
from monailabel.config import settings

if settings.MONAI_LABEL_APP_DIR and settings.MONAI_LABEL_APP_DIR not in sys.path:
    sys.path.insert(0, settings.MONAI_LABEL_APP_DIR)  # the app's `lib` package, as MONAI Label adds it later

from lib import http_api  # noqa: E402  (apps/parotid/lib)
from lib.cors import restrict_cors  # noqa: E402


def _job_names(kind: str):
    """Names this app offers for POST /train, /scoring, /batch/infer (read at request time: the MONAI
    Label app exists only after start)."""
    from monailabel.interfaces.utils.app import app_instance

    instance = app_instance()
    return {"train": instance._trainers, "scoring": instance._scoring_methods, "batch/infer": instance._infers}[kind].keys()


class ServedBy:
    """ASGI middleware: every answer names the process that produced it (``X-Served-By: host/pid``), so an
    operator (and tests/test_workers.py) can tell workers and replicas apart behind a load balancer."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (b"x-served-by", name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_named)


http_api.install(app, _job_names)
restrict_cors(app)
app.add_middleware(ServedBy, name=f"{socket.gethostname()}/{os.getpid()}")
app.state.parotid_http_layer = True

__all__ = ["app"]
