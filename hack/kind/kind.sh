#!/usr/bin/env bash
# `make kind`: a kind cluster with kwok's fake GPU nodes (the test bed's products and
# labels), the four images built and loaded, and the chart installed.
# Needs docker, kind, kubectl and helm. NOT exercised by CI: the kwok test bed
# (`make testbed`, tests/chart) is the tested path.
#
#   hack/kind/kind.sh            # create or reuse the cluster, build, load, install
#   hack/kind/kind.sh down       # delete the cluster
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${KIND_CLUSTER:-gpucloud}
TAG=${TAG:-dev}
NAMESPACE=${NAMESPACE:-gpucloud-system}
PY=${PY:-.venv/bin/python}
# shellcheck disable=SC1091
KWOK_VERSION=$(source hack/testbed/versions.env && echo "$KWOK_VERSION")
KWOK_RELEASE=https://github.com/kubernetes-sigs/kwok/releases/download/$KWOK_VERSION

if [[ ${1:-up} == down ]]; then
  exec kind delete cluster --name "$CLUSTER"
fi

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kubectl config use-context "kind-$CLUSTER"

# kwok's controller plays the kubelet of every Node annotated kwok.x-k8s.io/node=fake.
kubectl apply -f "$KWOK_RELEASE/kwok.yaml"
kubectl apply -f "$KWOK_RELEASE/stage-fast.yaml"
"$PY" hack/kind/nodes.py | kubectl apply -f -

# The control plane runs on kind's real node; only the agent goes to the fake GPU nodes
# (where kwok fakes its pods: there is no NVML there).
REAL_NODE=$(kubectl get nodes -l '!type' -o jsonpath='{.items[0].metadata.name}')
kubectl label node "$REAL_NODE" gpucloud.dev/control-plane=true --overwrite

for component in operator agent gateway api; do
  dockerfile=$component/Dockerfile
  [[ $component == api ]] && dockerfile=Dockerfile.api
  docker build -f "$dockerfile" -t "gpucloud/$component:$TAG" .
  kind load docker-image --name "$CLUSTER" "gpucloud/$component:$TAG"
done

"$PY" hack/sync_chart_crds.py --check
sel='gpucloud\.dev/control-plane'
helm upgrade --install gpucloud charts/gpucloud --namespace "$NAMESPACE" --create-namespace \
  --set operator.image.tag="$TAG" --set api.image.tag="$TAG" \
  --set gateway.image.tag="$TAG" --set agent.image.tag="$TAG" \
  --set "operator.nodeSelector.$sel=true" --set "api.nodeSelector.$sel=true" \
  --set "gateway.nodeSelector.$sel=true" \
  --set agent.nvml=fake --wait --timeout 5m
kubectl get nodes -L nvidia.com/gpu.product
kubectl -n "$NAMESPACE" get pods -o wide
