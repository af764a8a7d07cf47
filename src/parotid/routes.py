"""Replace one of MONAI Label's routes with the app's own, in place.

MONAI Label 0.8.5 offers no hook for its endpoints (checkpoint upload, image upload, /infer), so the app
registers its version and swaps it into the stock route's slot: same order, same OpenAPI entry. FastAPI
keeps an included router's routes as separate entries; where none matches, ours goes first (first match
wins)."""

from __future__ import annotations

from typing import Any, Callable


def replace_route(app: Any, path: str, method: str, endpoint: Callable, **kwargs: Any) -> None:
    app.router.add_api_route(path, endpoint, methods=[method], **kwargs)
    ours = app.router.routes.pop()
    routes = app.router.routes
    stock = [i for i, r in enumerate(routes)
             if getattr(r, "path", None) == path and method in getattr(r, "methods", ()) and r is not ours]
    if stock:
        routes[stock[0]] = ours
    else:
        routes.insert(0, ours)
    app.openapi_schema = None
