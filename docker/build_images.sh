#!/bin/bash
# `make images`: build the cxr-screen serving and jobs images where no image registry is reachable,
# then prove the serving image starts TorchServe on a tiny model store and answers /ping.
#
#   docker/build_images.sh                 # base image, serving + jobs images, smoke test
#   IMAGES=serving docker/build_images.sh  # only the serving image (and its smoke test)
#
# Steps:
#  1. Docker: use $DOCKER_HOST / the default socket when a daemon answers; otherwise start Debian's
#     dockerd as root on a private socket and data root under $WORK, without iptables or a bridge
#     (builds and the smoke test use --network=host). `apt-get install docker.io debootstrap` first
#     when they are missing.
#  2. Base image: no registry, so `debootstrap` Debian 12 (bookworm, minbase) and `docker import`
#     it as $BASE_IMAGE, once.
#  3. `docker build --network=host` each image from a context that holds only what the
#     Dockerfiles copy (not .venv or the data).
#  4. Smoke test: a model store with config/config.properties and model-store/cxr-screen.mar
#     (a stub handler archived with the image's own torch-model-archiver); (A) TorchServe from the
#     image on it must answer GET /ping (with the inference token from its key_file.json; token
#     authorization stays on) with "Healthy"; (B) the image's entrypoint (TorchServe +
#     `python -m serving.front`) must answer /ping and the front's /v2/health/live (B is skipped,
#     with a warning, while serving/front.py does not exist yet).
#
# Environment: IMAGE_TAG (default: the chart's appVersion), IMAGES ("serving jobs"), BASE_IMAGE,
# WORK (/tmp/cxr-docker), DEBIAN_MIRROR, SMOKE_PORT_BASE (18000), BUILD_CA_BUNDLE (default
# $PIP_CERT or $SSL_CERT_FILE: a CA bundle for pip inside the build), KEEP_DOCKERD=1 to leave a
# daemon this script started running.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-/tmp/cxr-docker}
IMAGES=${IMAGES:-"serving jobs"}
BASE_IMAGE=${BASE_IMAGE:-cxr-screen/debian:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SMOKE_PORT_BASE=${SMOKE_PORT_BASE:-18000}
IMAGE_TAG=${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/cxr-screen/Chart.yaml")}
STARTED_DOCKERD=""
SMOKE_CONTAINER="cxr-serving-smoke-$$"

log() { printf '[images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

cleanup() {
  local status=$?
  if [[ -n "${DOCKER:-}" ]]; then
    "$DOCKER" rm -f "$SMOKE_CONTAINER" >/dev/null 2>&1 || true
  fi
  if [[ -n "$STARTED_DOCKERD" && "${KEEP_DOCKERD:-0}" != 1 ]]; then
    log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
    kill -TERM "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  exit "$status"
}
trap cleanup EXIT

# --- 1. a Docker daemon ----------------------------------------------------------------------

install_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "need root to install ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

pick_client() {
  # Prefer the client that ships with Debian's dockerd (same API version).
  if [[ -x /usr/bin/docker ]]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
  export DOCKER_BUILDKIT=0  # the classic builder: --network=host, no buildx needed
}

ensure_daemon() {
  pick_client
  if [[ -n "${DOCKER_HOST:-}" || -S /var/run/docker.sock ]] && "$DOCKER" info >/dev/null 2>&1; then
    log "using the running Docker daemon (${DOCKER_HOST:-/var/run/docker.sock})"
    return
  fi
  [[ $(id -u) == 0 ]] || die "no Docker daemon answers and starting one needs root"
  mkdir -p "$WORK"
  export DOCKER_HOST="unix://$WORK/docker.sock"
  if "$DOCKER" info >/dev/null 2>&1; then
    log "using the private dockerd at $DOCKER_HOST"
    return
  fi
  local driver
  for driver in overlay2 vfs; do
    log "starting dockerd (storage driver $driver) at $DOCKER_HOST, data root $WORK/data"
    dockerd --host "$DOCKER_HOST" --data-root "$WORK/data" --exec-root "$WORK/exec" \
      --pidfile "$WORK/dockerd.pid" --iptables=false --ip-masq=false --bridge=none \
      --storage-driver "$driver" >"$WORK/dockerd.log" 2>&1 &
    STARTED_DOCKERD=$!
    for _ in $(seq 60); do
      if "$DOCKER" info >/dev/null 2>&1; then log "dockerd is up"; return; fi
      kill -0 "$STARTED_DOCKERD" 2>/dev/null || break
      sleep 1
    done
    log "dockerd with $driver did not come up; last lines of its log:"
    tail -n 15 "$WORK/dockerd.log" >&2 || true
    kill -TERM "$STARTED_DOCKERD" 2>/dev/null || true
    wait "$STARTED_DOCKERD" 2>/dev/null || true
    STARTED_DOCKERD=""
  done
  die "could not start dockerd (see $WORK/dockerd.log)"
}

# --- 2. the base image ---------------------------------------------------------------------

ensure_base_image() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE exists"
    return
  fi
  local rootfs="$WORK/rootfs-bookworm"
  rm -rf "$rootfs"
  log "debootstrap Debian 12 (bookworm, minbase) from $DEBIAN_MIRROR"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_MIRROR%/debian}/debian-security bookworm-security main
EOF
  # Keep images small: no docs, no caches.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-cxr-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
EOF
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  log "docker import -> $BASE_IMAGE"
  tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

# --- 3. the images -------------------------------------------------------------------------

build_context() {
  local context="$WORK/context"
  rm -rf "$context"
  mkdir -p "$context"
  (cd "$ROOT" && tar -c --exclude='__pycache__' --exclude='*.pyc' \
      requirements.txt constraints.txt cxr_core training serving monitoring configs docker \
      charts/__init__.py charts/kube.py charts/secrets.py) |
    tar -x -C "$context"
  # Behind a TLS-inspecting proxy pip in the build needs this host's CA bundle (build stage only).
  local ca=${BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
  if [[ -n "$ca" && -f "$ca" ]]; then
    cp "$ca" "$context/docker/build-ca.pem"
  fi
  echo "$context"
}

build_image() {
  local name=$1 context=$2
  local image="cxr-screen/$name:$IMAGE_TAG"
  log "building $image (docker/$name.Dockerfile); log: $WORK/build-$name.log"
  local started=$SECONDS
  if ! "$DOCKER" build --network=host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      -f "$context/docker/$name.Dockerfile" -t "$image" "$context" >"$WORK/build-$name.log" 2>&1; then
    tail -n 30 "$WORK/build-$name.log" >&2
    die "docker build of $image"
  fi
  log "built $image in $((SECONDS - started)) s, $("$DOCKER" image inspect -f '{{.Size}}' "$image" | awk '{printf "%.2f GB", $1/1e9}')"
}

# --- 4. smoke test of the serving image -----------------------------------------------------

http_get() {  # url [bearer token] -> body on stdout, fails on a non-2xx answer or no answer
  python3 - "$1" "${2:-}" <<'EOF'
import sys, urllib.request
headers = {"Authorization": f"Bearer {sys.argv[2]}"} if sys.argv[2] else {}
try:
    with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=3) as r:
        sys.stdout.write(r.read().decode())
except Exception as error:
    sys.stderr.write(f"{error}\n")
    sys.exit(1)
EOF
}

smoke_test_serving() {
  local image="cxr-screen/serving:$IMAGE_TAG"
  local store="$WORK/smoke-store"
  local ts_port=$((SMOKE_PORT_BASE + 85)) metrics_port=$((SMOKE_PORT_BASE + 82))
  local front_port=$((SMOKE_PORT_BASE + 80))
  rm -rf "$store"
  mkdir -p "$store/config" "$store/model-store" "$store/src"
  cat >"$store/src/stub_handler.py" <<'EOF'
"""Stub handler for the image smoke test: answers every request with its size."""


def handle(data, context):
    if data is None:  # the load-time call
        return None
    return [{"bytes": len(str(row))} for row in data]
EOF
  cat >"$store/config/config.properties" <<EOF
inference_address=http://127.0.0.1:$ts_port
management_address=http://127.0.0.1:$ts_port
metrics_address=http://127.0.0.1:$metrics_port
grpc_inference_port=$((SMOKE_PORT_BASE + 70))
grpc_management_port=$((SMOKE_PORT_BASE + 71))
enable_envvars_config=true
load_models=all
default_workers_per_model=1
EOF
  chmod -R a+rwX "$store"
  log "archiving the stub model with the image's torch-model-archiver"
  "$DOCKER" run --rm --network=none --user 1000:1000 -v "$store:/store" --entrypoint torch-model-archiver \
    "$image" --model-name cxr-screen --version 0.0.0 --handler /store/src/stub_handler.py \
    --export-path /store/model-store --force >/dev/null || die "torch-model-archiver in $image"
  [[ -f "$store/model-store/cxr-screen.mar" ]] || die "no model-store/cxr-screen.mar"

  # A: TorchServe alone on the stub store must answer /ping.
  log "A: TorchServe alone from $image on the stub store (:$ts_port)"
  "$DOCKER" run -d --name "$SMOKE_CONTAINER" --network=host -v "$store:/mnt/models:ro" \
    --entrypoint torchserve "$image" --foreground --ncs \
    --ts-config /mnt/models/config/config.properties --model-store /mnt/models/model-store >/dev/null
  wait_for_ping "$ts_port"
  "$DOCKER" rm -f "$SMOKE_CONTAINER" >/dev/null

  # B: the image's own entrypoint: TorchServe and the KServe front together.
  if ! "$DOCKER" run --rm --network=none --entrypoint python "$image" -c \
      "import importlib.util, sys; sys.exit(importlib.util.find_spec('serving.front') is None)"; then
    log "WARNING: serving/front.py is not in this checkout: the full entrypoint (TorchServe + KServe front) was not started"
    return
  fi
  log "B: $image with its entrypoint (TorchServe :$ts_port, KServe front :$front_port)"
  "$DOCKER" run -d --name "$SMOKE_CONTAINER" --network=host \
    -e CXR_TORCHSERVE_PORT="$ts_port" -e CXR_FRONT_HTTP_PORT="$front_port" \
    -e CXR_API_KEYS="smoke:$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')" \
    -v "$store:/mnt/models:ro" "$image" >/dev/null
  wait_for_ping "$ts_port"
  local front="" i
  for i in $(seq 60); do
    if front=$(http_get "http://127.0.0.1:$front_port/v2/health/live" 2>/dev/null); then break; fi
    [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$SMOKE_CONTAINER") == true ]] || break
    sleep 2
  done
  [[ -n "$front" ]] || { "$DOCKER" logs --tail 40 "$SMOKE_CONTAINER" >&2; die "the KServe front did not answer /v2/health/live on :$front_port"; }
  log "GET front /v2/health/live -> $(tr -d '\n ' <<<"$front")"
}

inference_token() {  # TorchServe's token authorization stays on: read the inference key it wrote
  "$DOCKER" exec "$SMOKE_CONTAINER" cat /home/model-server/key_file.json 2>/dev/null |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["inference"]["key"])' 2>/dev/null || true
}

wait_for_ping() {  # port: poll TorchServe's /ping in $SMOKE_CONTAINER until it says Healthy
  local port=$1 body="" i
  for i in $(seq 120); do
    if body=$(http_get "http://127.0.0.1:$port/ping" "$(inference_token)" 2>/dev/null); then break; fi
    if [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$SMOKE_CONTAINER") != true ]]; then
      "$DOCKER" logs --tail 40 "$SMOKE_CONTAINER" >&2 || true
      die "the serving container exited before /ping answered"
    fi
    sleep 2
  done
  [[ "$body" == *Healthy* ]] || { "$DOCKER" logs --tail 40 "$SMOKE_CONTAINER" >&2; die "/ping did not answer Healthy (got: ${body:-nothing})"; }
  log "GET :$port/ping -> $(tr -d '\n ' <<<"$body")"
}

main() {
  [[ -n "$IMAGE_TAG" ]] || die "could not read appVersion from charts/cxr-screen/Chart.yaml"
  mkdir -p "$WORK"
  install_packages
  ensure_daemon
  ensure_base_image
  local context
  context=$(build_context)
  for name in $IMAGES; do
    build_image "$name" "$context"
  done
  if [[ " $IMAGES " == *" serving "* ]]; then
    smoke_test_serving
  fi
  log "done: $(for name in $IMAGES; do printf 'cxr-screen/%s:%s ' "$name" "$IMAGE_TAG"; done)"
}

main "$@"
