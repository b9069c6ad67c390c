# Shared by the kind tier's scripts (sourced). Everything is built here, from Debian's
# packages and Go modules, and cached outside the repository keyed by version or by a
# hash of its inputs, so a warm machine rebuilds nothing.
# shellcheck shell=bash
KIND_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$KIND_DIR/../.." && pwd)
# shellcheck source=../testbed/versions.env
source "$REPO/hack/testbed/versions.env"
CACHE=${GPUCLOUD_TESTBED_CACHE:-$HOME/.cache/gpucloud/testbed}
KIND_CACHE=${GPUCLOUD_KIND_CACHE:-$HOME/.cache/gpucloud/kind}
# Images kubeadm and the node need, under a repository of our own: they are our builds,
# never pulled (kubeadm's imageRepository points here).
K8S_REPO=gpucloud.local/k8s
DEBIAN_SUITE=bookworm
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-buildvcs=false
mkdir -p "$KIND_CACHE"

log() { printf '[kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'kind: %s\n' "$*" >&2; exit 1; }

# Debian's docker client (the engine's own version) when there are two on PATH.
DOCKER=docker
[[ -x /usr/bin/docker ]] && DOCKER=/usr/bin/docker
export DOCKER_BUILDKIT=0  # the classic builder: no frontend image to pull

# Starts dockerd when it is installed but not running (no systemd on these machines).
ensure_docker() {
  command -v dockerd >/dev/null 2>&1 || [[ -x /usr/sbin/dockerd ]] ||
    die "no Docker engine: install Debian's docker.io (make system-deps does)"
  if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
  [[ $(id -u) == 0 ]] || die "dockerd is not running and only root can start it: start it, or run as root"
  log "starting dockerd (log: $KIND_CACHE/dockerd.log)"
  nohup dockerd >"$KIND_CACHE/dockerd.log" 2>&1 &
  local i
  for i in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "dockerd did not answer within 30 s: see $KIND_CACHE/dockerd.log"
}

# The local registry our images are pushed to (on the host's loopback) and pulled from
# (by the kind nodes, on the kind network).
REGISTRY_NAME=gpucloud-registry
REGISTRY_PORT=${GPUCLOUD_KIND_REGISTRY_PORT:-5001}
REGISTRY=localhost:$REGISTRY_PORT

image_exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# A short hash of files and strings: an image tag that changes when its inputs do.
inputs_hash() {
  local a
  { for a in "$@"; do
      if [[ -d $a ]]; then (cd "$a" && find . -type f ! -name '*.md' -print0 | sort -z | xargs -0 sha256sum)
      elif [[ -f $a ]]; then sha256sum <"$a"
      else printf '%s\n' "$a"; fi
    done; } | sha256sum | cut -c1-12
}

kind_module_dir() {  # kind's source in the module cache (its node base files)
  local d
  d=$(go env GOMODCACHE)/sigs.k8s.io/kind@$KIND_VERSION
  [[ -d $d ]] || go mod download "sigs.k8s.io/kind@$KIND_VERSION" >/dev/null
  echo "$d"
}

# Go binaries of the kind tier (kind, kubelet, kubeadm, kube-proxy, CoreDNS, etcd, ...).
build_go_tools() { bash "$REPO/hack/testbed/build.sh" kind-all; }
KIND_BIN=$CACHE/kind-$KIND_VERSION/kind
KUBECTL=$CACHE/kubernetes-$K8S_VERSION/kubectl
HELM=$CACHE/helm-$HELM_VERSION/helm
