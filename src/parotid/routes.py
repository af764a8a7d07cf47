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



def offload_route(app: Any, router: Any, path: str, method: str, body: Callable[..., Any], key: str | None = None,
                  pool: str = "requests", prefix: str = "") -> None:
    """Replace MONAI Label's route `method path` of `router` (served at `prefix` + `path`) -- an ``async
    def`` that calls synchronous code, so that it holds the event loop -- by one with the same parameters,
    dependencies (RBAC) and OpenAPI entry that runs ``body(**parameters)`` in the worker pool
    (parotid.worker_pool.offload)."""
    import functools

    from parotid.worker_pool import offload

    stock = [r for r in router.routes if getattr(r, "path", None) == path and method in getattr(r, "methods", ())]
    if not stock:
        raise LookupError(f"no {method} {path} route to replace")
    route = stock[0]

    async def endpoint(**params: Any) -> Any:
        return await offload(key, functools.partial(body, **params), pool=pool)

    functools.update_wrapper(endpoint, route.endpoint)  # FastAPI reads the stock signature through __wrapped__
    replace_route(app, prefix + path, method, endpoint, tags=route.tags, summary=route.summary,
                  description=route.description, include_in_schema=route.include_in_schema,
                  deprecated=route.deprecated)
