#!/usr/bin/env bash
# CPU instructions per proxied request, counted by valgrind's callgrind: the same on a busy or
# a quiet machine, so a change to the request path can be measured to a fraction of a percent.
#
#   loadtest/callgrind.sh                          # builds the release binary, then measures
#   TOLLGATE_BIN=path/to/tollgate loadtest/callgrind.sh    # measures that binary (no build)
#   N1=2000 N2=12000 CONCURRENCY=1 WORKERS=1 CONFIGS="proxy memory-policy" loadtest/callgrind.sh
#   KEEP=/tmp/cg loadtest/callgrind.sh             # keep the callgrind.out files (callgrind_annotate)
#   CONFIGS="proxy nginx-proxy" loadtest/callgrind.sh   # tollgate and nginx, the same way
#
# For each config the gateway runs twice under `valgrind --tool=callgrind`, once for N1 and
# once for N2 requests (GET /api/v1/users/42 over CONCURRENCY keep-alive connections, each
# answered 200 by the upstream through the gateway), and is stopped with SIGTERM so callgrind
# writes its totals; (Ir(N2) - Ir(N1)) / (N2 - N1) is the cost of one request, start-up,
# warm-up (first connections, lazy initialisation) and shutdown cancelling out.
#
# Configs (next to this script): `proxy` is proxy.toml (plain proxy). `memory-policy` is
# redis-policy.toml with TOLLGATE_REDIS_URL="" (so without Redis: its token bucket, limit never
# reached, lives in the in-memory store); any other name is NAME.toml as it is (a config naming a Redis
# needs one running). `global-eventual` and `global-strict` are those files on the in-memory
# store too (TOLLGATE_REDIS_URL="", so compare them with `memory-policy`), measured with their
# two peers running outside valgrind (instances b and c, gossiping on 7412 and 7413 as the files
# say, so those ports and 7411 must be free); each run waits until the gateway admits before its
# requests are sent, and a few 429s of that wait are all it adds. `nginx-proxy` and `nginx-limit-req` are the reference: nginx in one
# process (`master_process off`, so callgrind sees the process that does the work) proxying
# to the same upstream with keep-alive, as loadtest/run.sh configures it, the second with a
# `limit_req` never reached; EXCLUDE does not apply to them. Listen addresses and the upstream instance are overridden with the
# TOLLGATE_LISTEN / TOLLGATE_ADMIN_LISTEN / TOLLGATE_SERVICE_UPSTREAM_INSTANCES variables, so
# every port is a free one on 127.0.0.1 and the files are used unmodified.
#
# The upstream is a small Python asyncio server (its own process, outside valgrind) answering
# every request as loadtest/run.sh's nginx does: 200, a 34-byte JSON body, keep-alive. The load
# generator is Python too, also outside valgrind (neither is counted).
#
# WORKERS (default 1, as the README's callgrind figures) fixes the proxy worker threads
# (TOLLGATE_WORKERS) and the main runtime's (TOKIO_WORKER_THREADS): with several, which thread
# accepts and how idle threads park depend on how valgrind happens to schedule them. Logging is the default (RUST_LOG unset: info) and no trace
# exporter is configured (OTEL_* unset), as loadtest/run.sh runs the gateway.
#
# EXCLUDE (a regex on function names, default quanta::Clock::new; empty to count everything):
# the inclusive cost of those functions is taken out of each run's total. quanta::Clock::new
# (called once, from metrics-exporter-prometheus at start-up) calibrates the TSC by spinning
# on the wall clock, 5-10 million instructions that vary by a couple of million from run to
# run: it cancels out on average, but left in it makes the per-request figure move by about
# 0.3%; taken out, runs agree within about 0.1%.
set -euo pipefail
# The configs are read next to this script (wherever the directory is moved), the build runs
# at the repository root.
CONFIG_DIR=$(cd "$(dirname "$0")" && pwd)
cd "$CONFIG_DIR/.."
N1=${N1:-2000}
N2=${N2:-12000}
CONCURRENCY=${CONCURRENCY:-1}
WORKERS=${WORKERS:-1}
CONFIGS=${CONFIGS:-proxy memory-policy nginx-proxy nginx-limit-req}
KEEP=${KEEP:-}
EXCLUDE=${EXCLUDE-quanta::Clock::new}
if [ "$N2" -le "$N1" ]; then echo "N2 ($N2) must be larger than N1 ($N1)" >&2; exit 2; fi
for tool in valgrind python3; do
  command -v "$tool" >/dev/null || { echo "$tool not on PATH" >&2; exit 1; }
done

if [ -n "${TOLLGATE_BIN:-}" ]; then
  BIN=$TOLLGATE_BIN
else
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo build --release --bin tollgate >&2
  BIN=${CARGO_TARGET_DIR:-target}/release/tollgate
fi
[ -x "$BIN" ] || { echo "no executable at $BIN" >&2; exit 1; }

WORK=$(mktemp -d)
UPSTREAM_PID=
GATEWAY_PID=
PEER_PIDS=
cleanup() {
  for pid in $GATEWAY_PID $PEER_PIDS $UPSTREAM_PID; do kill "$pid" 2>/dev/null || true; done
  for pid in $GATEWAY_PID $PEER_PIDS $UPSTREAM_PID; do wait "$pid" 2>/dev/null || true; done
  if [ -n "${KEEP_WORK:-}" ]; then echo "work dir $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# free_ports N: N distinct ports free on 127.0.0.1 (bound together, then released).
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait_port PORT PID SECONDS: until something listens on PORT (a process under valgrind
# starts slowly), failing early if PID died.
wait_port() {
  local deadline=$((SECONDS + $3))
  while ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { echo "process $2 exited before listening on $1" >&2; return 1; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "nothing listens on $1 after $3 s" >&2; return 1; }
    sleep 0.1
  done
}

cat >"$WORK/upstream.py" <<'PY'
# The benchmark's upstream: every request answered 200 with a small JSON body, keep-alive.
import asyncio, email.utils, sys

BODY = b'{"id":42,"name":"bench","ok":true}'

def response():
    return (b"HTTP/1.1 200 OK\r\nServer: upstream\r\nDate: " + email.utils.formatdate(usegmt=True).encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(BODY)).encode()
            + b"\r\nConnection: keep-alive\r\n\r\n" + BODY)

class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = self.buffer[:end].decode("latin-1"), self.buffer[end + 4:]
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.transport.write(response())

async def main(port):
    server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()

asyncio.run(main(int(sys.argv[1])))
PY

cat >"$WORK/load.py" <<'PY'
# load.py PORT N CONCURRENCY: N GETs over CONCURRENCY keep-alive connections (each sends its
# share one after another); exits non-zero unless every answer is a 200. N=0 waits instead
# until one request is admitted.
import socket, sys, threading

port, total, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
REQUEST = f"GET /api/v1/users/42 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
failures = []
WAIT_FOR_ADMISSION = total == 0

def read_response(sock, buf):
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = buf[:end].decode("latin-1").split("\r\n")
    status, rest = int(lines[0].split()[1]), buf[end + 4:]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            while b"\r\n" not in rest:
                rest += sock.recv(65536)
            size_end = rest.index(b"\r\n")
            size = int(rest[:size_end].split(b";")[0], 16)
            while len(rest) < size_end + 2 + size + 2:
                rest += sock.recv(65536)
            rest = rest[size_end + 2 + size + 2:]
            if size == 0:
                return status, rest  # no trailers expected
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        rest += chunk
    return status, rest[length:]

def client(count):
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for _ in range(count):
            sock.sendall(REQUEST)
            status, buf = read_response(sock, buf)
            if status != 200:
                failures.append(status)
        sock.close()
    except Exception as error:
        failures.append(repr(error))

if WAIT_FOR_ADMISSION:
    # N=0: wait (up to 120 s) until one request is admitted, as a global gateway does once its
    # peers have told it their counts.
    import time
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(REQUEST)
            status, _ = read_response(sock, b"")
            sock.close()
            if status == 200:
                sys.exit(0)
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("the gateway never admitted a request")

shares = [total // conns + (1 if i < total % conns else 0) for i in range(conns)]
threads = [threading.Thread(target=client, args=(n,)) for n in shares]
for t in threads: t.start()
for t in threads: t.join()
if failures:
    print(f"{len(failures)} failures, e.g. {failures[:3]}", file=sys.stderr)
    sys.exit(1)
PY

cat >"$WORK/ir.py" <<'PY'
# ir.py EXCLUDE FILE: the total Ir of a callgrind out file (its summary line) less the
# inclusive Ir of every call to a function whose name fully matches the regex EXCLUDE
# (nothing if EXCLUDE is empty). A call's inclusive cost is the cost line after its calls=.
import re, sys
exclude = re.compile(sys.argv[1]) if sys.argv[1] else None
names, total, excluded, counting, cost_next = {}, None, 0, False, False
for line in open(sys.argv[2]):
    if cost_next:
        cost_next = False
        if counting:
            excluded += int(line.split()[-1])
    elif line.startswith(("fn=", "cfn=")):
        key, _, rest = line.rstrip("\n").partition("=")
        ident, _, name = rest.partition(" ")
        if name:
            names[ident] = name
        if key == "cfn":
            counting = bool(exclude and exclude.fullmatch(names.get(ident, "")))
    elif line.startswith("calls="):
        cost_next = True
    elif line.startswith("summary:"):
        total = int(line.split()[1])
if total is None:
    sys.exit(f"no summary line in {sys.argv[2]}")
if exclude and not excluded:
    print(f"warning: no call to a function matching {sys.argv[1]} in {sys.argv[2]}", file=sys.stderr)
print(total - excluded, total, excluded)
PY

# Every port at once, so none is handed out twice (the peers' too).
read -r UPSTREAM_PORT LISTEN_PORT ADMIN_PORT PEER_B_PROXY PEER_B_ADMIN PEER_C_PROXY PEER_C_ADMIN < <(free_ports 7)
python3 "$WORK/upstream.py" "$UPSTREAM_PORT" & UPSTREAM_PID=$!
wait_port "$UPSTREAM_PORT" "$UPSTREAM_PID" 10

# nginx_conf NAME: writes $WORK/NAME/nginx.conf, nginx as the reference proxy to the same
# upstream, in one process (no master: callgrind follows one process, and a worker is where
# nginx's per-request work happens), keep-alive to the upstream as run.sh configures it;
# NAME nginx-limit-req adds a limit_req never reached.
nginx_conf() {
  local dir=$WORK/$1 limit=
  [ "$1" = nginx-limit-req ] && limit='limit_req zone=bench burst=100000000 nodelay;'
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  # nginx closes a client connection after 1,000 requests and an upstream one likewise by
  # default; tollgate recycles neither, so neither does nginx here.
  keepalive_requests 100000000;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  upstream backend { server 127.0.0.1:$UPSTREAM_PORT; keepalive 128; keepalive_requests 100000000; }
  limit_req_zone \$binary_remote_addr zone=bench:10m rate=100000000r/s;
  server {
    listen 127.0.0.1:$LISTEN_PORT;
    location / { $limit proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
}

# measure NAME N EXCLUDE COMMAND...: IR = total Ir (less EXCLUDE's) of COMMAND run under
# callgrind serving N requests on LISTEN_PORT. (Not a $(...) subshell: the EXIT trap must see
# GATEWAY_PID.)
measure() {
  local name=$1 n=$2 exclude=$3 out
  IR=
  shift 3
  out="$WORK/callgrind.out.$name.$n"
  # --trace-children: the tollgate command starts with `env`, which execs the gateway; without
  # it valgrind lets the exec run uninstrumented and writes an empty file.
  valgrind --tool=callgrind --vgdb=no --trace-children=yes --callgrind-out-file="$out" "$@" \
    >"$WORK/gateway.$name.$n.log" 2>&1 &
  GATEWAY_PID=$!
  if ! wait_port "$LISTEN_PORT" "$GATEWAY_PID" 180 ||
    { [ -n "$PEER_PIDS" ] && ! python3 "$WORK/load.py" "$LISTEN_PORT" 0 1; } ||
    ! python3 "$WORK/load.py" "$LISTEN_PORT" "$n" "$CONCURRENCY"; then
    echo "run $name/$n failed; its log:" >&2
    tail -20 "$WORK/gateway.$name.$n.log" "$WORK/$name/error.log" 2>/dev/null >&2
    return 1
  fi
  kill -TERM "$GATEWAY_PID"
  wait "$GATEWAY_PID" || { echo "$name/$n exited with $?:" >&2; tail -20 "$WORK/gateway.$name.$n.log" >&2; return 1; }
  GATEWAY_PID=
  IR=$(python3 "$WORK/ir.py" "$exclude" "$out")
  # The proxy worker threads' inclusive cost (their thread body is inlined from workers.rs
  # into std's thread start): the request path alone, without what other threads do on a
  # clock (gossip ticks, health checks), which valgrind's slowness puts on more requests.
  WORKER_IR=$({ callgrind_annotate --auto=no --inclusive=yes --threshold=100 "$out" 2>/dev/null || true; } |
    awk '/http\/workers\.rs:std::sys::backtrace::__rust_begin_short_backtrace/ {gsub(",", "", $1); sum += $1} END {print sum + 0}')
  if [ -n "$KEEP" ]; then mkdir -p "$KEEP"; cp "$out" "$KEEP/"; fi
}

# start_peers FILE: the two peers of a global config, outside valgrind: instances b and c of the
# same file (the policies and peer list they compare by digest agree by construction).
start_peers() {
  local instance proxy admin gossip
  for instance in b c; do
    if [ "$instance" = b ]; then
      proxy=$PEER_B_PROXY admin=$PEER_B_ADMIN gossip=7412
    else
      proxy=$PEER_C_PROXY admin=$PEER_C_ADMIN gossip=7413
    fi
    env -u RUST_LOG TOLLGATE_INSTANCE=$instance TOLLGATE_LISTEN="127.0.0.1:$proxy" \
      TOLLGATE_ADMIN_LISTEN="127.0.0.1:$admin" TOLLGATE_GOSSIP_LISTEN="127.0.0.1:$gossip" \
      TOLLGATE_REDIS_URL= TOLLGATE_GOSSIP_CERTS="$WORK/certs" \
      TOLLGATE_SERVICE_UPSTREAM_INSTANCES="http://127.0.0.1:$UPSTREAM_PORT" \
      "$BIN" gateway --config "$1" >"$WORK/peer-$instance.log" 2>&1 &
    PEER_PIDS="$PEER_PIDS $!"
    wait_port "$proxy" "$!" 30
  done
}
stop_peers() {
  for pid in $PEER_PIDS; do kill "$pid" 2>/dev/null || true; done
  for pid in $PEER_PIDS; do wait "$pid" 2>/dev/null || true; done
  PEER_PIDS=
}

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if ! git diff --quiet HEAD 2>/dev/null; then COMMIT="$COMMIT+uncommitted"; fi
echo "commit $COMMIT: instructions per proxied request (callgrind Ir${EXCLUDE:+ less $EXCLUDE}; (Ir(N2) - Ir(N1)) / (N2 - N1), N1=$N1 N2=$N2, $CONCURRENCY connection(s), $WORKERS worker thread(s))"
printf '%-16s %-22s %s\n' config instructions/request "proxy worker threads"
for config in $CONFIGS; do
  cmd=()
  exclude=$EXCLUDE
  case $config in
    nginx-proxy | nginx-limit-req)
      command -v nginx >/dev/null || { echo "nginx not on PATH" >&2; exit 1; }
      nginx_conf "$config"
      cmd=(nginx -c "$WORK/$config/nginx.conf" -p "$WORK/$config")
      exclude= ;;
    *)
      extra=()
      case $config in
        memory-policy) file=$CONFIG_DIR/redis-policy.toml; extra=(TOLLGATE_REDIS_URL=) ;;
        global-*)
          file=$CONFIG_DIR/$config.toml
          [ -f "$file" ] || { echo "no config $file" >&2; exit 1; }
          [ -d "$WORK/certs" ] || "$BIN" certs --out "$WORK/certs" --gateways bench/a,bench/b,bench/c >/dev/null
          extra=(TOLLGATE_REDIS_URL= TOLLGATE_GOSSIP_CERTS="$WORK/certs")
          start_peers "$file" ;;
        *) file=$CONFIG_DIR/$config.toml ;;
      esac
      [ -f "$file" ] || { echo "no config $file" >&2; exit 1; }
      cmd=(env -u RUST_LOG -u OTEL_EXPORTER_OTLP_ENDPOINT -u OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
        TOKIO_WORKER_THREADS="$WORKERS" TOLLGATE_WORKERS="$WORKERS"
        TOLLGATE_LISTEN="127.0.0.1:$LISTEN_PORT" TOLLGATE_ADMIN_LISTEN="127.0.0.1:$ADMIN_PORT"
        TOLLGATE_SERVICE_UPSTREAM_INSTANCES="http://127.0.0.1:$UPSTREAM_PORT" "${extra[@]}"
        "$BIN" gateway --config "$file") ;;
  esac
  measure "$config" "$N1" "$exclude" "${cmd[@]}"; read -r ir1 total1 excluded1 <<<"$IR"; worker1=$WORKER_IR
  measure "$config" "$N2" "$exclude" "${cmd[@]}"; read -r ir2 total2 excluded2 <<<"$IR"; worker2=$WORKER_IR
  stop_peers
  echo "$config $N1 $total1 $excluded1 $N2 $total2 $excluded2" >>"$WORK/raw"
  python3 -c 'import sys
n1, i1, n2, i2, w1, w2 = map(int, sys.argv[1:7])
workers = f"{(w2 - w1) / (n2 - n1):.0f}" if w2 else "-"
print(f"{sys.argv[7]:<16} {(i2 - i1) / (n2 - n1):<22.0f} {workers}")' \
    "$N1" "$ir1" "$N2" "$ir2" "$worker1" "$worker2" "$config"
done
# The raw figures, on stderr: total Ir per run and what EXCLUDE took out of it.
awk -v pattern="$EXCLUDE" '{printf "%-16s N=%s Ir %s (excluded %s), N=%s Ir %s (excluded %s)\n", $1, $2, $3, $4, $5, $6, $7}
  END {if (pattern != "") print "(excluded: the inclusive cost of " pattern ", a start-up calibration that spins on the wall clock)"}' "$WORK/raw" >&2
