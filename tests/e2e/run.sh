#!/usr/bin/env bash
# End-to-end test of docker-compose.multi-region.yml: three regions (two gateway instances in
# us-east), gossip over the `tollgate-wan` network, a partition, a Redis outage, and a trace.
#
#   tests/e2e/run.sh [--keep] [--compiled]
#
# Builds what it needs (cargo build --release; the image from that binary, docker/Dockerfile
# target `prebuilt`; the project's OTLP receiver), brings the stack up, waits for readiness,
# runs the checks (one PASS/FAIL line each, tests/e2e/checks.py) and tears the stack down with
# `down -v`, also on failure, unless --keep. Exits 0 only if every check passed.
#
# --compiled (what CI runs): the user's path instead. A fresh clone of this repository's
# HEAD (uncommitted changes are not in it) is the compose project, and
# `docker-compose -f docker-compose.multi-region.yml up -d --build`, as the README says,
# compiles the image there (docker/Dockerfile's default target, rust:1-bookworm builder)
# with the classic builder; no cargo on the host.
#
# Needs docker, docker-compose (v1) or `docker compose`, python3, and cargo (git with
# --compiled). Where the base images debian:bookworm-slim and redis:7 (and rust:1-bookworm
# with --compiled) are missing and ../shared/offline-images/build.sh exists (the CI machines,
# which cannot pull), that script makes them. Jaeger is not started: the project's own
# OTLP/HTTP receiver (tests/e2e/otlp-receiver) stands in for it.
set -euo pipefail

cd "$(dirname "$0")/../.."
repo=$(pwd)
started=$(date +%s)
keep=0
compiled=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    --compiled) compiled=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "e2e: unknown argument $arg (usage: tests/e2e/run.sh [--keep] [--compiled])" >&2; exit 2 ;;
  esac
done

log() { printf 'e2e: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ------------------------------------------------------------------ prerequisites
tools=(docker python3)
base_images=(debian:bookworm-slim redis:7)
offline_sets=()
if [ "$compiled" -eq 1 ]; then
  tools+=(git)
  base_images+=(rust:1-bookworm)
  offline_sets+=(rust)
else
  tools+=(cargo)
fi
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

missing=()
for image in "${base_images[@]}"; do
  docker image inspect "$image" >/dev/null 2>&1 || missing+=("$image")
done
if [ ${#missing[@]} -gt 0 ]; then
  offline="$repo/../shared/offline-images/build.sh"
  if [ -f "$offline" ]; then
    log "missing ${missing[*]}: building local stand-ins with $offline ${offline_sets[*]}"
    bash "$offline" "${offline_sets[@]}" >/dev/null || die "$offline failed"
    for image in "${missing[@]}"; do
      docker image inspect "$image" >/dev/null 2>&1 || die "$offline did not make $image"
    done
  else
    log "missing ${missing[*]} and no $offline to build them: trying docker pull"
    for image in "${missing[@]}"; do
      docker pull -q "$image" >/dev/null || die "cannot get $image (no registry, no offline-images/build.sh)"
    done
  fi
fi

if command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  die "neither docker-compose nor 'docker compose' is installed"
fi
# The compose project: this checkout, or with --compiled a fresh clone of its HEAD (made
# below), whose directory is the build context and holds the mounted regions/.
project=$repo
if [ "$compiled" -eq 1 ]; then
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-e2e-clone.XXXXXX")
  project=$scratch/tollgate
fi
compose=("${compose_cmd[@]}" -p tollgate -f "$project/docker-compose.multi-region.yml"
  -f "$project/tests/e2e/docker-compose.e2e.yml")

# Every process exports its spans to the project's receiver instead of Jaeger.
export TOLLGATE_OTLP_ENDPOINT=http://tollgate-otlp-receiver:4318
export TOLLGATE_IMAGE=tollgate:local
# The classic builder: no BuildKit frontend image to pull, and it stops at --target.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

# Everything but Jaeger (its image is not pulled here; the receiver replaces it).
services=(certs redis-us-east redis-eu-west redis-ap-south redis-services users-1 users-2
  bookings-1 bookings-2 gw-us-east-a gw-us-east-b gw-eu-west gw-ap-south otlp-receiver)

# ------------------------------------------------------------------ build
if [ "$compiled" -eq 1 ]; then
  [ -z "$(git status --porcelain --untracked-files=no)" ] \
    || log "uncommitted changes are not in the clone: the image is built from HEAD"
  git clone --quiet "$repo" "$project"
  log "fresh clone of $(git -C "$project" rev-parse --short HEAD) in $project"
else
  log "cargo build --release"
  cargo build --release --quiet --bin tollgate
  target_dir=${CARGO_TARGET_DIR:-$repo/target}
  mkdir -p docker/prebuilt
  # Stripped: the build context stays small (the release profile keeps line tables).
  strip -o docker/prebuilt/tollgate "$target_dir/release/tollgate" 2>/dev/null \
    || cp "$target_dir/release/tollgate" docker/prebuilt/tollgate
  log "docker build tollgate:local (target prebuilt) and the OTLP receiver"
  docker build -q -f docker/Dockerfile --target prebuilt \
    --build-arg TOLLGATE_BIN=docker/prebuilt/tollgate -t tollgate:local . >/dev/null
  docker build -q -t tollgate-otlp-receiver:e2e tests/e2e/otlp-receiver >/dev/null
fi

# ------------------------------------------------------------------ up, and down on exit
logs_file=${TMPDIR:-/tmp}/tollgate-e2e-logs.txt
teardown() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    "${compose[@]}" logs --no-color >"$logs_file" 2>&1 || true
    log "containers' logs: $logs_file"
  fi
  # A cut-off gateway is reconnected first, so `down` finds the network as it made it.
  docker network connect tollgate-wan tollgate-gw-ap-south >/dev/null 2>&1 || true
  if [ "$keep" -eq 1 ]; then
    log "--keep: the stack stays up; remove it with: ${compose[*]} down -v"
  else
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || log "down -v failed"
  fi
  if [ "$compiled" -eq 1 ]; then rm -rf "$scratch"; fi
  log "finished in $(( $(date +%s) - started ))s"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# Leftovers of an earlier --keep run would hold the containers' names.
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
if [ "$compiled" -eq 1 ]; then
  # The README's command (less Jaeger): compiles the image, then starts the stack.
  log "docker-compose up -d --build (${#services[@]} services; compiles the image)"
  up_started=$(date +%s)
  build_log=${TMPDIR:-/tmp}/tollgate-e2e-build.txt
  "${compose[@]}" up -d --build "${services[@]}" >"$build_log" 2>&1 \
    || { tail -n 40 "$build_log" >&2; die "compose up --build failed (log: $build_log)"; }
  log "compiled and up in $(( $(date +%s) - up_started ))s"
else
  log "docker-compose up (${#services[@]} services)"
  "${compose[@]}" up -d --no-build "${services[@]}" >/dev/null 2>&1 \
    || { "${compose[@]}" up -d --no-build "${services[@]}"; die "compose up failed"; }
fi

# ------------------------------------------------------------------ checks
failed=0
check() {
  # One line per check (checks.py prints it); a failure is counted, the run goes on.
  python3 tests/e2e/checks.py "$@" || failed=$((failed + 1))
}

run_id=$(date +%s)-$$
user="e2e-$run_id"
correlation="e2e-booking-$run_id"

check ready 120
check airline "$user" "$correlation"
check strict-hop "$user" 8
check eventual-hop "$user" 660

docker network disconnect tollgate-wan tollgate-gw-ap-south
check partitioned 30
check partition-serving "$user"
check partition-strict "$user" 8
docker network connect tollgate-wan tollgate-gw-ap-south
check healed 60

docker stop -t 1 tollgate-redis-eu-west >/dev/null
check redis-down "$user" 30
docker start tollgate-redis-eu-west >/dev/null
check redis-back "$user" 30

check trace "$correlation" 30

if [ "$failed" -eq 0 ]; then
  log "every check passed"
else
  log "$failed check(s) failed"
  exit 1
fi
