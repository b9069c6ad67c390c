# gpucloud's images, one target each: operator, api, gateway, agent, fake-model-server.
# Build them with `make images` (hack/images.sh): it makes the Debian base (mmdebstrap,
# no registry needed), the dependency wheels (build/wheels) and the project wheel
# (build/dist) this file installs, offline. By hand, after that:
#   docker build --target agent -t gpucloud/agent:0.1.0 .
# Each image is three layers: the Debian base with Python (shared by all), one
# virtualenv of the component's dependencies (changes only with pyproject.toml), and
# gpucloud itself (a megabyte, the same in every image), so a code change moves one
# small layer. No compilers, no pip, no build or test tools at runtime. Every image runs
# as uid 10001; the chart runs the agent as root (kubelet socket, instance volumes)
# with every capability dropped but the few it needs.
ARG BASE_IMAGE=gpucloud.local/debian-python:bookworm

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gpucloud \
 && useradd --system --uid 10001 --gid gpucloud --no-create-home --shell /usr/sbin/nologin gpucloud
ENV PATH=/opt/gpucloud/bin:/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001

# pip runs from its wheel, so no image carries it. requirements-<extra>.txt are pinned
# to the wheels by hack/images.sh.
FROM ${BASE_IMAGE} AS wheels
COPY build/wheels /wheels
ENV PIP="/opt/venv/bin/python /wheels/pip.whl/pip install --no-index --find-links /wheels"
# the dependencies' virtualenv finds gpucloud in /opt/gpucloud
ENV PTH="/opt/venv/lib/python3.11/site-packages/gpucloud.pth"

FROM wheels AS deps-operator
RUN python3 -m venv --without-pip /opt/venv && $PIP -r /wheels/requirements-operator.txt \
 && echo /opt/gpucloud > $PTH
FROM wheels AS deps-api
RUN python3 -m venv --without-pip /opt/venv && $PIP -r /wheels/requirements-api.txt \
 && echo /opt/gpucloud > $PTH
FROM wheels AS deps-gateway
RUN python3 -m venv --without-pip /opt/venv && $PIP -r /wheels/requirements-gateway.txt \
 && echo /opt/gpucloud > $PTH
FROM wheels AS deps-agent
RUN python3 -m venv --without-pip /opt/venv && $PIP -r /wheels/requirements-agent.txt \
 && echo /opt/gpucloud > $PTH

# gpucloud alone, its console scripts pointing at /opt/venv/bin/python
FROM wheels AS project
COPY build/dist /dist
RUN python3 -m venv --without-pip /opt/venv && $PIP --no-deps --target /opt/gpucloud /dist/gpucloud-*.whl

FROM runtime AS operator
COPY --from=deps-operator /opt/venv /opt/venv
COPY --from=project /opt/gpucloud /opt/gpucloud
# two malloc arenas, not 8 per core: the operator's ~28 threads each kept a burst's
# garbage in an arena of its own (2,000 instances: 610 -> 454 MiB, docs/benchmarks.md)
ENV MALLOC_ARENA_MAX=2
ENTRYPOINT ["gpucloud-operator"]

FROM runtime AS api
COPY --from=deps-api /opt/venv /opt/venv
COPY --from=project /opt/gpucloud /opt/gpucloud
ENTRYPOINT ["gpucloud-api"]

FROM runtime AS gateway
COPY --from=deps-gateway /opt/venv /opt/venv
COPY --from=project /opt/gpucloud /opt/gpucloud
ENTRYPOINT ["gpucloud-gateway"]

# NVML (libnvidia-ml) is injected by the NVIDIA container runtime on GPU nodes.
FROM runtime AS agent
COPY --from=deps-agent /opt/venv /opt/venv
COPY --from=project /opt/gpucloud /opt/gpucloud
ENTRYPOINT ["gpucloud-agent"]

# The model server the model tests deploy: OpenAI-style answers, no weights.
FROM runtime AS fake-model-server
COPY --from=deps-gateway /opt/venv /opt/venv
COPY --from=project /opt/gpucloud /opt/gpucloud
ENTRYPOINT ["python3", "-m", "gpucloud_gateway.fake_model_server", "--host", "0.0.0.0"]
