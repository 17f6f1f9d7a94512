#!/usr/bin/env python3
"""The checks of tests/e2e/run.sh, one per invocation: `checks.py NAME [ARGS...]`.

Each prints exactly one line, `PASS name: ...` or `FAIL name: ...`, and exits 0 or 1. Every
wait polls with a deadline; nothing sleeps to let time pass. Only 127.0.0.1 is contacted:
the published ports of docker-compose.multi-region.yml and the e2e OTLP receiver.

Standard library only (the host's python3).
"""

import http.client
import json
import math
import sys
import time

GATEWAYS = {  # published proxy port -> (admin port, name)
    8081: (9081, "us-east/a"),
    8084: (9084, "us-east/b"),
    8082: (9082, "eu-west/a"),
    8083: (9083, "ap-south/a"),
}
HOP = [8081, 8084, 8082, 8083]  # a client hopping over every published gateway port
ADMIN = [admin for admin, _ in GATEWAYS.values()]
RECEIVER = 14318
FREE = "demo-free-key"
PREMIUM = "demo-premium-key"
FREE_ID = "key:demo-free"
PREMIUM_ID = "key:demo-premium"
STRICT_LIMIT = 10  # bookings-global: 10/10s (regions/*.toml)
EVENTUAL_LIMIT = 600  # reads-global: 600/1m

CONNECTIONS = {}


def request(port, method, path, headers=None, body=None, timeout=5.0):
    """(status, headers dict lower-cased, body bytes); status 0 when nothing answered."""
    headers = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    for attempt in range(2):
        conn = CONNECTIONS.get(port)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            CONNECTIONS[port] = conn
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                payload,
            )
        except (OSError, http.client.HTTPException):
            conn.close()
            CONNECTIONS.pop(port, None)
            if attempt == 1:
                return 0, {}, b""
    return 0, {}, b""


def get_json(port, path):
    status, _, body = request(port, "GET", path)
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def metric(port, line_prefix):
    """The value of the first /metrics sample starting with line_prefix, or None."""
    status, _, body = request(port, "GET", "/metrics")
    if status != 200:
        return None
    for line in body.decode().splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def refused_by(headers):
    """Names of the policies a 429 ran out: those with r=0 in the RateLimit header."""
    out = []
    for item in headers.get("ratelimit", "").split(","):
        item = item.strip()
        if ";r=0;" in item + ";":
            out.append(item.split(";")[0].strip('"'))
    return out


def poll(deadline_s, probe):
    """Calls probe() until it returns (True, detail) or the deadline passes; returns the last
    (ok, detail) and the seconds waited."""
    started = time.monotonic()
    ok, detail = False, "never probed"
    while True:
        ok, detail = probe()
        if ok or time.monotonic() - started > deadline_s:
            return ok, detail, time.monotonic() - started
        time.sleep(0.25)  # polling interval, not a wait for timing


def report(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    sys.exit(0 if ok else 1)


def booking_body(user, n=0):
    return {
        "user": user,
        "flightNumber": f"AR{1100 + n % 900}",
        "origin": "EZE",
        "destination": "MAD",
        "departureTime": "2031-05-01T10:00:00Z",
        "passengers": [
            {"fullName": "Ada Lovelace", "birthDate": "1815-12-10", "passportNumber": "X1234567"}
        ],
    }


def peers_connected(admin):
    status, body = get_json(admin, "/ready")
    if not body or "gossip" not in body:
        return status, None
    return status, body["gossip"]["peers_connected"]


# ------------------------------------------------------------------------------- checks


def check_ready(deadline_s="120"):
    """Every gateway ready (services and Redis), gossiping with the 3 others, and the strict
    policy's shares reclaimed after the cold start (for both demo keys)."""

    def probe():
        for admin, name in GATEWAYS.values():
            status, peers = peers_connected(admin)
            if status != 200 or peers != 3:
                return False, f"{name}: /ready {status}, peers_connected {peers}"
            for key in (FREE_ID, PREMIUM_ID):
                _, body = get_json(admin, f"/limits/bookings-global?key={key}")
                strict = (body or {}).get("tiers", [{}])[0].get("strict") or {}
                if strict.get("share_reclaimed") is not True:
                    return False, f"{name}: bookings-global share not reclaimed yet"
        return True, "4 gateways ready, 3/3 gossip peers each, strict shares reclaimed"

    ok, detail, waited = poll(float(deadline_s), probe)
    report("stack ready", ok, f"{detail} ({waited:.1f}s)")


def check_airline(user, correlation_id):
    """User created through us-east, booked through eu-west, read through ap-south."""
    status, _, body = request(
        8081,
        "POST",
        "/api/v1/users",
        body={"username": user, "password": "correct-horse", "name": "Ada", "lastName": "Lovelace"},
    )
    if status != 201:
        report("airline flow", False, f"create user via us-east (8081): {status} {body[:200]!r}")
    status, _, body = request(
        8082,
        "POST",
        "/api/v1/bookings",
        headers={"x-request-id": correlation_id},
        body=booking_body(user),
    )
    if status != 201:
        report("airline flow", False, f"book via eu-west (8082): {status} {body[:200]!r}")
    booking = json.loads(body)["id"]
    status, _, body = request(8083, "GET", f"/api/v1/bookings?user={user}")
    items = json.loads(body).get("items", []) if status == 200 else []
    found = any(item.get("id") == booking for item in items)
    report(
        "airline flow",
        found,
        f"user {user} created via us-east:8081, booking {booking} via eu-west:8082, "
        f"read via ap-south:8083 ({'found' if found else f'not found: {status}'})",
    )


def hop_bookings(user, api_key, rounds):
    """POSTs bookings round-robin over the four gateway ports. Returns (admitted, statuses
    by port, refusing policies, seconds taken)."""
    by_port = {port: {} for port in HOP}
    refusers = {}
    admitted = 0
    started = time.monotonic()
    for n in range(rounds):
        for port in HOP:
            status, headers, _ = request(
                port,
                "POST",
                "/api/v1/bookings",
                headers={"x-api-key": api_key},
                body=booking_body(user, n),
            )
            by_port[port][status] = by_port[port].get(status, 0) + 1
            if status == 201:
                admitted += 1
            elif status == 429:
                for policy in refused_by(headers):
                    refusers[policy] = refusers.get(policy, 0) + 1
    return admitted, by_port, refusers, time.monotonic() - started


def summary(by_port):
    return " ".join(
        f"{port}=" + "/".join(f"{s}x{c}" for s, c in sorted(st.items())) for port, st in by_port.items()
    )


def check_strict_hop(user, rounds="8"):
    """A client hopping over all four gateways gets at most the strict limit in one window."""
    admitted, by_port, refusers, took = hop_bookings(user, FREE, int(rounds))
    total = int(rounds) * len(HOP)
    unexpected = [s for st in by_port.values() for s in st if s not in (201, 429)]
    ok = (
        1 <= admitted <= STRICT_LIMIT
        and took < 10.0  # all in one 10 s window, so the bound applies to the whole run
        and not unexpected
        and refusers.get("bookings-global", 0) > 0
    )
    report(
        "strict hop (bookings-global, demo-free-key)",
        ok,
        f"{admitted}/{total} POSTs admitted over 8081,8084,8082,8083 in {took:.1f}s "
        f"(limit {STRICT_LIMIT}/10s; refused by {refusers}; {summary(by_port)})",
    )


def check_eventual_hop(user, total="660"):
    """A client hopping over the gateways reading: about the eventual limit admitted.

    demo-premium-key: the free tier's regional per-client limit (20/10s per region) would
    refuse long before 600 reads; the premium tier's (200/10s, burst 200, per region) leaves
    reads-global to decide. us-east's share of the hop is split over its two instances, so
    every region sees about a third of the requests."""
    order = [8081, 8082, 8083, 8084, 8082, 8083]
    total = int(total)
    admitted = 0
    refusers = {}
    other = {}
    started = time.monotonic()
    for n in range(total):
        port = order[n % len(order)]
        status, headers, _ = request(
            port, "GET", f"/api/v1/users/{user}", headers={"x-api-key": PREMIUM}
        )
        if status == 200:
            admitted += 1
        elif status == 429:
            for policy in refused_by(headers):
                refusers[policy] = refusers.get(policy, 0) + 1
        else:
            other[status] = other.get(status, 0) + 1
    took = time.monotonic() - started
    low, high = int(EVENTUAL_LIMIT * 0.9), int(EVENTUAL_LIMIT * 1.1)
    ok = low <= admitted <= high and refusers.get("reads-global", 0) > 0 and not other
    report(
        "eventual hop (reads-global, demo-premium-key)",
        ok,
        f"{admitted}/{total} GETs admitted over 8081,8084,8082,8083 in {took:.1f}s "
        f"(limit {EVENTUAL_LIMIT}/1m, accepted {low}-{high}; refused by {refusers}"
        f"{'; unexpected ' + str(other) if other else ''})",
    )


def check_partitioned(deadline_s="30"):
    """ap-south sees none of its peers, and the others see it gone."""

    def probe():
        _, mine = peers_connected(9083)
        if mine != 0:
            return False, f"ap-south still has {mine} peers connected"
        for admin in (9081, 9082, 9084):
            _, peers = peers_connected(admin)
            if peers != 2:
                return False, f"admin {admin}: {peers} peers connected (expected 2)"
        return True, "ap-south has 0/3 gossip peers, every other gateway 2/3"

    ok, detail, waited = poll(float(deadline_s), probe)
    report("partition: ap-south cut off the wan", ok, f"{detail} ({waited:.1f}s)")


def check_partition_serving(user):
    """Cut off, ap-south still serves under its policies: reads admitted (eventual counts
    locally; the other side does not see them), the regional per-client policy in force."""
    statuses = []
    last_headers = {}
    for _ in range(4):
        status, last_headers, _ = request(
            8083, "GET", f"/api/v1/users/{user}", headers={"x-api-key": FREE}
        )
        statuses.append(status)
    for _ in range(2):
        request(8081, "GET", f"/api/v1/users/{user}", headers={"x-api-key": FREE})
    _, south = get_json(9083, f"/limits/reads-global?key={FREE_ID}")
    _, east = get_json(9081, f"/limits/reads-global?key={FREE_ID}")
    south_merged = south["tiers"][0]["eventual"]["merged"]
    east_merged = east["tiers"][0]["eventual"]["merged"]
    policies = last_headers.get("ratelimit-policy", "")
    ok = (
        statuses == [200] * 4
        and "per-client" in policies
        and "reads-global" in policies
        and south_merged != east_merged
    )
    report(
        "partition: ap-south keeps serving",
        ok,
        f"GET via 8083: {statuses}, policies applied: {policies}; reads-global merged "
        f"ap-south={south_merged} us-east={east_merged} (each counts only its side)",
    )


def check_partition_strict(user, rounds="8"):
    """While cut off, strict totals over every gateway stay within the limit."""
    admitted, by_port, refusers, took = hop_bookings(user, PREMIUM, int(rounds))
    south = by_port[8083]
    unexpected = [s for st in by_port.values() for s in st if s not in (201, 429)]
    ok = admitted <= STRICT_LIMIT and took < 10.0 and not unexpected and sum(south.values()) > 0
    report(
        "partition: strict total within the limit",
        ok,
        f"{admitted} POSTs admitted in total (limit {STRICT_LIMIT}/10s) with ap-south cut off, "
        f"in {took:.1f}s; refused by {refusers}; {summary(by_port)}",
    )


def check_healed(deadline_s="60"):
    """Reconnected: every gateway gossips with 3 peers again and /limits agrees on every
    admin port (the eventual count of reads made on both sides of the cut)."""

    def probe():
        for admin, name in GATEWAYS.values():
            _, peers = peers_connected(admin)
            if peers != 3:
                return False, f"{name}: {peers}/3 peers connected"
        merged = {}
        for admin, name in GATEWAYS.values():
            _, body = get_json(admin, f"/limits/reads-global?key={FREE_ID}")
            merged[name] = body["tiers"][0]["eventual"]["merged"]
            _, strict = get_json(admin, f"/limits/bookings-global?key={PREMIUM_ID}")
            bad = [p["peer"] for p in strict["peers"] if p["status"] != "ok"]
            if bad:
                return False, f"{name}: bookings-global peers not ok: {bad}"
        if len(set(merged.values())) != 1:
            return False, f"reads-global merged differs: {merged}"
        return True, f"4 gateways with 3/3 peers; reads-global merged {merged['us-east/a']} on every admin port"

    ok, detail, waited = poll(float(deadline_s), probe)
    report("heal: /limits converges", ok, f"{detail} ({waited:.1f}s after reconnect)")


def check_redis_down(user, deadline_s="30"):
    """eu-west's Redis is gone: per-client (on_store_error = "local") decides from an
    in-process bucket of the same shape: about its burst admitted, then 429."""

    def probe():
        status, body = get_json(9082, "/ready")
        redis = ((body or {}).get("dependencies") or {}).get("redis", {}).get("status")
        return status == 503 and redis == "down", f"/ready {status}, redis {redis}"

    ok, detail, _ = poll(float(deadline_s), probe)
    if not ok:
        report("redis down: eu-west follows on_store_error=local", False, detail)
    before = metric(9082, 'tollgate_ratelimit_decisions_total{policy="per-client",decision="admitted_local"}') or 0
    statuses = []
    refusers = {}
    started = time.monotonic()
    for _ in range(30):
        status, headers, _ = request(8082, "GET", f"/api/v1/users/{user}", headers={"x-api-key": FREE})
        statuses.append(status)
        if status == 429:
            for policy in refused_by(headers):
                refusers[policy] = refusers.get(policy, 0) + 1
    took = time.monotonic() - started
    after = metric(9082, 'tollgate_ratelimit_decisions_total{policy="per-client",decision="admitted_local"}') or 0
    breaker = metric(9082, 'tollgate_store_breaker_open{store="redis"}')
    admitted = statuses.count(200)
    # The burst (20, less a few that may have gone to Redis before the breaker opened), plus
    # what the free tier refills (2 a second) while the 30 requests take their time.
    refilled = math.ceil(2 * took)
    ok = (
        18 <= admitted <= 22 + refilled
        and statuses.count(429) == 30 - admitted
        and refusers.get("per-client", 0) > 0
        and after - before >= admitted - 3  # the first few may still try Redis
        and breaker == 1
    )
    report(
        "redis down: eu-west follows on_store_error=local",
        ok,
        f"{detail}; 30 GETs via 8082 in {took:.1f} s: {admitted} admitted, {statuses.count(429)} refused by "
        f"{refusers} (free tier burst 20); admitted_local +{after - before:.0f}; "
        f"tollgate_store_breaker_open {breaker}",
    )


def check_redis_back(user, deadline_s="30"):
    """Redis restarted: the breaker closes (one request probes it), /ready is 200 again and
    decisions are Redis's again."""
    admitted_redis = 'tollgate_ratelimit_decisions_total{policy="per-client",decision="admitted"}'
    before = metric(9082, admitted_redis) or 0

    def probe():
        # A request per poll: the open breaker lets one through to Redis every probe interval.
        request(8082, "GET", f"/api/v1/users/{user}")
        status, body = get_json(9082, "/ready")
        redis = ((body or {}).get("dependencies") or {}).get("redis", {}).get("status")
        breaker = metric(9082, 'tollgate_store_breaker_open{store="redis"}')
        return (
            status == 200 and redis == "up" and breaker == 0,
            f"/ready {status}, redis {redis}, tollgate_store_breaker_open {breaker}",
        )

    ok, detail, waited = poll(float(deadline_s), probe)
    after = metric(9082, admitted_redis) or 0
    ok = ok and after > before
    report(
        "redis back: eu-west normal again",
        ok,
        f"{detail}; per-client decided by Redis +{after - before:.0f} ({waited:.1f}s)",
    )


def check_trace(correlation_id, deadline_s="30"):
    """The airline flow's booking is one trace at the receiver: gateway, bookings, users."""

    def probe():
        status, spans = get_json(RECEIVER, "/spans")
        if status != 200 or spans is None:
            return False, f"receiver answered {status}"
        roots = [
            s
            for s in spans
            if s.get("service") == "gateway"
            and s.get("attributes", {}).get("correlation_id") == correlation_id
        ]
        if not roots:
            return False, f"no gateway span with correlation_id {correlation_id} among {len(spans)}"
        trace = roots[0]["trace_id"]
        in_trace = [s for s in spans if s.get("trace_id") == trace]
        services = sorted({s.get("service") for s in in_trace})
        ok = {"gateway", "bookings", "users"} <= set(services)
        return ok, f"trace {trace} ({correlation_id}): {len(in_trace)} spans from {', '.join(services)}"

    ok, detail, waited = poll(float(deadline_s), probe)
    report("trace reaches the receiver", ok, f"{detail} ({waited:.1f}s)")


if __name__ == "__main__":
    name, args = sys.argv[1], sys.argv[2:]
    try:
        globals()["check_" + name.replace("-", "_")](*args)
    except SystemExit:
        raise
    except Exception as error:  # a check that crashes is a failed check, on one line
        print(f"FAIL {name}: {type(error).__name__}: {error}", flush=True)
        sys.exit(1)
