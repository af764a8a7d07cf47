"""`parotid-serve start_server ... --workers N`: MONAI Label's `monailabel start_server`, with worker
processes that survive their start.

MONAI Label 0.8.5 hands `--workers N` to uvicorn, which spawns N processes. uvicorn (>= 0.30) pings each
worker and kills any that does not answer within ``timeout_worker_healthcheck`` (5 s). A spawned worker
first re-imports the parent's ``__main__``; under ``monailabel`` that is ``monailabel.main``, which
imports torch and MONAI before the worker can answer: on this project's 2-core machines that takes
5-20 s, so every worker was killed and restarted in a loop and the server never answered (seen:
"Child process [..] died" every 5 s). This entry point is MONAI Label's own ``Main`` with two changes:
its module imports nothing heavy at the top (a worker answers pings at once), and the health-check
timeout is ``PAROTID_WORKER_HEALTHCHECK_S`` (default 60 s; a worker busy in a long GIL-holding step is
not killed either). Arguments are exactly ``monailabel``'s.

A third change: uvicorn keeps an idle HTTP connection open ``PAROTID_KEEPALIVE_S`` (default 75 s) instead
of 5 s, longer than a proxy in front keeps it (deploy/nginx: 15 s), so the proxy, not the server, closes
idle connections and never sends a request on one the server is closing.
"""

from __future__ import annotations

import os

HEALTHCHECK_S = int(os.environ.get("PAROTID_WORKER_HEALTHCHECK_S", "60"))
KEEPALIVE_S = int(os.environ.get("PAROTID_KEEPALIVE_S", "75"))


def _main_class():
    import uvicorn
    from monailabel.main import Main
    from monailabel.utils.others.generic import init_log_config

    class ServeMain(Main):
        def action_start_server(self, args):
            """MONAI Label 0.8.5's action_start_server with uvicorn's worker health-check and keep-alive
            timeouts set."""
            self.start_server_validate_args(args)
            self.start_server_init_settings(args)
            log_config = init_log_config(args.log_config, args.app, "app.log", args.verbose)
            if args.dryrun:
                return
            uvicorn.run(
                args.uvicorn_app, host=args.host, port=args.port, root_path=args.root_path,
                log_level=args.log_level, log_config=log_config, use_colors=True, access_log=args.access_log,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                ssl_keyfile_password=args.ssl_keyfile_password, ssl_ca_certs=args.ssl_ca_certs,
                workers=args.workers, limit_concurrency=args.limit_concurrency,
                timeout_worker_healthcheck=HEALTHCHECK_S, timeout_keep_alive=KEEPALIVE_S,
            )

    return ServeMain


def main() -> None:
    _main_class()().run()


if __name__ == "__main__":
    main()
