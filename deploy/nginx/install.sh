#!/usr/bin/env bash
# Idempotent install of nginx (Debian package), the load balancer in front of several server replicas
# (deploy/nginx/start.sh, tests/test_replicas.py). Run as root or with sudo; scripts/setup.sh calls it.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  echo "install.sh: nothing to do ($(/usr/sbin/nginx -v 2>&1))"
  exit 0
fi
SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# nginx-light would do; `nginx` is the plain Debian package. The packaged service (if an init system
# starts it) listens on port 80 with /etc/nginx; start.sh runs its own instance with its own config.
$SUDO apt-get install -y -qq --no-install-recommends nginx
echo "install.sh: installed $(/usr/sbin/nginx -v 2>&1)"
