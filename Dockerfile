# syntax=docker/dockerfile:1
# kdpipe images: every Kubeflow component runs in one of them (see components/, docs/kubeflow.md).
#
#   target `cpu` -- CPU-only torch: the tasks that need no GPU (data, prepare, select, export,
#                   evaluate, register) and CPU clusters. About a fifth of the GPU image.
#   target `gpu` -- torch 2.14.1's own CUDA 13.0 wheels (the CUDA libraries come as pip packages, so
#                   the base image needs no CUDA) and onnxruntime-gpu built for CUDA 13: one
#                   coherent CUDA stack. Needs an NVIDIA driver R580 or newer on the node.
#
# Build (make image builds both, with docker or else buildah):
#   docker build --target cpu --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> -t kdpipe:cpu .
#   docker build --target gpu -t kdpipe:gpu .
# Base image: BASE_IMAGE (default Debian 12 slim, which ships Python 3.11); a locally imported root
# file system works too. Behind a TLS-intercepting proxy pass its CA bundle as a build secret
# (`--secret id=ca,src=<bundle>`): it is used by pip during the build and never stored in a layer.
# Dependencies are pinned by docker/requirements-{cpu,gpu}.txt (`make constraints` regenerates them),
# so two builds of one commit install the same versions.

ARG BASE_IMAGE=debian:bookworm-slim

# ---- base: Python 3.11, git (DVC reads git repositories), a venv, the non-root user ------------
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/kdpipe/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/kdpipe \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin kdpipe
WORKDIR /src

# ---- cpu: CPU-only torch, then every pinned dependency, then kdpipe itself ----------------------
# Dependencies sit in layers before the code is copied: a code change rebuilds one small layer.
FROM base AS cpu
ARG TORCH_INDEX_URL=""
ARG VERSION=0.1.0
COPY docker/requirements-cpu.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --constraint /tmp/requirements.txt torch torchvision ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && pip install --requirement /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
# kdpipe alone, built with the pinned setuptools already installed: this layer needs no network
RUN pip install --no-deps --no-build-isolation . && pip check && rm -rf /src/build
LABEL org.opencontainers.image.title="kdpipe (CPU)" org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001
WORKDIR /home/kdpipe/work
HEALTHCHECK --interval=60s --timeout=30s --retries=3 CMD ["kdpipe", "--version"]
CMD ["kdpipe", "--help"]

# ---- gpu: torch's CUDA 13.0 wheels and onnxruntime-gpu for CUDA 13 (never with onnxruntime) ----
FROM base AS gpu
ARG VERSION=0.1.0
COPY docker/requirements-gpu.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,required=false \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --requirement /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-deps --no-build-isolation . \
 && pip check \
 && python -c "import importlib.metadata as m; d = {x.metadata['Name'].lower() for x in m.distributions()}; \
assert 'onnxruntime-gpu' in d and 'onnxruntime' not in d, 'onnxruntime and onnxruntime-gpu must not both be installed'" \
 && rm -rf /src/build
LABEL org.opencontainers.image.title="kdpipe (GPU, CUDA 13.0)" org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001
WORKDIR /home/kdpipe/work
HEALTHCHECK --interval=60s --timeout=30s --retries=3 CMD ["kdpipe", "--version"]
CMD ["kdpipe", "--help"]
