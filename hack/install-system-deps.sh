#!/usr/bin/env bash
# Debian packages the tests use: PostgreSQL (ledger on a real server), Prometheus
# (promtool and a real scraper), Chromium and its WebDriver (the console's browser
# tests, driven by Selenium: nothing downloads a browser), and for the kind tier
# Docker's engine, mmdebstrap (the images' Debian base) and a static busybox (the
# storage provisioner's helper).
# Installs only what is missing.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)
[[ -x /usr/sbin/dockerd ]] || need+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
[[ -x /bin/busybox ]] && dpkg-query -W busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if ((${#need[@]})); then
  echo "installing Debian packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  # The packages start system-wide services we do not use; tests start their own.
  systemctl disable --now prometheus postgresql >/dev/null 2>&1 || true
  # dockerd is started by hack/kind/lib.sh when needed (no systemd on these machines)
fi
