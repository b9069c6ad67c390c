#!/usr/bin/env bash
# Builds the kind node image offline and prints its tag: Debian's systemd, containerd,
# runc and CNI plugins; kubelet, kubeadm, kubectl from the Kubernetes module; every image
# the cluster needs preloaded (control plane, etcd, CoreDNS, pause, kube-proxy, our
# podnet and fake GPU device plugin, local-path-provisioner and its busybox helper).
# The tag is a hash of every input, so a warm machine reuses it.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
# image_exists below reads "not there" when dockerd is down: start it first
ensure_docker

build_go_tools
node_base=$(bash "$KIND_DIR/debian-images.sh" node)
netutils_base=$(bash "$KIND_DIR/debian-images.sh" netutils)
KUBE_NODE_BIN=$CACHE/kubernetes-node-$K8S_VERSION
KUBE_BIN=$CACHE/kubernetes-$K8S_VERSION

key=$(inputs_hash "$node_base" "$netutils_base" "$REPO/hack/testbed/versions.env" \
  "$0" "$KIND_DIR/node" "$KIND_DIR/images" "$KIND_DIR/manifests" "$KIND_DIR/kindagents")
NODE_IMAGE=gpucloud.local/kind-node:$K8S_VERSION-$key
if image_exists "$NODE_IMAGE"; then echo "$NODE_IMAGE"; exit 0; fi
log "building $NODE_IMAGE"
t0=$SECONDS

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# docker build of a context holding only what the image needs
build() {  # build TAG DOCKERFILE [--build-arg ...] -- FILE...
  local tag=$1 dockerfile=$2; shift 2
  local args=() d; d=$(mktemp -d -p "$ctx")
  while [[ $# -gt 0 && $1 != -- ]]; do args+=("$1"); shift; done
  shift
  cp -a "$@" "$d/"
  "$DOCKER" build -q -f "$dockerfile" "${args[@]}" -t "$tag" "$d" >/dev/null
}

# The images kubeadm will ask for, under our repository, built from what it names.
preload=()
while read -r img; do
  name=${img#"$K8S_REPO"/}; name=${name%%:*}
  case $name in
    kube-apiserver|kube-controller-manager|kube-scheduler)
      build "$img" "$KIND_DIR/images/static.Dockerfile" --build-arg "BIN=$name" -- "$KUBE_BIN/$name" ;;
    kube-proxy)
      build "$img" "$KIND_DIR/images/kube-proxy.Dockerfile" --build-arg "BASE=$netutils_base" -- "$KUBE_NODE_BIN/kube-proxy" ;;
    etcd)  # kubeadm names its etcd tag; it holds the etcd the test bed builds
      build "$img" "$KIND_DIR/images/static.Dockerfile" --build-arg BIN=etcd -- "$CACHE/etcd-$ETCD_VERSION/etcd" ;;
    coredns)
      [[ $img == *":$COREDNS_VERSION" ]] || die "kubeadm wants $img but versions.env builds CoreDNS $COREDNS_VERSION"
      build "$img" "$KIND_DIR/images/coredns.Dockerfile" -- "$CACHE/coredns-$COREDNS_VERSION/coredns" ;;
    pause)
      pause_src=$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c
      [[ -f $pause_src ]] || (cd "$(mktemp -d)" && go mod download "k8s.io/kubernetes@$K8S_VERSION")
      gcc -Os -Wall -Werror -static -DVERSION="${img##*:}" -o "$ctx/pause" "$pause_src"
      strip "$ctx/pause"
      build "$img" "$KIND_DIR/images/pause.Dockerfile" -- "$ctx/pause"
      sandbox_image=$img ;;
    *) die "kubeadm asks for $img, which this script does not know how to build" ;;
  esac
  preload+=("$img")
done < <("$KUBE_NODE_BIN/kubeadm" config images list --kubernetes-version "$K8S_VERSION" --image-repository "$K8S_REPO")
[[ -n ${sandbox_image:-} ]] || die "kubeadm listed no pause image"

lpp_image=$K8S_REPO/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION
build "$lpp_image" "$KIND_DIR/images/static.Dockerfile" --build-arg BIN=local-path-provisioner -- \
  "$CACHE/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION/local-path-provisioner"
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null) ||
  die "busybox-static is missing: apt-get install busybox-static (make system-deps does)"
busybox_image=$K8S_REPO/busybox:$(tr -c 'A-Za-z0-9._-' _ <<<"$busybox_version" | sed 's/_$//')
build "$busybox_image" "$KIND_DIR/images/busybox.Dockerfile" -- /bin/busybox

agents_image=gpucloud.local/kind/kindagents:$(inputs_hash "$KIND_DIR/kindagents")
(cd "$KIND_DIR/kindagents" && go build -trimpath -ldflags "-s -w" -o "$ctx/" ./cmd/podnet ./cmd/fake-gpu-device-plugin)
build "$agents_image" "$KIND_DIR/kindagents/Dockerfile" -- "$ctx/podnet" "$ctx/fake-gpu-device-plugin"
preload+=("$lpp_image" "$busybox_image" "$agents_image")

# The node's build context: kind's node files, the binaries, our manifests.
node_ctx=$ctx/node
mkdir -p "$node_ctx/bin" "$node_ctx/manifests"
cp -a "$(kind_module_dir)/images/base/files" "$node_ctx/kind-files"
chmod -R u+w "$node_ctx/kind-files"
cp "$KUBE_NODE_BIN/kubelet" "$KUBE_NODE_BIN/kubeadm" "$KUBE_BIN/kubectl" "$node_ctx/bin/"
cp "$KIND_DIR/node/pre-entrypoint" "$node_ctx/"
subst() {
  sed -e "s#@KINDAGENTS_IMAGE@#$agents_image#g" -e "s#@LOCAL_PATH_IMAGE@#$lpp_image#g" \
      -e "s#@BUSYBOX_IMAGE@#$busybox_image#g" "$1"
}
subst "$KIND_DIR/manifests/podnet.yaml" >"$node_ctx/manifests/default-cni.yaml"
subst "$KIND_DIR/manifests/local-path-storage.yaml" >"$node_ctx/manifests/default-storage.yaml"
subst "$KIND_DIR/manifests/fake-gpu-device-plugin.yaml" >"$node_ctx/manifests/fake-gpu-device-plugin.yaml"
# which preloaded image is which, for tests (e.g. busybox as a tenant's root image)
printf 'BUSYBOX_IMAGE=%s\nKINDAGENTS_IMAGE=%s\nLOCAL_PATH_IMAGE=%s\n' \
  "$busybox_image" "$agents_image" "$lpp_image" >"$node_ctx/manifests/images.env"
"$DOCKER" build -q -f "$KIND_DIR/node/Dockerfile" --build-arg "BASE=$node_base" \
  --build-arg "K8S_VERSION=$K8S_VERSION" --build-arg "SANDBOX_IMAGE=$sandbox_image" \
  -t "$NODE_IMAGE-stage" "$node_ctx" >/dev/null

# Preload: import every image into the node's containerd and pin it (never collected).
cid=$("$DOCKER" run -d --entrypoint=sleep --security-opt seccomp=unconfined "$NODE_IMAGE-stage" infinity)
trap '"$DOCKER" rm -f "$cid" >/dev/null 2>&1; rm -rf "$ctx"' EXIT
"$DOCKER" exec "$cid" bash -c 'containerd >/tmp/containerd.log 2>&1 &
  for i in $(seq 1 50); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done; cat /tmp/containerd.log; exit 1'
"$DOCKER" save "${preload[@]}" |
  "$DOCKER" exec -i "$cid" ctr -n k8s.io images import --all-platforms --no-unpack --digests - >/dev/null
"$DOCKER" exec "$cid" bash -c 'for r in $(ctr -n k8s.io images ls -q); do
    ctr -n k8s.io images label "$r" io.cri-containerd.pinned=pinned >/dev/null; done
  pkill containerd  # it stays a zombie (nothing reaps in this container): wait for that
  while pgrep -x -r D,R,S,T containerd >/dev/null; do sleep 0.2; done; rm -f /tmp/containerd.log'
"$DOCKER" commit --change 'ENTRYPOINT ["/usr/local/bin/pre-entrypoint", "/sbin/init"]' \
  --change 'CMD []' "$cid" "$NODE_IMAGE" >/dev/null
"$DOCKER" rm -f "$cid" >/dev/null
"$DOCKER" rmi "$NODE_IMAGE-stage" >/dev/null
echo $((SECONDS - t0)) >"$KIND_CACHE/build-seconds-node-image"
log "built $NODE_IMAGE in $((SECONDS - t0)) s ($("$DOCKER" image inspect -f '{{.Size}}' "$NODE_IMAGE" | numfmt --to=iec))"
echo "$NODE_IMAGE"
