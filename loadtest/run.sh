#!/usr/bin/env bash
# Throughput and latency of tollgate against nginx and a direct upstream, on this machine.
#
#   loadtest/run.sh            # ROUNDS=2 DURATION=10s CONNECTIONS=64 by default
#   loadtest/run.sh --quick    # smoke test: ROUNDS=1 DURATION=2s, prints only (RESULTS.md kept)
#   CONFIGS="global-eventual global-strict" loadtest/run.sh --quick   # only these tollgate configs
#   INSTALL_OHA=1 loadtest/run.sh   # also install oha for the fixed-rate phase (a long build)
#
# Starts a static upstream (its own nginx instance, one worker, returning a small JSON body)
# on 127.0.0.1:9001 that every target proxies to; two more nginx instances that only proxy to
# it, one worker (:8091 plain, :8092 with limit_req, never rejecting) and two workers (:8095,
# :8096); Redis on :6379; and tollgate on :8090 with each loadtest/*.toml in turn. Runs
# `wrk -t1 -cN` against each, alternating targets over several rounds; prints req/s, latency
# percentiles, CPU seconds per 10,000 requests and RSS of the process under test only (an
# nginx instance's workers, tollgate's process), and Redis's own CPU per 10,000 requests;
# writes loadtest/RESULTS.md (keeping its "Microbenchmarks" section, which `cargo bench`
# numbers are copied into by hand). Instructions per request: loadtest/callgrind.sh.
#
# The global configs are measured with two peer gateways running (started from the same file
# with the instance and ports overridden, on :8093/:8094, admin :9093/:9094, gossip UDP
# :7412/:7413), so the gateway under test gossips with a real three-gateway mesh.
#
# Fixed rate: wrk cannot hold one, so when `oha` is on PATH (INSTALL_OHA=1 installs it with
# cargo) a last phase loads the upstream directly, nginx, and tollgate proxy.toml and
# redis-policy.toml at half of tollgate's measured saturation with `oha -q`, in rounds, and
# prints the p99 each adds.
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    *) echo "usage: loadtest/run.sh [--quick]" >&2; exit 2 ;;
  esac
done
if [ "$QUICK" = 1 ]; then
  ROUNDS=${ROUNDS:-1}
  DURATION=${DURATION:-2s}
  OHA_DURATION=${OHA_DURATION:-2s}
fi
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
OHA_DURATION=${OHA_DURATION:-10s}
CONFIGS=${CONFIGS:-proxy redis-policy redis-no-lease reject global-eventual global-strict}
# A quick run is a smoke test: its numbers must not replace a real run's.
RESULTS=loadtest/RESULTS.md
if [ "$QUICK" = 1 ]; then RESULTS=; fi
BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need redis-server || ! need python3; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq wrk nginx-light redis-server python3 >/dev/null
fi
export PATH="$HOME/.cargo/bin:$PATH"
if [ "${INSTALL_OHA:-0}" = 1 ] && ! need oha; then
  # A big build (about 12 minutes on 2 busy cores); a separate target dir keeps the
  # project's own build cache untouched.
  CARGO_TARGET_DIR="$WORK/oha-target" cargo install oha --locked
  rm -rf "$WORK/oha-target"
fi
cargo build --release --bin tollgate
# Gossip certificates for the global configs: one region, one certificate per gateway.
"$BIN" certs --out "$WORK/certs" --gateways bench/a,bench/b,bench/c >/dev/null

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  return 1
}

# Every process runs alone: the upstream is its own nginx (one worker, never a target's own
# worker), and each nginx under test is a separate instance that only proxies to it, as
# tollgate does. (Before 2026-12-03 one nginx worker served both the upstream and the proxy,
# which let nginx skip a process hop tollgate paid: that setup's ratios were too kind.)
# nginx_instance NAME WORKERS SERVERS: writes $WORK/NAME/nginx.conf and starts it.
nginx_instance() {
  local name=$1 workers=$2 servers=$3
  mkdir -p "$WORK/$name/logs"
  cat >"$WORK/$name/nginx.conf" <<NGINX
daemon off;
worker_processes $workers;
pid $WORK/$name/nginx.pid;
error_log $WORK/$name/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  # nginx closes a client connection after 1,000 requests and an upstream one likewise by
  # default; tollgate recycles neither, so neither does nginx here.
  keepalive_requests 100000000;
  client_body_temp_path $WORK/$name/body;
  proxy_temp_path $WORK/$name/proxy;
  fastcgi_temp_path $WORK/$name/fastcgi;
  uwsgi_temp_path $WORK/$name/uwsgi;
  scgi_temp_path $WORK/$name/scgi;
  upstream backend { server 127.0.0.1:9001; keepalive 128; keepalive_requests 100000000; }
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=100000000r/s;
$servers
}
NGINX
  nginx -c "$WORK/$name/nginx.conf" -p "$WORK/$name" & PIDS+=($!)
}
PROXY='proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";'
nginx_instance upstream 1 '  server {
    listen 127.0.0.1:9001;
    default_type application/json;
    location / { return 200 '"'"'{"id":42,"name":"bench","ok":true}'"'"'; }
  }'
# One worker (as nginx is usually benchmarked against a single-threaded proxy) and two (one
# per core, as tollgate runs one Tokio worker thread per core).
for spec in "nginx1 1 8091 8092" "nginx2 2 8095 8096"; do
  read -r name workers plain limited <<<"$spec"
  nginx_instance "$name" "$workers" "  server { listen 127.0.0.1:$plain; location / { $PROXY } }
  server {
    listen 127.0.0.1:$limited;
    location / { limit_req zone=bench burst=100000000 nodelay; $PROXY }
  }"
done
wait_port 9001; wait_port 8091; wait_port 8092; wait_port 8095; wait_port 8096
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no >/dev/null & PIDS+=($!)
  wait_port 6379
fi
# Redis's own CPU is part of what a Redis policy costs (it shares the cores).
REDIS_PID=$(pgrep -f '^redis-server [^ ]*:6379( |$)' | head -1 || true)
# nginx_workers NAME: the worker processes of that instance (what is measured; the master
# only supervises).
nginx_workers() { pgrep -P "$(cat "$WORK/$1/nginx.pid")" | tr '\n' ' '; }

# http_get PORT PATH: the raw response (no curl on a fresh machine).
http_get() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1"
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$2" >&3
    timeout 2 cat <&3
  ) 2>/dev/null
}

# wrk prints 50/75/90/99% only; this adds p99.9 (microseconds) from the same histogram.
cat >"$WORK/p999.lua" <<'LUA'
done = function(summary, latency, requests)
  io.write(string.format("p99.9 %d\n", latency:percentile(99.9)))
end
LUA

# cpu_ticks PID...: utime+stime in clock ticks, summed over the processes.
cpu_ticks() { local pid sum=0; for pid in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done; echo "$sum"; }
# rss_kib PID...: resident memory, summed over the processes.
rss_kib() { local pid sum=0; for pid in "$@"; do sum=$((sum + $(awk '/VmRSS/ {print $2}' "/proc/$pid/status"))); done; echo "$sum"; }
# redis_ticks: Redis's cpu_ticks (0 if its process is not visible).
redis_ticks() { if [ -n "$REDIS_PID" ]; then cpu_ticks "$REDIS_PID"; else echo 0; fi; }
# peer_ticks: cpu_ticks summed over the running peers (0 without peers).
peer_ticks() {
  local sum=0 pid
  for pid in "${PEER_PIDS[@]}"; do sum=$((sum + $(cpu_ticks "$pid"))); done
  echo "$sum"
}

results="$WORK/results.tsv"
: >"$results"
# run_target NAME URL "PID...": one wrk run; CPU and RSS of the processes under test, and CPU of the peers if any (they
# share the 2 cores: what gossip costs them is part of what a global policy costs).
run_target() {
  local name=$1 url=$2 pid=$3 before after peers_before peers_after redis_before redis_after
  # shellcheck disable=SC2086 # PID... is a list
  before=$(cpu_ticks $pid)
  peers_before=$(peer_ticks)
  redis_before=$(redis_ticks)
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/p999.lua" "$url" >"$WORK/wrk.out"
  # shellcheck disable=SC2086
  after=$(cpu_ticks $pid)
  peers_after=$(peer_ticks)
  redis_after=$(redis_ticks)
  python3 - "$name" "$((after - before))" "$(rss_kib $pid)" "$(getconf CLK_TCK)" "$WORK/wrk.out" \
    "$((peers_after - peers_before))" "$((redis_after - redis_before))" >>"$results" <<'PY'
import re, sys
name, ticks, rss, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = open(sys.argv[5]).read()
peer_ticks = int(sys.argv[6])
redis_ticks = int(sys.argv[7])
def ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
total = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
p999 = int(re.search(r"^p99\.9 (\d+)", out, re.M).group(1)) / 1000
print("\t".join(map(str, [name, rps, ms(lat["50"]), ms(lat["99"]), p999, ticks / hz / total * 10000, rss / 1024, non2xx.group(1) if non2xx else 0, peer_ticks / hz / total * 10000, redis_ticks / hz / total * 10000])))
PY
}

export TOLLGATE_GOSSIP_CERTS="$WORK/certs"
start_tollgate() { # config
  # Default logging (RUST_LOG unset: info), as a user runs it.
  env -u RUST_LOG "$BIN" gateway --config "$1" >"$WORK/tollgate.log" 2>&1 &
  TOLLGATE_PID=$!
  PIDS+=($TOLLGATE_PID)
  wait_port 8090
}
stop_tollgate() { kill "$TOLLGATE_PID"; wait "$TOLLGATE_PID" 2>/dev/null || true; }

# The two peers of a global config: the same file as the gateway under test (so the policies
# and peer list they compare by digest agree), another instance and other ports.
PEER_PIDS=()
start_peers() { # config
  local i instance
  for i in 1 2; do
    instance=$(printf '%s' bc | cut -c"$i")
    TOLLGATE_INSTANCE=$instance TOLLGATE_LISTEN=127.0.0.1:$((8092 + i)) \
      TOLLGATE_ADMIN_LISTEN=127.0.0.1:$((9092 + i)) TOLLGATE_GOSSIP_LISTEN=127.0.0.1:$((7411 + i)) \
      env -u RUST_LOG "$BIN" gateway --config "$1" >"$WORK/peer-$i.log" 2>&1 &
    PEER_PIDS+=($!)
    PIDS+=($!)
  done
  wait_port 8093
  wait_port 8094
}
stop_peers() {
  for pid in "${PEER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PEER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PEER_PIDS=()
}
# A global gateway is measured once both peers are connected and it admits: strict mode
# refuses for one window plus one sub-window after a cold start of the whole deployment.
wait_global() {
  for _ in $(seq 1 300); do
    if http_get 9090 /ready | grep -q '"peers_connected":2' &&
      http_get 8090 /api/v1/users/42 | head -1 | grep -q ' 200 '; then
      return 0
    fi
    sleep 0.1
  done
  echo "the global gateway never admitted with both peers connected:" >&2
  http_get 9090 /ready >&2 || true
  tail -5 "$WORK"/tollgate.log "$WORK"/peer-*.log >&2
  return 1
}

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run_target "upstream direct" http://127.0.0.1:9001/api/v1/users/42 "$(nginx_workers upstream)"
  run_target "nginx proxy" http://127.0.0.1:8091/api/v1/users/42 "$(nginx_workers nginx1)"
  run_target "nginx + limit_req" http://127.0.0.1:8092/api/v1/users/42 "$(nginx_workers nginx1)"
  run_target "nginx proxy, 2 workers" http://127.0.0.1:8095/api/v1/users/42 "$(nginx_workers nginx2)"
  run_target "nginx + limit_req, 2 workers" http://127.0.0.1:8096/api/v1/users/42 "$(nginx_workers nginx2)"
  for config in $CONFIGS; do
    if [[ $config == global-* ]]; then
      start_peers "loadtest/$config.toml"
      start_tollgate "loadtest/$config.toml"
      wait_global
    else
      start_tollgate "loadtest/$config.toml"
    fi
    run_target "tollgate $config.toml" http://127.0.0.1:8090/api/v1/users/42 "$TOLLGATE_PID"
    stop_tollgate
    if [[ $config == global-* ]]; then stop_peers; fi
  done
done

# Fixed rate: the p99 tollgate adds at half of its saturation, with oha holding the rate
# (latency measured from when each request was due, so a stall is not hidden).
fixed="$WORK/fixed.tsv"
: >"$fixed"
run_fixed() { # name url rate
  # One worker thread, like wrk -t1: on 2 cores the load generator must not take both.
  oha --no-tui --output-format json --latency-correction --worker-threads 1 -c "$CONNECTIONS" -q "$3" \
    -z "$OHA_DURATION" "$2" >"$WORK/oha.json"
  python3 - "$1" "$3" "$WORK/oha.json" >>"$fixed" <<'PY'
import json, sys
name, rate, path = sys.argv[1], sys.argv[2], sys.argv[3]
report = json.load(open(path))
pct = report["latencyPercentiles"]
codes = report.get("statusCodeDistribution", {})
ok = sum(v for k, v in codes.items() if k.startswith("2"))
print("\t".join(map(str, [name, rate, report["summary"]["requestsPerSec"],
    pct["p50"] * 1000, pct["p99"] * 1000, pct["p99.9"] * 1000, sum(codes.values()) - ok])))
PY
}
if need oha && grep -q '^tollgate proxy.toml' "$results"; then
  rate=$(awk -F'\t' '$1 == "tollgate proxy.toml" {print $2}' "$results" | sort -n |
    awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%d", m / 2}')
  echo "fixed rate: $rate req/s (half of tollgate proxy.toml's saturation)" >&2
  # Rounds alternate the targets like the saturation runs above (tails on 2 shared cores vary
  # by a factor of two between runs); each gateway is warmed up for a second first, as the
  # long-running nginx is.
  for round in $(seq 1 "$ROUNDS"); do
    echo "fixed-rate round $round/$ROUNDS" >&2
    run_fixed "upstream direct" http://127.0.0.1:9001/api/v1/users/42 "$rate"
    # The reference proxy at the same rate: on 2 cores part of any proxy's tail is the
    # scheduler sharing the cores between the load generator, the proxy and the upstream.
    run_fixed "nginx proxy" http://127.0.0.1:8091/api/v1/users/42 "$rate"
    for config in proxy redis-policy; do
      start_tollgate "loadtest/$config.toml"
      wrk -t1 -c"$CONNECTIONS" -d1s http://127.0.0.1:8090/api/v1/users/42 >/dev/null
      run_fixed "tollgate $config.toml" http://127.0.0.1:8090/api/v1/users/42 "$rate"
      stop_tollgate
    done
  done
elif ! need oha; then
  echo "oha not on PATH: no fixed-rate phase (INSTALL_OHA=1 installs it)" >&2
fi

python3 - "$results" "$ROUNDS" "$DURATION" "$CONNECTIONS" "$fixed" "$RESULTS" "$OHA_DURATION" <<'PY'
import sys, statistics, platform, subprocess, datetime, os, io
path, rounds, duration, conns, fixed_path, out_path, oha_duration = sys.argv[1:8]
out = io.StringIO()
def emit(*args, **kwargs): print(*args, **kwargs, file=out)
rows = {}
for line in open(path):
    name, *vals = line.rstrip("\n").split("\t")
    rows.setdefault(name, []).append([float(v) for v in vals])
def med(name, i): return statistics.median(r[i] for r in rows[name])
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
emit(f"# Benchmark results\n")
emit(f"{datetime.date.today()} on {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}.")
emit(f"`wrk -t1 -c{conns} -d{duration}`, {rounds} rounds alternating targets, medians shown. Upstream: its own")
emit(f"nginx instance (one worker) returning a 35-byte JSON body, the same for every target. CPU and RSS are")
emit(f"the process under test only: the workers of the nginx instance that proxies (it serves nothing")
emit(f"else), tollgate's process (for global configs the gateway measured, not its two peers).")
emit(f"Reproduce with `loadtest/run.sh`.\n")
emit("| target | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 10k req | RSS MiB | non-2xx | Redis CPU s / 10k req |")
emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name in rows:
    emit(f"| {name} | {med(name,0):,.0f} | {med(name,1):.2f} | {med(name,2):.2f} | {med(name,3):.2f} | {med(name,4):.3f} | {med(name,5):.1f} | {med(name,6):,.0f} | {med(name,8):.3f} |")
emit()
def ratio_line(text, a, b):
    if a in rows and b in rows:
        emit(f"- {text}: {med(a, 0) / med(b, 0):.2f}x")
ratio_line("tollgate proxy / nginx proxy", "tollgate proxy.toml", "nginx proxy")
ratio_line("tollgate proxy / nginx proxy, 2 workers", "tollgate proxy.toml", "nginx proxy, 2 workers")
ratio_line("tollgate Redis policy / nginx + limit_req", "tollgate redis-policy.toml", "nginx + limit_req")
ratio_line("tollgate Redis policy / nginx + limit_req, 2 workers", "tollgate redis-policy.toml", "nginx + limit_req, 2 workers")
ratio_line("tollgate Redis policy without leases / nginx + limit_req", "tollgate redis-no-lease.toml", "nginx + limit_req")
ratio_line("tollgate global eventual (+ Redis) / nginx + limit_req", "tollgate global-eventual.toml", "nginx + limit_req")
ratio_line("tollgate global strict (+ Redis) / nginx + limit_req", "tollgate global-strict.toml", "nginx + limit_req")
ratio_line("tollgate global eventual / tollgate Redis policy", "tollgate global-eventual.toml", "tollgate redis-policy.toml")
ratio_line("tollgate global strict / tollgate Redis policy", "tollgate global-strict.toml", "tollgate redis-policy.toml")
ratio_line("tollgate 429 path / tollgate admit path (Redis policy)", "tollgate reject.toml", "tollgate redis-policy.toml")
def cpu_line(text, a, b, with_redis=False):
    if a in rows and b in rows:
        emit(f"- CPU per request, {text}: {(med(a, 4) + (med(a, 8) if with_redis else 0)) / med(b, 4):.2f}x")
cpu_line("tollgate proxy / nginx proxy", "tollgate proxy.toml", "nginx proxy")
cpu_line("tollgate proxy / nginx proxy, 2 workers", "tollgate proxy.toml", "nginx proxy, 2 workers")
cpu_line("tollgate Redis policy (+ Redis's CPU) / nginx + limit_req", "tollgate redis-policy.toml", "nginx + limit_req", True)
for name in rows:
    if name.startswith("tollgate global-"):
        emit(f"- {name}: its two peers used {med(name, 7):.3f} CPU s per 10k requests together (gossip)")
if "tollgate redis-policy.toml" in rows and "tollgate proxy.toml" in rows:
    a, b = "tollgate redis-policy.toml", "tollgate proxy.toml"
    emit(f"- added p50 / p99 of the Redis policy over the plain proxy: {med(a,1)-med(b,1):.2f} / {med(a,2)-med(b,2):.2f} ms")
fixed_runs = {}
for line in open(fixed_path):
    name, *vals = line.rstrip("\n").split("\t")
    fixed_runs.setdefault(name, []).append([float(v) for v in vals])
fixed = {name: [statistics.median(run[i] for run in runs) for i in range(len(runs[0]))]
         for name, runs in fixed_runs.items()}
if fixed:
    emit(f"\n## Fixed rate\n")
    emit(f"`oha -q RATE -c{conns} -z{oha_duration} --latency-correction --worker-threads 1`: half of tollgate proxy.toml's")
    emit(f"saturation above, the same rate for every target; {rounds} rounds alternating targets, medians shown.\n")
    emit("| target | rate req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | non-2xx |")
    emit("|---|---:|---:|---:|---:|---:|---:|")
    for name, (rate, rps, p50, p99, p999, bad) in fixed.items():
        emit(f"| {name} | {rate:,.0f} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {p999:.2f} | {bad:,.0f} |")
    if "upstream direct" in fixed and "tollgate proxy.toml" in fixed:
        added = fixed["tollgate proxy.toml"][3] - fixed["upstream direct"][3]
        emit(f"\n- p99 added by tollgate at half of saturation: {added:.2f} ms (target: at most 0.5 ms)")
        if "tollgate redis-policy.toml" in fixed:
            added = fixed["tollgate redis-policy.toml"][3] - fixed["upstream direct"][3]
            emit(f"- p99 added by tollgate with a Redis policy: {added:.2f} ms")
        if "nginx proxy" in fixed:
            nginx_added = fixed["nginx proxy"][3] - fixed["upstream direct"][3]
            emit(f"- p99 added by nginx at the same rate: {nginx_added:.2f} ms")
        for name, runs in fixed_runs.items():
            emit(f"- {name}: p99 per round " + ", ".join(f"{run[3]:.2f}" for run in runs) + " ms")
# Microbenchmark numbers are written by hand from `cargo bench`: keep them across runs.
kept = ""
if out_path and os.path.exists(out_path):
    text = open(out_path).read()
    if "\n## Microbenchmarks" in text:
        kept = text[text.index("\n## Microbenchmarks"):]
report = out.getvalue() + kept
sys.stdout.write(report)
if out_path:
    open(out_path, "w").write(report)
PY
