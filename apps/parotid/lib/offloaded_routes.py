"""MONAI Label's blocking datastore and active-learning routes, run in the worker pool (issue 11).

MONAI Label 0.8.5's endpoints are ``async def`` functions that call synchronous code: a label save
(validation, NIfTI write, index transaction under a file lock), a study deletion or an active-learning
query held the event loop, and ``GET /info/`` or ``GET /datastore/`` waited for it. These routes keep
their parameters and RBAC but run MONAI Label's own synchronous functions in parotid.worker_pool:
writes in the "requests" pool, the datastore listing (it waits for the index lock a save holds) in the
"reads" pool, batch inference and scoring (``run_sync=true`` runs them in the request) in the "jobs" pool. The app's own routes (image and checkpoint upload, /infer) offload their work themselves.
"""

from __future__ import annotations

from monailabel.config import settings
from monailabel.endpoints import activelearning as al
from monailabel.endpoints import batch_infer as bi
from monailabel.endpoints import datastore as ds
from monailabel.endpoints import scoring as sc

from parotid.routes import offload_route


def install_offloaded_routes(app) -> None:
    p = settings.MONAI_LABEL_API_STR

    def route(router, path: str, method: str, body, pool: str = "requests") -> None:
        offload_route(app, router, path, method, body, pool=pool, prefix=p)

    route(ds.router, "/datastore/", "GET", lambda output, user: ds.datastore(output), pool="reads")
    route(ds.router, "/datastore/label", "PUT", lambda background_tasks, image, params, tag, label, user:
          ds.save_label(background_tasks, image, params, tag, label, user.username))
    route(ds.router, "/datastore/label", "DELETE", lambda id, tag, user: ds.remove_label(id, tag, user.username))
    for path in ("/datastore/image", "/datastore/"):
        route(ds.router, path, "DELETE", lambda id, user: ds.remove_image(id, user.username))
    route(ds.router, "/datastore/image/info", "PUT", lambda image, info, user: ds.update_image_info(image, info, user.username))
    route(ds.router, "/datastore/label/info", "PUT",
          lambda label, tag, info, user: ds.update_label_info(label, tag, info, user.username))
    route(al.router, "/activelearning/{strategy}", "POST", lambda strategy, params, user: al.sample(strategy, params, user.username))
    # run_sync=true ran a whole batch inference or scoring (minutes) on the event loop; /train is left to
    # its own route (the job guard); a job started without run_sync returns at once either way
    route(bi.router, "/batch/infer/{model}", "POST",
          lambda model, images, params, run_sync, user: bi.run(model, images, params, run_sync), pool="jobs")
    route(sc.router, "/scoring/{method}", "POST",
          lambda method, params, run_sync, user: sc.run_method(method, params, run_sync), pool="jobs")
