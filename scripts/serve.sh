#!/usr/bin/env bash
# Fresh machine -> MONAI Label server on the bundled synthetic sample studies (http://127.0.0.1:8000).
#
# The server writes its study index, labels and trained checkpoints. It works on a runtime copy, made
# on the first run, so that a run never changes the repository:
#   ${PAROTID_RUNTIME:-$HOME/.parotid}/studies   <- sample-data/studies
#   ${PAROTID_RUNTIME:-$HOME/.parotid}/model     <- apps/parotid/model (the shipped checkpoints)
# Delete that folder to start again from the shipped data and checkpoints.
#
# Listens on 127.0.0.1 only. HOST=0.0.0.0 exposes it to the network: enable authentication first
# (docs/admin.md, "Before exposing the server"). Browsers on other origins are refused (CORS) unless
# listed in PAROTID_CORS_ORIGINS. PAROTID_SKIP_SETUP=1 skips the install step (an installed venv on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${PAROTID_SKIP_SETUP:-0}" = "1" ] || PAROTID_SKIP_APT=${PAROTID_SKIP_APT:-1} bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # `monailabel` runs `python -m monailabel.main`

runtime=${PAROTID_RUNTIME:-$HOME/.parotid}
mkdir -p "$runtime"
copy_once() {  # copy_once SRC DST: DST appears complete or not at all
  if [ ! -d "$2" ]; then
    rm -rf "$2.part" && cp -R "$1" "$2.part" && rm -f "$2.part/.lock" && mv "$2.part" "$2"
    echo "serve.sh: copied $1 to $2 (the server writes there, never into the repository)"
  fi
}
copy_once sample-data/studies "$runtime/studies"
copy_once apps/parotid/model "$runtime/model"

host=${HOST:-127.0.0.1}
case "$host" in
  127.*|localhost|::1) ;;
  *) [ "${MONAI_LABEL_AUTH_ENABLE:-false}" = "true" ] ||
       echo "serve.sh: WARNING: listening on $host WITHOUT authentication: anyone who reaches this port can read" \
            "and change studies, labels and models. See docs/admin.md, 'Before exposing the server'." >&2 ;;
esac
exec monailabel start_server --app apps/parotid --studies "$runtime/studies" \
  --conf models all --conf model_dir "$runtime/model" --host "$host" --port "${PORT:-8000}" \
  --uvicorn_app parotid.asgi:app "$@"  # the app's HTTP layer installed before start (docs/admin.md)
