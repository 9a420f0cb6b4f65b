#!/usr/bin/env bash
# The compose smoke test: docker-compose.yml really runs, here with podman + podman-compose (no Docker engine
# on the development machines). It installs podman and podman-compose when missing, builds a Debian base
# image with debootstrap when no registry can be pulled from, builds the project's image with the project's
# Dockerfile (the host's pip settings passed as build arguments and its CA bundle as a build secret, nothing
# of this machine written into the repo), brings up redis, scheduler, kvtransfer, prefill-0, decode-0 and
# router, answers a prompt with real vLLM through the router's OpenAI API, runs a small batch, kills a
# worker container's process with SIGKILL while the batch runs and checks the restart policy brings it back
# and the batch finishes with every request exactly once, then removes the containers, volumes, network and
# the images it built. Figures go to stdout and to $OUT/compose_smoke.json.
#
#   bash scripts/compose_smoke.sh            # needs root (apt, podman); bounded by SMOKE_TIMEOUT_S
# Settings: BASE_IMAGE (skip the base build), DEBIAN_MIRROR (for debootstrap, default deb.debian.org), KEEP_IMAGES=1 (keep what it built), OUT (figures dir),
# SMOKE_TIMEOUT_S (whole run, default 2400).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/compose-smoke}
mkdir -p "$OUT"
PROJECT=duopool-smoke
IMAGE=localhost/duopool:smoke
REDIS_IMAGE=localhost/duopool-redis:smoke
T0=$(date +%s)
log() { echo "[compose-smoke +$(( $(date +%s) - T0 ))s] $*"; }
die() { log "FAILED: $*"; exit 1; }

if [ -z "${SMOKE_INNER:-}" ]; then  # the whole run is bounded; teardown runs on every exit
  export SMOKE_INNER=1
  exec timeout --kill-after=60 "${SMOKE_TIMEOUT_S:-2400}" bash "$0" "$@"
fi

# --- podman, podman-compose ---------------------------------------------------------------------------
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  log "installing podman (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman buildah crun runc \
    fuse-overlayfs slirp4netns netavark aardvark-dns debootstrap >/dev/null
fi
PC_VENV=$ROOT/.cache/tools/podman-compose
if [ ! -x "$PC_VENV/bin/podman-compose" ]; then
  log "installing podman-compose (pip)"
  python3 -m venv "$PC_VENV"
  "$PC_VENV/bin/pip" install -q "podman-compose==1.6.0"
fi
COMPOSE=("$PC_VENV/bin/podman-compose" -p "$PROJECT" -f docker-compose.yml -f "$OUT/smoke-override.yml")
# runc and explicit ulimits: crun fails here on setrlimit/cgroups. A containers.conf of our own, not /etc's.
export CONTAINERS_CONF=$OUT/containers.conf
cat > "$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=30000:30000"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
podman --version

BUILT=()
teardown() {
  rc=$?
  log "teardown"
  "${COMPOSE[@]}" down -v -t 5 >/dev/null 2>&1 || true
  podman pod rm -f "pod_$PROJECT" >/dev/null 2>&1 || true
  podman volume ls -q | grep "^${PROJECT}_" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
  podman network ls -q | grep "^${PROJECT}" | xargs -r podman network rm -f >/dev/null 2>&1 || true
  if [ "${KEEP_IMAGES:-0}" != 1 ] && [ ${#BUILT[@]} -gt 0 ]; then
    podman rmi -f "${BUILT[@]}" >/dev/null 2>&1 || true
    podman image prune -f >/dev/null 2>&1 || true
  fi
  log "done (rc $rc)"
}
trap teardown EXIT

# --- base image -------------------------------------------------------------------------------------------
if [ -z "${BASE_IMAGE:-}" ]; then
  if timeout 60 podman pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
    BASE_IMAGE=docker.io/library/python:3.11-slim
  else
    BASE_IMAGE=localhost/duopool-base:bookworm
    if ! podman image exists "$BASE_IMAGE"; then
      mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
      log "no registry: building $BASE_IMAGE with debootstrap from $mirror"
      dir=$(mktemp -d /var/tmp/duopool-base.XXXXXX)
      debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$dir" "$mirror" \
        >"$OUT/debootstrap.log" 2>&1 || { tail -20 "$OUT/debootstrap.log"; die "debootstrap"; }
      tar -C "$dir" -c . | podman import - "$BASE_IMAGE" >/dev/null
      rm -rf "$dir"
      BUILT+=("$BASE_IMAGE")
    fi
  fi
fi
log "base image: $BASE_IMAGE"

# --- the host's pip settings, passed in (never committed) --------------------------------------------------
pipconf() { pip config list 2>/dev/null | sed -nE "s/^(global|:env:)\.$1='(.*)'$/\2/p" | head -1; }
FIND_LINKS=${PIP_FIND_LINKS:-$(pipconf find-links)}
EXTRA_INDEX=${PIP_EXTRA_INDEX_URL:-$(pipconf extra-index-url)}
INDEX=${PIP_INDEX_URL:-$(pipconf index-url)}
CERT=${PIP_CERT:-$(pipconf cert)}
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "PIP_FIND_LINKS=$FIND_LINKS"
            --build-arg "PIP_EXTRA_INDEX_URL=$EXTRA_INDEX" --build-arg "PIP_INDEX_URL=$INDEX")
declare -A MOUNTED=()
for loc in $FIND_LINKS $EXTRA_INDEX $INDEX; do  # local wheel dirs and file:// indexes: mounted read-only
  path=${loc#file://}
  if [ -d "$path" ]; then
    top=/$(echo "$path" | cut -d/ -f2-3)
    [ -n "${MOUNTED[$top]:-}" ] || BUILD_ARGS+=(-v "$top:$top:ro")
    MOUNTED[$top]=1
  fi
done
# torch: where the host's pip finds it, else the PyTorch CPU index (the Dockerfile's default)
if [ -n "$FIND_LINKS$EXTRA_INDEX$INDEX" ] && pip download --no-deps -q -d "$OUT/probe" "torch==2.13.0" >/dev/null 2>&1; then
  BUILD_ARGS+=(--build-arg "TORCH_INDEX_URL=")
fi
rm -rf "$OUT/probe"
if [ -n "$CERT" ] && [ -f "$CERT" ]; then BUILD_ARGS+=(--secret "id=pip_cert,src=$CERT"); fi

log "building $IMAGE with the project's Dockerfile"
b0=$(date +%s)
podman build --format docker -q -t "$IMAGE" "${BUILD_ARGS[@]}" . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; die "image build"; }
BUILD_S=$(( $(date +%s) - b0 ))
BUILT+=("$IMAGE")
IMAGE_BYTES=$(podman image inspect -f '{{.Size}}' "$IMAGE")
log "built in ${BUILD_S}s, $(( IMAGE_BYTES / 1000000 )) MB"
mkdir -p "$OUT/redis"
printf 'FROM %s\nRUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*\nWORKDIR /data\n' \
  "$BASE_IMAGE" > "$OUT/redis/Containerfile"
podman build -q -t "$REDIS_IMAGE" "$OUT/redis" >"$OUT/redis-build.log" 2>&1 || { tail -20 "$OUT/redis-build.log"; die "redis image"; }
BUILT+=("$REDIS_IMAGE")

# --- up ------------------------------------------------------------------------------------------------
# The observability services' images cannot be pulled here; their traces go nowhere (exporter off).
services=(redis scheduler kvtransfer prefill-0 decode-0 router)
{
  echo "services:"
  for s in scheduler kvtransfer prefill-0 decode-0 router; do
    printf '  %s:\n    environment:\n      OTEL_TRACES_EXPORTER: "none"\n' "$s"
  done
  # podman 4.3's local volume driver takes tmpfs `size=` for a quota option and fails: no size here
  printf 'volumes:\n  kv-shm:\n    driver: local\n    driver_opts:\n      type: tmpfs\n      device: tmpfs\n      o: "huge=within_size,mode=1777"\n'
} > "$OUT/smoke-override.yml"
export DUOPOOL_IMAGE=$IMAGE DUOPOOL_REDIS_IMAGE=$REDIS_IMAGE
# Secrets as a deployment would have them (random per run, from the environment, never in a file here)
DUOPOOL_REDIS_PASSWORD=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
DUOPOOL_CLUSTER_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
export DUOPOOL_REDIS_PASSWORD DUOPOOL_CLUSTER_TOKEN
unset DUOPOOL_API_KEYS DUOPOOL_PUBLISH_ADDR
u0=$(date +%s)
log "compose up: ${services[*]}"
"${COMPOSE[@]}" up -d --no-build "${services[@]}" >"$OUT/up.log" 2>&1 || { tail -40 "$OUT/up.log"; die "compose up"; }
ctr() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1; }
# podman-compose on podman < 4.6 starts dependencies without waiting for `service_healthy`, and podman's own
# healthcheck timers need systemd: run each container's healthcheck here until all pass.
deadline=$(( $(date +%s) + 900 ))
for s in "${services[@]}"; do
  c=$(ctr "$s"); [ -n "$c" ] || die "no container for $s"
  until podman healthcheck run "$c" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { podman logs --tail 40 "$c"; die "$s never became healthy"; }
    sleep 3
  done
  log "$s healthy ($c)"
done

# --- a prompt, a batch, a killed worker ------------------------------------------------------------------
kill_decode() {
  c=$(ctr decode-0)
  pid=$(podman inspect -f '{{.State.Pid}}' "$c")
  log "kill -9 of decode-0's process (host pid $pid) while the batch runs"
  kill -9 "$pid"
}
export -f kill_decode ctr log
export PROJECT T0
"$ROOT/.venv/bin/python" - "$OUT" "$u0" <<'EOF'
import json, subprocess, sys, time
import openai

out, up0 = sys.argv[1], float(sys.argv[2])
client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", max_retries=0, timeout=120)
deadline = time.time() + 300
while True:  # the router is healthy; the first answer also needs both vLLM engines placed
    try:
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        break
    except (openai.APIError, IndexError) as e:
        if time.time() > deadline:
            raise SystemExit(f"no answer through the router: {e}")
        time.sleep(2)
first_answer_s = time.time() - up0
answer = r.choices[0].message.content
print(f"first answer {first_answer_s:.1f} s after compose up: {answer!r} ({r.usage.completion_tokens} tokens)", flush=True)
assert r.usage.completion_tokens > 0 and answer

n = 8
lines = [json.dumps({"custom_id": f"smoke-{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": model, "max_tokens": 48, "temperature": 0,
                              "messages": [{"role": "user", "content": f"Count to {i + 3}."}]}}) for i in range(n)]
f = client.files.create(file=("smoke.jsonl", "\n".join(lines).encode()), purpose="batch")
b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
while client.batches.retrieve(b.id).status in ("validating",):
    time.sleep(0.2)
subprocess.run(["bash", "-c", "kill_decode"], check=True)
restart_t0 = time.time()
restarted_s = None
deadline = time.time() + 600
while True:
    b = client.batches.retrieve(b.id)
    if restarted_s is None:
        c = subprocess.run(["bash", "-c", "ctr decode-0"], capture_output=True, text=True).stdout.strip()
        st = json.loads(subprocess.run(["podman", "inspect", c], capture_output=True, text=True).stdout)[0]
        if st.get("RestartCount", 0) >= 1 and st["State"]["Running"]:
            restarted_s = time.time() - restart_t0
            print(f"decode-0 restarted by its restart policy after {restarted_s:.1f} s "
                  f"(RestartCount {st['RestartCount']})", flush=True)
    if b.status in ("completed", "failed", "cancelled", "expired"):
        break
    if time.time() > deadline:
        raise SystemExit(f"batch {b.id} not done: {b.status} {b.request_counts}")
    time.sleep(1)
assert restarted_s is not None, "the killed worker was not restarted"
assert b.status == "completed", (b.status, b.errors)
rows = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines() if x.strip()]
ids = sorted(r["custom_id"] for r in rows)
assert ids == sorted(f"smoke-{i}" for i in range(n)), f"not every request exactly once: {ids}"
assert all(r["response"]["status_code"] == 200 for r in rows), rows
tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in rows)
print(f"batch {b.id}: {b.request_counts.completed}/{n} completed, {b.request_counts.failed} failed, "
      f"every custom_id exactly once, {tokens} tokens", flush=True)
json.dump({"first_answer_s": round(first_answer_s, 1), "answer": answer, "batch_requests": n,
           "batch_completed": b.request_counts.completed, "batch_failed": b.request_counts.failed,
           "batch_tokens": tokens, "worker_restart_s": round(restarted_s, 1)},
          open(f"{out}/client.json", "w"))
EOF
"$ROOT/.venv/bin/python" - "$OUT" "$BUILD_S" "$IMAGE_BYTES" "$BASE_IMAGE" <<'EOF'
import json, sys
out, build_s, size, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
res = {"engine": "vllm (CPU, SmolLM2-135M)", "base_image": base, "build_s": build_s, "image_mb": round(size / 1e6),
       **json.load(open(f"{out}/client.json"))}
json.dump(res, open(f"{out}/compose_smoke.json", "w"), indent=2)
print("compose smoke:", json.dumps(res))
EOF
log "passed"
