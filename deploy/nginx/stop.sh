#!/usr/bin/env bash
# Stop what deploy/nginx/start.sh RUN_DIR started: nginx, then each replica's process group.
set -uo pipefail
run="$1"
[ -f "$run/nginx.pid" ] && kill "$(cat "$run/nginx.pid")" 2>/dev/null
for f in "$run"/replica-*.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill -TERM -- "-$pid" 2>/dev/null
  for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null
done
exit 0
