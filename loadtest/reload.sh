#!/usr/bin/env bash
# SIGHUP under load: wrk against one gateway for DURATION seconds while the config file is
# reloaded every second, its policy's `rate` changed every other time and, every INVALID_EVERY
# seconds, replaced by an invalid file (which must keep the running config).
#
#   loadtest/reload.sh                      # DURATION=30 CONNECTIONS=32 INVALID_EVERY=7
#
# Prints wrk's connection errors and responses by status (429 is the policy's own refusal;
# anything else but 200 is a failure), and after each reload the `q` of `RateLimit-Policy`
# next to the one the file asks for. Exits non-zero if any request failed or any `q` was
# wrong. The upstream is `tollgate users` (its `/health`), the store the gateway's memory.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30}
CONNECTIONS=${CONNECTIONS:-32}
INVALID_EVERY=${INVALID_EVERY:-7}
# Two rates the load meets: some requests are refused with 429 under both.
RATES=("10000/1s" "15000/1s")
UPSTREAM=19711 LISTEN=19712 ADMIN=19713
BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 2; }
cargo build --release --bin tollgate

wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2
  return 1
}

config() {
  cat <<EOF
region = "bench"
listen = "127.0.0.1:$LISTEN"
admin_listen = "127.0.0.1:$ADMIN"

[services.users]
routes = ["/"]
instances = ["http://127.0.0.1:$UPSTREAM"]
concurrency_limit = 4096
queue_size = 1024

[policies.per-ip]
routes = ["/"]
key = ["ip"]
rate = "$1"
EOF
}

CONFIG="$WORK/region.toml"
config "${RATES[0]}" >"$CONFIG"
"$BIN" users --listen "127.0.0.1:$UPSTREAM" >"$WORK/users.log" 2>&1 & PIDS+=($!)
"$BIN" gateway --config "$CONFIG" >"$WORK/gateway.log" 2>&1 & PIDS+=($!)
GATEWAY=$!
wait_port "$UPSTREAM"; wait_port "$LISTEN"; wait_port "$ADMIN"

cat >"$WORK/count.lua" <<'EOF'
-- Responses by status, per thread, summed in done().
ok, limited, failed = 0, 0, 0
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status == 200 then ok = ok + 1
  elseif status == 429 then limited = limited + 1
  else failed = failed + 1 end
end
function done(summary, latency, requests)
  local o, l, f = 0, 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok"); l = l + t:get("limited"); f = f + t:get("failed")
  end
  local e = summary.errors
  io.write(string.format("responses: 200=%d 429=%d other=%d\n", o, l, f))
  io.write(string.format("connection errors: connect=%d read=%d write=%d timeout=%d status=%d\n",
    e.connect, e.read, e.write, e.timeout, e.status))
end
EOF

digest() { sha256sum "$CONFIG" | cut -d' ' -f1; }
ready_digest() { curl -s "http://127.0.0.1:$ADMIN/ready" | python3 -c 'import json,sys; print(json.load(sys.stdin)["config_digest"])'; }
policy_q() {
  curl -s -D - -o /dev/null "http://127.0.0.1:$LISTEN/health" | tr -d '\r' |
    sed -n 's/^ratelimit-policy: .*;q=\([0-9]*\);.*/\1/Ip'
}
reloads() {
  curl -s "http://127.0.0.1:$ADMIN/metrics" |
    sed -n "s/^tollgate_config_reloads_total{result=\"$1\"} \([0-9]*\).*/\1/p"
}

wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s "$WORK/count.lua" "http://127.0.0.1:$LISTEN/health" \
  >"$WORK/wrk.txt" 2>&1 &
WRK=$!
WRONG=0 APPLIED=0 INVALID=0
current=${RATES[0]}
for second in $(seq 1 $((DURATION - 1))); do
  sleep 1
  if (( second % INVALID_EVERY == 0 )); then
    printf 'rate = "fast"\n[services\n' >>"$CONFIG"   # two errors: the old config stays
    kind=invalid
  else
    (( second % 2 == 0 )) && current=${RATES[$(( (second / 2) % 2 ))]}
    config "$current" >"$CONFIG"
    kind=valid
  fi
  want_digest=$(digest)
  kill -HUP "$GATEWAY"
  if [ "$kind" = valid ]; then
    for _ in $(seq 1 100); do [ "$(ready_digest)" = "$want_digest" ] && break; sleep 0.01; done
    APPLIED=$((APPLIED + 1))
  else
    sleep 0.2
    INVALID=$((INVALID + 1))
  fi
  q=$(policy_q)
  want=${current%%/*}
  verdict=ok
  if [ "$q" != "$want" ]; then verdict=WRONG; WRONG=$((WRONG + 1)); fi
  printf 'reload %2d (%-7s file, rate %s): q=%s %s\n' "$second" "$kind" "$current" "$q" "$verdict"
done
wait "$WRK"
cat "$WORK/wrk.txt"
echo "reloads counted: applied=$(reloads applied) invalid=$(reloads invalid) (sent: $APPLIED valid, $INVALID invalid)"
if ! kill -0 "$GATEWAY" 2>/dev/null; then echo "the gateway exited" >&2; exit 1; fi
grep -q "other=0$" "$WORK/wrk.txt" && grep -q "connect=0 read=0 write=0 timeout=0" "$WORK/wrk.txt" &&
  [ "$WRONG" = 0 ] && [ "$(reloads applied)" = "$APPLIED" ] && [ "$(reloads invalid)" = "$INVALID" ] ||
  { echo "FAILED: see above; gateway log: $WORK/gateway.log" >&2; tail -20 "$WORK/gateway.log" >&2; exit 1; }
echo "PASS"
