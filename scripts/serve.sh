#!/usr/bin/env bash
# Fresh machine -> MONAI Label server on the bundled synthetic sample studies (http://127.0.0.1:8000).
set -euo pipefail
cd "$(dirname "$0")/.."
PAROTID_SKIP_APT=${PAROTID_SKIP_APT:-1} bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"   # `monailabel` runs `python -m monailabel.main`
exec monailabel start_server --app apps/parotid --studies sample-data/studies --conf models all \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
