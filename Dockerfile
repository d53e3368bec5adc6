# kdpipe image: every Kubeflow component runs in it (see components/ and README "Kubeflow").
# Build: make image (or: docker build -t kdpipe:0.1.0 .). GPU: CUDA 12 runtime, onnxruntime-gpu, the
# pinned torch/torchvision; CPU-only nodes run it too (torch and onnxruntime fall back to the CPU).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# ---- build stage: a virtual environment with kdpipe and its pinned stack -------------------------
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gnupg \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential git \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/kdpipe
ENV PATH=/opt/kdpipe/bin:$PATH
WORKDIR /src
# Dependencies first (cached while only the code changes). The default Linux x86_64 torch wheels are
# CUDA builds (CUDA libraries come as pip packages), so no extra index is needed.
RUN pip install --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1 \
 && pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY src ./src
# The `gpu` extra: onnxruntime-gpu, never together with onnxruntime (see README, "GPU"). The local
# package is not version-pinned (its dependencies are pinned in pyproject.toml).
# hadolint ignore=DL3013
RUN pip install '.[gpu]' \
 && pip check \
 && python -c "import importlib.metadata as m; d = {x.metadata['Name'].lower() for x in m.distributions()}; \
assert 'onnxruntime-gpu' in d and 'onnxruntime' not in d, 'onnxruntime and onnxruntime-gpu must not both be installed'"

# ---- final stage: runtime only (no compiler, no headers, no pip caches) ---------------------------
FROM ${CUDA_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kdpipe" \
      org.opencontainers.image.description="Semi-supervised knowledge-distillation image classifier pipeline (Kubeflow components)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/kdpipe/bin:$PATH
# python3.11 runtime (no -dev, no build tools); git for DVC's repository access.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gnupg \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv git ca-certificates \
 && apt-get purge -y --auto-remove software-properties-common gnupg \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/kdpipe /opt/kdpipe
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin kdpipe
USER 10001
WORKDIR /home/kdpipe/work
HEALTHCHECK --interval=60s --timeout=30s --retries=3 CMD ["kdpipe", "--version"]
ENTRYPOINT []
CMD ["kdpipe", "--help"]
