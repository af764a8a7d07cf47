#!/usr/bin/env bash
# Stop the Orthanc started by start.sh WORKDIR (by its recorded pid only).
set -euo pipefail
work="${1:?usage: stop.sh WORKDIR}"
[ -f "$work/orthanc.pid" ] || exit 0
pid="$(cat "$work/orthanc.pid")"
if kill -0 "$pid" 2>/dev/null; then
  kill "$pid"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" || true
fi
rm -f "$work/orthanc.pid"
