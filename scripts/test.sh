#!/usr/bin/env bash
# Fresh machine -> the full test suite (real MONAI Label server, real Orthanc, real files on disk).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export PAROTID_REQUIRE_ORTHANC=1  # setup.sh installed Orthanc: the PACS tests must run, not skip
export PAROTID_REQUIRE_NGINX=1    # and nginx: the replica tests must run, not skip
exec .venv/bin/python -m pytest tests "$@"
