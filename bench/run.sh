#!/usr/bin/env bash
# Throughput and latency of tollgate against nginx and a direct upstream, on this machine.
#
#   bench/run.sh            # ROUNDS=2 DURATION=10s CONNECTIONS=64 by default
#
# Starts a static upstream (nginx returning a small JSON body) on 127.0.0.1:9001, nginx as a
# reverse proxy (:8091) and as proxy + limit_req (:8092, never rejecting), Redis on :6379,
# and tollgate on :8090 with each bench/*.toml in turn; runs `wrk -t1 -cN` against each,
# alternating targets over several rounds; prints req/s, latency percentiles, CPU seconds per
# 10,000 requests and RSS of the process under test; writes bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need redis-server; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq wrk nginx-light redis-server >/dev/null
fi
cargo build --release --bin tollgate

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  return 1
}

cat >"$WORK/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:9001; keepalive 128; }
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=100000000r/s;
  server {
    listen 127.0.0.1:9001;
    default_type application/json;
    location / { return 200 '{"id":42,"name":"bench","ok":true}'; }
  }
  server {
    listen 127.0.0.1:8091;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:8092;
    location / {
      limit_req zone=bench burst=100000000 nodelay;
      proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
    }
  }
}
NGINX
# Two nginx instances would share a master; one master with one worker serves the upstream
# and both proxies, so nginx-as-proxy competes with its own upstream exactly as tollgate does.
nginx -c "$WORK/nginx.conf" -p "$WORK" & PIDS+=($!)
wait_port 9001; wait_port 8091
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis-server --port 6379 --bind 127.0.0.1 --save '' --appendonly no >/dev/null & PIDS+=($!)
  wait_port 6379
fi
nginx_worker() { pgrep -P "$(cat "$WORK/nginx.pid")" | head -1; }

# cpu_ticks PID: utime+stime in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

results="$WORK/results.tsv"
: >"$results"
run_target() { # name url pid
  local name=$1 url=$2 pid=$3 before after
  before=$(cpu_ticks "$pid")
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$url" >"$WORK/wrk.out"
  after=$(cpu_ticks "$pid")
  python3 - "$name" "$((after - before))" "$(rss_kib "$pid")" "$(getconf CLK_TCK)" "$WORK/wrk.out" >>"$results" <<'PY'
import re, sys
name, ticks, rss, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = open(sys.argv[5]).read()
def ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
total = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print("\t".join(map(str, [name, rps, ms(lat["50"]), ms(lat["99"]), ticks / hz / total * 10000, rss / 1024, non2xx.group(1) if non2xx else 0])))
PY
}

start_tollgate() { # config
  RUST_LOG=warn target/release/tollgate gateway --config "$1" >"$WORK/tollgate.log" 2>&1 &
  TOLLGATE_PID=$!
  PIDS+=($TOLLGATE_PID)
  wait_port 8090
}
stop_tollgate() { kill "$TOLLGATE_PID"; wait "$TOLLGATE_PID" 2>/dev/null || true; }

for round in $(seq 1 "$ROUNDS"); do
  echo "round $round/$ROUNDS" >&2
  run_target "upstream direct" http://127.0.0.1:9001/api/v1/users/42 "$(nginx_worker)"
  run_target "nginx proxy" http://127.0.0.1:8091/api/v1/users/42 "$(nginx_worker)"
  run_target "nginx + limit_req" http://127.0.0.1:8092/api/v1/users/42 "$(nginx_worker)"
  for config in proxy redis-policy reject; do
    start_tollgate "bench/$config.toml"
    run_target "tollgate $config.toml" http://127.0.0.1:8090/api/v1/users/42 "$TOLLGATE_PID"
    stop_tollgate
  done
done

python3 - "$results" "$ROUNDS" "$DURATION" "$CONNECTIONS" <<'PY' | tee bench/RESULTS.md
import sys, statistics, platform, subprocess, datetime, os
path, rounds, duration, conns = sys.argv[1:5]
rows = {}
for line in open(path):
    name, *vals = line.rstrip("\n").split("\t")
    rows.setdefault(name, []).append([float(v) for v in vals])
def med(name, i): return statistics.median(r[i] for r in rows[name])
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
print(f"# Benchmark results\n")
print(f"{datetime.date.today()} on {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}.")
print(f"`wrk -t1 -c{conns} -d{duration}`, {rounds} rounds alternating targets, medians shown. Upstream: nginx")
print(f"returning a 35-byte JSON body. CPU and RSS are the process under test (the nginx worker for")
print(f"nginx rows: it also serves the upstream). Reproduce with `bench/run.sh`.\n")
print("| target | req/s | p50 ms | p99 ms | CPU s / 10k req | RSS MiB | non-2xx |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in rows:
    print(f"| {name} | {med(name,0):,.0f} | {med(name,1):.2f} | {med(name,2):.2f} | {med(name,3):.3f} | {med(name,4):.1f} | {med(name,5):,.0f} |")
def ratio(a, b): return med(a, 0) / med(b, 0)
print()
print(f"- tollgate proxy / nginx proxy: {ratio('tollgate proxy.toml','nginx proxy'):.2f}x")
print(f"- tollgate Redis policy / nginx + limit_req: {ratio('tollgate redis-policy.toml','nginx + limit_req'):.2f}x")
print(f"- tollgate 429 path / tollgate admit path (Redis policy): {ratio('tollgate reject.toml','tollgate redis-policy.toml'):.2f}x")
print(f"- added p50 / p99 of the Redis policy over the plain proxy: {med('tollgate redis-policy.toml',1)-med('tollgate proxy.toml',1):.2f} / {med('tollgate redis-policy.toml',2)-med('tollgate proxy.toml',2):.2f} ms")
PY
