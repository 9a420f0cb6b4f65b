#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: generated code current, compose file valid and in
# step with the launcher, lint, and the whole test suite (unit, integration with real Redis and
# services, end-to-end with real vLLM). Extra arguments go to pytest (e.g. -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

python scripts/gen_protos.py --check
python -m duopool.topology | diff -u docker-compose.yml - || { echo "docker-compose.yml is stale: python -m duopool.topology > docker-compose.yml"; exit 1; }
if command -v docker-compose >/dev/null 2>&1; then
  docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml is valid"
else
  echo "docker-compose not installed: skipping its validation"
fi
ruff check duopool services tests scripts

# An outside gRPC client for the reflection tests (buf curl, from the npm registry): reflection v1 must be
# readable by a client nobody here wrote.
BUF_VERSION=1.75.0
if [ ! -x .cache/tools/node_modules/.bin/buf ] && command -v npm >/dev/null 2>&1; then
  echo "installing buf $BUF_VERSION (npm) for the reflection tests"
  mkdir -p .cache/tools
  npm install --silent --no-audit --no-fund --prefix .cache/tools "@bufbuild/buf@$BUF_VERSION" \
    || echo "buf could not be installed: the buf reflection test will say so" >&2
fi
if [ -x .cache/tools/node_modules/.bin/buf ]; then
  export DUOPOOL_BUF="$PWD/.cache/tools/node_modules/.bin/buf"
fi

set +e
python -m pytest -p no:cacheprovider -ra "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ "$rc" = 0 ] || exit "$rc"
# CI also runs the compose stack for real (podman; installs what it needs, bounded, removes what it built).
# Elsewhere: DUOPOOL_COMPOSE_SMOKE=1 bash scripts/test.sh, or bash scripts/compose_smoke.sh on its own.
if [ "${DUOPOOL_COMPOSE_SMOKE:-${CI:-false}}" = true ] || [ "${DUOPOOL_COMPOSE_SMOKE:-}" = 1 ]; then
  bash scripts/compose_smoke.sh
fi
