#!/usr/bin/env bash
# `make kind` / `make kind-down`: the kind tier, a real Kubernetes cluster in Docker
# containers with fake GPU devices, built offline (see docs/install.md, "kind").
#
#   hack/kind/kind.sh up      # node image, registry, cluster, fake GPUs, our images pushed
#   hack/kind/kind.sh down    # delete the cluster and stop the registry (its data is kept)
#   hack/kind/kind.sh env     # print KUBECONFIG=... for a shell
#
# The cluster is reused while its node image is current and its nodes run; a stale or
# stopped one (dockerd restarted) is recreated.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
CLUSTER=${KIND_CLUSTER:-gpucloud}
KUBECONFIG_FILE=${KIND_KUBECONFIG:-$KIND_CACHE/$CLUSTER.kubeconfig}
export KUBECONFIG=$KUBECONFIG_FILE
# kind calls `docker`: our wrapper first (hack/kind/bin/docker, the --privileged quirk)
export GPUCLOUD_REAL_DOCKER=$DOCKER
kind() { PATH=$KIND_DIR/bin:$PATH "$KIND_BIN" "$@"; }
kubectl() { "$KUBECTL" "$@"; }

cluster_exists() { kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; }

down() {
  [[ -x $KIND_BIN ]] || { log "kind is not built: nothing to delete"; return 0; }
  ensure_docker
  if cluster_exists; then kind delete cluster --name "$CLUSTER"; fi
  "$DOCKER" rm -f "$REGISTRY_NAME" >/dev/null 2>&1 || true
  rm -f "$KUBECONFIG_FILE"
  rm -rf "${KIND_CACHE:?}/$CLUSTER-shared-disks"
}

# The registry runs beside the cluster (it outlives cluster re-creation; its blobs live
# in a Docker volume), on the kind network for the nodes and on 127.0.0.1 for pushes.
ensure_registry() {
  local image
  image=gpucloud.local/kind/registry:$REGISTRY_VERSION-$(inputs_hash "$KIND_DIR/registry")
  if ! image_exists "$image"; then
    local d; d=$(mktemp -d)
    cp "$CACHE/registry-$REGISTRY_VERSION/registry" "$KIND_DIR/registry/config.yml" "$d/"
    "$DOCKER" build -q -f "$KIND_DIR/registry/Dockerfile" -t "$image" "$d" >/dev/null
    rm -rf "$d"
  fi
  local state
  state=$("$DOCKER" inspect -f '{{.State.Running}} {{.Config.Image}}' "$REGISTRY_NAME" 2>/dev/null || true)
  if [[ $state != "true $image" ]]; then
    "$DOCKER" rm -f "$REGISTRY_NAME" >/dev/null 2>&1 || true
    if (exec 3<>"/dev/tcp/127.0.0.1/$REGISTRY_PORT") 2>/dev/null; then
      die "port $REGISTRY_PORT on 127.0.0.1 is in use: free it, or choose another with GPUCLOUD_KIND_REGISTRY_PORT=PORT (then make kind-down first)"
    fi
    "$DOCKER" run -d --restart=always --name "$REGISTRY_NAME" -p "127.0.0.1:$REGISTRY_PORT:5000" \
      -v gpucloud-registry:/var/lib/registry "$image" >/dev/null
  fi
  if [[ $("$DOCKER" inspect -f '{{if index .NetworkSettings.Networks "kind"}}on{{end}}' "$REGISTRY_NAME") != on ]]; then
    "$DOCKER" network connect kind "$REGISTRY_NAME"
  fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${limit}s waiting for $what"
    sleep 1
  done
}

gpu_capacity_ready() {  # every node labelled with fake GPUs reports them allocatable
  local want have
  while read -r node want; do
    have=$(kubectl get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')
    [[ $have == "$want" ]] || return 1
  done < <(kubectl get nodes -l gpucloud.dev/fake-gpu.count \
             -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.labels.gpucloud\.dev/fake-gpu\.count}{"\n"}{end}')
}

# Images the tests deploy beside the chart (not ours to ship): PostgreSQL from Debian.
push_test_images() {
  local base image
  base=$(bash "$KIND_DIR/debian-images.sh" postgresql)
  image=$REGISTRY/gpucloud-testing/postgresql:$(inputs_hash "$base" "$KIND_DIR/postgresql")
  if ! image_exists "$image"; then
    "$DOCKER" build -q --build-arg "BASE=$base" -t "$image" "$KIND_DIR/postgresql" >/dev/null
  fi
  "$DOCKER" push -q "$image" >/dev/null
  printf 'GPUCLOUD_TEST_POSTGRESQL_IMAGE=%s\n' "$image" >>"$REPO/build/images.env"
}

# A cluster kept from an earlier run serves only once its API answers and every node is
# Ready: nodes that dockerd restarted may take a while, or never (a worker whose address
# changed), and a kubectl apply against a half-started API server fails outright.
cluster_healthy() {
  kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" >/dev/null 2>&1 || return 1
  local deadline=$((SECONDS + 90))
  until kubectl get --raw /readyz >/dev/null 2>&1 &&
        kubectl wait --for=condition=Ready nodes --all --timeout=5s >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 2
  done
}

# The fake GPU device plugin's manifest travels in the node image (its image tag too).
apply_device_plugin() {
  "$DOCKER" exec "$CLUSTER-control-plane" cat /kind/manifests/fake-gpu-device-plugin.yaml |
    kubectl apply -f - >/dev/null
}

up() {
  local t0=$SECONDS
  ensure_docker
  local node_image
  node_image=$(bash "$KIND_DIR/node-image.sh")
  local config created=0
  # Cloud disks' shared storage: one host folder bound into every node (cluster.yaml),
  # writable by the operator's uid, sticky so tenants' folders stay their owners'.
  local shared_disks=$KIND_CACHE/$CLUSTER-shared-disks
  mkdir -p "$shared_disks" && chmod 1777 "$shared_disks"
  config=$(sed -e "s#@K8S_REPO@#$K8S_REPO#g" -e "s#@REGISTRY_PORT@#$REGISTRY_PORT#g" \
               -e "s#@REGISTRY_NAME@#$REGISTRY_NAME#g" -e "s#@SHARED_DISKS@#$shared_disks#g" \
               "$KIND_DIR/cluster.yaml")
  if cluster_exists; then
    local current stopped
    current=$("$DOCKER" inspect -f '{{.Config.Image}}' "$CLUSTER-control-plane" 2>/dev/null || true)
    stopped=$("$DOCKER" ps -a --filter "label=io.x-k8s.kind.cluster=$CLUSTER" --filter status=exited -q)
    if [[ $current != "$node_image" ]]; then
      log "cluster $CLUSTER runs node image ${current:-?}, not $node_image: recreating it"
      kind delete cluster --name "$CLUSTER"
    elif [[ -n $stopped ]]; then
      log "cluster $CLUSTER has stopped nodes (dockerd restarted?): recreating it"
      kind delete cluster --name "$CLUSTER"
    elif [[ $config != "$(cat "$KIND_CACHE/$CLUSTER.yaml" 2>/dev/null)" ]]; then
      log "hack/kind/cluster.yaml changed since cluster $CLUSTER was created: recreating it"
      kind delete cluster --name "$CLUSTER"
    elif ! cluster_healthy; then
      log "cluster $CLUSTER did not come back healthy within 90 s (dockerd restarted under it?): recreating it"
      kind delete cluster --name "$CLUSTER"
    fi
  fi
  if ! cluster_exists; then
    local t1=$SECONDS
    find "$shared_disks" -mindepth 1 -delete  # a new cluster has no disks yet
    printf '%s\n' "$config" >"$KIND_CACHE/$CLUSTER.yaml"
    kind create cluster --name "$CLUSTER" --image "$node_image" \
      --config "$KIND_CACHE/$CLUSTER.yaml" --kubeconfig "$KUBECONFIG_FILE" --retain >&2 ||
      die "kind create cluster failed; node logs: kind export logs --name $CLUSTER (the nodes were kept: make kind-down removes them)"
    echo $((SECONDS - t1)) >"$KIND_CACHE/create-seconds"
    created=1
  fi  # a kept cluster's kubeconfig was written by cluster_healthy
  ensure_registry
  wait_for 60 "the fake GPU device plugin applied" apply_device_plugin
  wait_for 180 "every node Ready" kubectl wait --for=condition=Ready nodes --all --timeout=5s
  wait_for 120 "fake GPUs allocatable on the GPU nodes" gpu_capacity_ready
  wait_for 120 "CoreDNS" kubectl -n kube-system rollout status deploy/coredns --timeout=5s
  wait_for 120 "the local-path provisioner" kubectl -n local-path-storage rollout status deploy/local-path-provisioner --timeout=5s
  if [[ ${GPUCLOUD_KIND_SKIP_IMAGES:-} != 1 ]]; then
    bash "$REPO/hack/images.sh" --push "$REGISTRY"
    push_test_images
  fi
  # up to every node Ready, GPUs allocatable, DNS and storage serving, images pushed
  ((created)) && echo $((SECONDS - t0)) >"$KIND_CACHE/up-seconds"
  log "cluster $CLUSTER ready in $((SECONDS - t0)) s: export KUBECONFIG=$KUBECONFIG_FILE"
  kubectl get nodes -L nvidia.com/gpu.product -L nvidia.com/gpu.count >&2
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
  *) die "usage: $0 up|down|env" ;;
esac
