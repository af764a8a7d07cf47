#!/usr/bin/env bash
# Start N parotid server replicas on loopback and nginx in front of them (docs/admin.md, "Several replicas").
#   deploy/nginx/start.sh RUN_DIR
# Environment (defaults in brackets):
#   STUDIES    study folder or DICOMweb URL (one Orthanc) that every replica serves   [required]
#   MODEL_DIR  checkpoint folder shared by every replica (training writes here)      [required]
#   APP        MONAI Label app folder                                                 [apps/parotid]
#   REPLICAS   number of server processes [2]    PORT   nginx port [8000]
#   BASE_PORT  first replica port [PORT+1]       MODELS `--conf models` [all]   WORKERS per replica [1]
# Writes RUN_DIR/nginx.conf, RUN_DIR/replica-K.{pid,log,port}, RUN_DIR/nginx.pid; waits until every replica
# answers GET /info/ (READY_TIMEOUT seconds, 600) and nginx answers. deploy/nginx/stop.sh RUN_DIR stops all.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
run=$(mkdir -p "$1" && cd "$1" && pwd)
: "${STUDIES:?STUDIES (study folder or DICOMweb URL) is required}" "${MODEL_DIR:?MODEL_DIR is required}"
APP=${APP:-$repo/apps/parotid}; REPLICAS=${REPLICAS:-2}; PORT=${PORT:-8000}; BASE_PORT=${BASE_PORT:-$((PORT + 1))}
MODELS=${MODELS:-all}; WORKERS=${WORKERS:-1}; READY_TIMEOUT=${READY_TIMEOUT:-600}
PY=${PYTHON:-$(command -v python3)}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}

# a start that fails half-way stops what it started (nginx, replicas): nothing is left holding ports
trap 'status=$?; [ $status -eq 0 ] || bash "$here/stop.sh" "$run" >/dev/null 2>&1; exit $status' EXIT

servers=""
for k in $(seq 1 "$REPLICAS"); do
  port=$((BASE_PORT + k - 1))
  # the replica's own process group, so stop.sh (or a test) can end it and its workers by pid
  setsid "$PY" -m parotid.serve start_server --app "$APP" --studies "$STUDIES" --conf models "$MODELS" \
    --conf model_dir "$MODEL_DIR" --host 127.0.0.1 --port "$port" --uvicorn_app parotid.asgi:app \
    --workers "$WORKERS" >"$run/replica-$k.log" 2>&1 < /dev/null &
  echo $! >"$run/replica-$k.pid"
  echo "$port" >"$run/replica-$k.port"
  servers="${servers}server 127.0.0.1:$port max_fails=3 fail_timeout=10s; "
done

mkdir -p "$run/tmp"
user=""
if [ "$(id -u)" = "0" ]; then  # nginx's workers drop to nobody: their temp folders must be theirs
  user="user nobody nogroup;"
  chmod 1777 "$run/tmp"
fi
sed -e "s|@PREFIX@|$run|g" -e "s|@LISTEN@|127.0.0.1:$PORT|" -e "s|@SERVERS@|$servers|" -e "s|@USER@|$user|" \
  "$here/nginx.conf.template" >"$run/nginx.conf"
"$NGINX" -t -q -p "$run" -c "$run/nginx.conf"
"$NGINX" -p "$run" -c "$run/nginx.conf"   # daemonises; its pid is in $run/nginx.pid

deadline=$((SECONDS + READY_TIMEOUT))
for k in $(seq 1 "$REPLICAS"); do
  port=$(cat "$run/replica-$k.port")
  until curl -sf --max-time 10 "http://127.0.0.1:$port/info/" >/dev/null; do
    if ! kill -0 "$(cat "$run/replica-$k.pid")" 2>/dev/null; then
      echo "start.sh: replica $k exited; see $run/replica-$k.log" >&2; tail -20 "$run/replica-$k.log" >&2; exit 1
    fi
    [ $SECONDS -lt $deadline ] || { echo "start.sh: replica $k not ready in ${READY_TIMEOUT}s" >&2; exit 1; }
    sleep 1
  done
done
curl -sf --max-time 30 "http://127.0.0.1:$PORT/info/" >/dev/null
echo "start.sh: nginx on http://127.0.0.1:$PORT -> $REPLICAS replicas (ports $BASE_PORT..$((BASE_PORT + REPLICAS - 1)))"
