#!/usr/bin/env bash
# CI entry for the PACS integration: install Orthanc (idempotent) and run the PACS tests against it.
# Orthanc credentials: PAROTID_ORTHANC_USER / PAROTID_ORTHANC_PASSWORD from CI secrets, else random per run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
bash "$root/deploy/orthanc/install.sh"
cd "$root"
PAROTID_REQUIRE_ORTHANC=1 "${PYTHON:-$root/.venv/bin/python}" -m pytest -q tests/test_pacs.py tests/test_pacs_server.py tests/test_dicom_conformance.py "$@"
