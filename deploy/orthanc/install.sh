#!/usr/bin/env bash
# Idempotent install of the system packages the PACS integration needs (Debian 12, run as root).
#   orthanc, orthanc-dicomweb : loopback PACS used by tests/test_pacs*.py, CI and benchmarks/bench_pacs.py
#   dicom3tools               : dciodvfy, the DICOM validator of tests/test_dicom_conformance.py (MR, SEG, SR)
#   chromium (optional, WITH_CHROMIUM=1): headless screenshot of the bundled OHIF viewer
set -euo pipefail
need=()
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
if [ "${WITH_CHROMIUM:-0}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then need+=(chromium); fi
if [ ${#need[@]} -eq 0 ]; then
  echo "install.sh: nothing to do (Orthanc $(Orthanc --version 2>/dev/null | head -1 || true), dciodvfy present)"
  exit 0
fi
SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# policy-rc.d / no systemd in containers: the Debian service is not started; start.sh runs our own instance.
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# The packaged service (if any init system started it) listens on 8042 with its own config; we never use it.
echo "install.sh: installed ${need[*]}"
