"""CORS restricted by default.

MONAI Label 0.8.5 allows every origin (`*`, with credentials) unless `MONAI_LABEL_CORS_ORIGINS` is set,
and setting that variable does not work with the pydantic 2 in this venv: `monailabel start_server`
stops at start-up ("Object of type AnyHttpUrl is not JSON serializable"), and the parsed origins would
carry a trailing slash that never matches a browser's `Origin` header. So this app replaces the
origins of MONAI Label's CORSMiddleware at start-up with

- the origins listed in `PAROTID_CORS_ORIGINS` (comma-separated, e.g.
  `https://viewer.hospital.org,http://10.0.0.5:3000`), or by default
- the server's own loopback origins (`http://127.0.0.1:<port>`, `http://localhost:<port>`).

The bundled OHIF viewer (`/ohif/`) is served from the server's own origin and 3D Slicer is not a
browser, so neither needs CORS; a web viewer on another origin must be listed explicitly.
"""

from __future__ import annotations

import logging
import os
from typing import List
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)
ENV = "PAROTID_CORS_ORIGINS"


def _origin(url: str) -> str:
    """`scheme://host[:port]` exactly as browsers send it in `Origin` (no path, no trailing slash)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{ENV}: {url!r} is not an http(s) origin such as https://viewer.example.org")
    return f"{parts.scheme}://{parts.netloc}".lower()


def allowed_origins(port: int, configured: str | None = None) -> List[str]:
    configured = os.environ.get(ENV, "") if configured is None else configured
    origins = [_origin(u) for u in configured.split(",") if u.strip()]
    return origins or [f"http://127.0.0.1:{port}", f"http://localhost:{port}"]


def restrict_cors(fastapi_app) -> List[str]:
    """Set the allowed origins of MONAI Label's CORSMiddleware; returns the origins now allowed. Before
    start (parotid.asgi) Starlette builds the stack with them; after start (the app's on_init_complete
    fallback) the already built stack is rebuilt."""
    from monailabel.config import settings
    from starlette.middleware.cors import CORSMiddleware

    origins = allowed_origins(settings.MONAI_LABEL_SERVER_PORT)
    for m in fastapi_app.user_middleware:
        if m.cls is CORSMiddleware:
            m.kwargs["allow_origins"] = origins
    if fastapi_app.middleware_stack is not None:
        fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    logger.info(f"CORS: allowed origins {origins} (set {ENV} to change)")
    return origins
