#!/usr/bin/env bash
# Builds the test bed's binaries from Go modules (no release downloads exist here)
# into a cache outside the repo, keyed by version, so a warm machine builds nothing.
# Each tool is built in its own throwaway module so dependency graphs never mix.
#   usage: build.sh [all|kind-all|kwok|etcd|kubernetes|helm|kind|kubernetes-node|coredns|local-path|registry]...
# `all` is the kwok tier's tools; `kind-all` adds what the kind tier's node image needs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${GPUCLOUD_TESTBED_CACHE:-$HOME/.cache/gpucloud/testbed}
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-buildvcs=false
mkdir -p "$CACHE"
# One build at a time: a second caller (another test session, CI) waits, then finds
# the cache warm instead of compiling the same thing again on the same cores.
exec 9>"$CACHE/.build.lock"
flock 9

log() { printf '[testbed-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Runs "$2..." to fill directory $1 unless it is complete already; a build that dies
# half-way never leaves a directory that looks complete (atomic rename).
build_into() {
  local dest=$1; shift
  if [[ -f $dest/.complete ]]; then log "cached: $dest"; return 0; fi
  local tmp="$dest.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  local t0=$SECONDS
  "$@" "$tmp"
  echo $((SECONDS - t0)) >"$tmp/.build_seconds"
  touch "$tmp/.complete"
  rm -rf "$dest"; mv "$tmp" "$dest"
  log "built $dest in $((SECONDS - t0)) s"
}

scratch_module() {  # prints a fresh directory holding go.mod for module $1
  local d; d=$(mktemp -d)
  (cd "$d" && go mod init "$1" >/dev/null 2>&1)
  echo "$d"
}

do_kwok() {
  local out=$1
  GOBIN=$out go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  GOBIN=$out go install "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

do_helm() {
  local out=$1
  GOBIN=$out go install -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

do_etcd() {
  # etcd's server module carries local replaces, so it cannot be `go install`ed;
  # a tiny module that requires it and calls etcdmain builds the same binary.
  local out=$1 d; d=$(scratch_module gpucloud.local/etcd)
  cat >"$d/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$d" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy && go build -ldflags "-s -w" -o "$out/etcd" .)
  rm -rf "$d"
}

do_kind() {
  GOBIN=$1 go install "sigs.k8s.io/kind@$KIND_VERSION"
}

do_coredns() {
  GOBIN=$1 go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
}

do_registry() {
  GOBIN=$1 go install -ldflags "-s -w" "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
}

do_local_path() {
  GOBIN=$1 go install -ldflags "-s -w" \
    "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION"
}

# The control plane and kubectl (kwok tier), or the node's binaries (kind tier).
do_kubernetes() { build_kubernetes "$1" kube-apiserver kube-controller-manager kube-scheduler kubectl; }
do_kubernetes_node() { build_kubernetes "$1" kubelet kubeadm kube-proxy; }

build_kubernetes() {
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with
  # local paths; a consumer replaces each with the published v0.x of the same name.
  local out=$1 d; shift; d=$(scratch_module gpucloud.local/kubernetes)
  local cmds=("$@")
  (
    cd "$d"
    go mod edit -go=1.24.0 -require="k8s.io/kubernetes@$K8S_VERSION"
    go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
    local modfile
    modfile=$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod
    for m in $(awk '$1 ~ /^k8s.io\// && $2 == "v0.0.0" {print $1}' "$modfile" | sort -u); do
      go mod edit -replace="$m=$m@$K8S_STAGING_VERSION"
    done
    {
      echo '//go:build tools'
      echo 'package tools'
      echo 'import ('
      for c in "${cmds[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$c\""; done
      echo ')'
    } >tools.go
    printf 'godebug default=go1.24\n' >>go.mod
    go mod tidy
    local major minor ld="-s -w" pkg
    major=${K8S_VERSION#v}; major=${major%%.*}
    minor=$(echo "$K8S_VERSION" | cut -d. -f2)
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
      ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    for c in "${cmds[@]}"; do
      log "go build $c"
      go build -trimpath -ldflags "$ld" -o "$out/$c" "k8s.io/kubernetes/cmd/$c"
    done
  )
  rm -rf "$d"
}

targets=("$@"); [[ ${#targets[@]} -eq 0 || ${targets[0]} == all ]] && targets=(kwok etcd kubernetes helm)
[[ ${targets[0]} == kind-all ]] && targets=(etcd kubernetes helm kind kubernetes-node coredns local-path registry)
for t in "${targets[@]}"; do
  case $t in
    kind) build_into "$CACHE/kind-$KIND_VERSION" do_kind ;;
    kubernetes-node) build_into "$CACHE/kubernetes-node-$K8S_VERSION" do_kubernetes_node ;;
    coredns) build_into "$CACHE/coredns-$COREDNS_VERSION" do_coredns ;;
    registry) build_into "$CACHE/registry-$REGISTRY_VERSION" do_registry ;;
    local-path) build_into "$CACHE/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION" do_local_path ;;
    kwok) build_into "$CACHE/kwok-$KWOK_VERSION" do_kwok ;;
    etcd) build_into "$CACHE/etcd-$ETCD_VERSION" do_etcd ;;
    kubernetes) build_into "$CACHE/kubernetes-$K8S_VERSION" do_kubernetes ;;
    helm) build_into "$CACHE/helm-$HELM_VERSION" do_helm ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
done
