#!/usr/bin/env bash
# Install everything the server and the tests need on a fresh machine (idempotent).
#   system: Orthanc + DICOMweb plugin (PACS tests), via deploy/orthanc/install.sh when present;
#           nginx (replica tests), via deploy/nginx/install.sh
#   python: a venv in .venv with this project (editable) and its pinned dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${PAROTID_SKIP_APT:-0}" != "1" ] && [ -f deploy/orthanc/install.sh ]; then
  bash deploy/orthanc/install.sh
fi
if [ "${PAROTID_SKIP_APT:-0}" != "1" ] && [ -f deploy/nginx/install.sh ]; then
  bash deploy/nginx/install.sh  # the load balancer of tests/test_replicas.py and deploy/nginx/start.sh
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.parotid-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --upgrade pip >/dev/null
  # torch/torchvision first, from the pinned releases (CPU-capable build)
  .venv/bin/python -m pip install "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -e ".[test]"
  echo "$want" > "$stamp"
fi
echo "setup done: $(.venv/bin/python -c 'import monailabel, monai, torch; print("monailabel", monailabel.__version__, "monai", monai.__version__, "torch", torch.__version__)')"
