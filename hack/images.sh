#!/usr/bin/env bash
# `make images`: gpucloud's container images, built offline from the root Dockerfile on
# a Debian base made here (hack/kind/debian-images.sh), tagged as the chart's defaults
# name them (gpucloud/<component>:<appVersion>) and with a content tag
# (<appVersion>-<hash>) that changes with every change of what the images hold.
#   hack/images.sh                     # build
#   hack/images.sh --push REGISTRY     # build, then push both tags to REGISTRY/gpucloud/*
# build/images.env records the content tag (and the registry) for tests and demos.
set -euo pipefail
source "$(dirname "$0")/kind/lib.sh"
cd "$REPO"
COMPONENTS=(operator api gateway agent fake-model-server)
TAG=${TAG:-$(awk -F'"' '/^appVersion:/ {print $2}' charts/gpucloud/Chart.yaml)}
PY=${PY:-$REPO/.venv/bin/python}

ensure_docker
base=$(bash "$KIND_DIR/debian-images.sh" python)

# Dependency wheels, cached by the dependency list: pip resolves once per change of
# pyproject.toml's dependencies, and the images install offline from them.
mkdir -p build
req_key=$("$PY" hack/image_requirements.py --key)
wheels_cache=$HOME/.cache/gpucloud/wheels/$req_key
if [[ ! -f $wheels_cache/.complete ]]; then
  t0=$SECONDS
  log "pip wheel: the images' dependencies ($req_key)"
  rm -rf "$wheels_cache".tmp.*
  tmp=$wheels_cache.tmp.$$; mkdir -p "$tmp"
  "$PY" hack/image_requirements.py --out "$tmp"   # requirements-<extra>.txt, all.txt
  "$PY" -m pip wheel -q --only-binary :all: -r "$tmp/all.txt" -w "$tmp"
  "$PY" -m pip download -q --only-binary :all: --no-deps pip -d "$tmp/pip"
  mv "$tmp"/pip/pip-*.whl "$tmp/pip.whl"; rmdir "$tmp/pip"
  "$PY" hack/image_requirements.py --pin "$tmp"   # pin every line to the wheel we have
  touch "$tmp/.complete"; rm -rf "$wheels_cache"; mv "$tmp" "$wheels_cache"
  echo $((SECONDS - t0)) >"$KIND_CACHE/build-seconds-wheels"
fi
rm -rf build/wheels build/dist
cp -al "$wheels_cache" build/wheels 2>/dev/null || cp -a "$wheels_cache" build/wheels
"$PY" -m pip wheel -q --no-deps --no-build-isolation . -w build/dist 2>/dev/null ||
  "$PY" -m pip wheel -q --no-deps . -w build/dist

CONTENT_TAG=$TAG-$(inputs_hash "$base" build/wheels/all.txt build/dist Dockerfile)
t0=$SECONDS
for c in "${COMPONENTS[@]}"; do
  "$DOCKER" build -q --target "$c" --build-arg "BASE_IMAGE=$base" \
    -t "gpucloud/$c:$TAG" -t "gpucloud/$c:$CONTENT_TAG" . >/dev/null
done
log "built ${COMPONENTS[*]} (gpucloud/*:$TAG and :$CONTENT_TAG) in $((SECONDS - t0)) s"
# a build that reused every layer says nothing about a cold one: keep the slowest seen
prev=$(cat "$KIND_CACHE/build-seconds-images" 2>/dev/null || echo 0)
((SECONDS - t0 > prev)) && echo $((SECONDS - t0)) >"$KIND_CACHE/build-seconds-images"
for c in "${COMPONENTS[@]}"; do
  printf '  gpucloud/%s:%s %s\n' "$c" "$TAG" "$("$DOCKER" image inspect -f '{{.Size}}' "gpucloud/$c:$TAG" | numfmt --to=iec)" >&2
done
printf 'GPUCLOUD_IMAGE_TAG=%s\n' "$CONTENT_TAG" >build/images.env

if [[ ${1:-} == --push ]]; then
  registry=${2:?--push needs a registry, e.g. localhost:5001}
  t0=$SECONDS
  for c in "${COMPONENTS[@]}"; do
    for t in "$TAG" "$CONTENT_TAG"; do
      "$DOCKER" tag "gpucloud/$c:$t" "$registry/gpucloud/$c:$t"
      "$DOCKER" push -q "$registry/gpucloud/$c:$t" >/dev/null
    done
  done
  printf 'GPUCLOUD_IMAGE_REGISTRY=%s\n' "$registry" >>build/images.env
  log "pushed to $registry in $((SECONDS - t0)) s"
fi
