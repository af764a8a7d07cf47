#!/usr/bin/env bash
# Start a private Orthanc (DICOMweb enabled, HTTP basic auth, loopback only) in the background.
#
#   PAROTID_ORTHANC_USER=... PAROTID_ORTHANC_PASSWORD=... deploy/orthanc/start.sh WORKDIR
#
# WORKDIR receives: config/ (orthanc.json + ports.json), db/ (storage), orthanc.log, orthanc.pid and
# orthanc.env (PAROTID_ORTHANC_URL, PAROTID_ORTHANC_DICOMWEB, PAROTID_ORTHANC_PID). Credentials come from
# the environment only (they are never written to WORKDIR; Orthanc expands ${VAR} in its config).
# The HTTP port is PAROTID_ORTHANC_HTTP_PORT or, if unset, a free loopback port. Stop with stop.sh WORKDIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:?usage: start.sh WORKDIR}"
: "${PAROTID_ORTHANC_USER:?set PAROTID_ORTHANC_USER}"
: "${PAROTID_ORTHANC_PASSWORD:?set PAROTID_ORTHANC_PASSWORD}"
mkdir -p "$work/config" "$work/db"
work="$(cd "$work" && pwd)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
http_port="${PAROTID_ORTHANC_HTTP_PORT:-$(free_port)}"
dicom_port="$(free_port)"   # DICOM (DIMSE) server is disabled in orthanc.json; the port only has to be valid
plugin="${PAROTID_ORTHANC_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}"
[ -e "$plugin" ] || { echo "start.sh: DICOMweb plugin not found at $plugin (run deploy/orthanc/install.sh)" >&2; exit 2; }
command -v Orthanc >/dev/null || { echo "start.sh: Orthanc not installed (run deploy/orthanc/install.sh)" >&2; exit 2; }
cp "$here/orthanc.json" "$work/config/orthanc.json"
printf '{"HttpPort": %s, "DicomPort": %s}\n' "$http_port" "$dicom_port" > "$work/config/ports.json"
export PAROTID_ORTHANC_STORAGE="$work/db" PAROTID_ORTHANC_PLUGINS="$plugin"
nohup Orthanc "$work/config" > "$work/orthanc.log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$work/orthanc.pid"
url="http://127.0.0.1:$http_port"
for _ in $(seq 1 100); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "start.sh: Orthanc exited; log:" >&2; tail -20 "$work/orthanc.log" >&2; exit 1
  fi
  code="$(curl -s -o /dev/null -w '%{http_code}' -u "$PAROTID_ORTHANC_USER:$PAROTID_ORTHANC_PASSWORD" "$url/system" || true)"
  [ "$code" = "200" ] && break
  sleep 0.1
done
[ "${code:-}" = "200" ] || { echo "start.sh: Orthanc did not answer on $url" >&2; kill "$pid"; exit 1; }
cat > "$work/orthanc.env" <<ENV
PAROTID_ORTHANC_URL=$url
PAROTID_ORTHANC_DICOMWEB=$url/dicom-web
PAROTID_ORTHANC_PID=$pid
ENV
echo "$url/dicom-web"
