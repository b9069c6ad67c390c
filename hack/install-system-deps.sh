#!/usr/bin/env bash
# Debian packages the tests use: PostgreSQL (ledger on a real server) and Prometheus
# (promtool and a real scraper). Installs only what is missing.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if ((${#need[@]})); then
  echo "installing Debian packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  # The packages start system-wide services we do not use; tests start their own.
  systemctl disable --now prometheus postgresql >/dev/null 2>&1 || true
fi
