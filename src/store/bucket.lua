-- tollgate token buckets in Redis: GCRA exactly as `decide` and `refund` in
-- src/limit/bucket.rs, for several buckets at once, atomically (a script runs alone).
--
-- KEYS     the bucket keys (`batch`: kinds, so a key may repeat with another spec). In Redis
--          Cluster all keys of one call must share a hash slot; the Rust caller groups keys by
--          hash tag so they do (`batch` is used only on a single server).
-- ARGV[1]  "acquire", "batch" or "refund".
--
-- acquire  one request. ARGV[2..]: three integers per key, in KEYS order: interval_us, burst,
--          cost. Decides every bucket against Redis TIME (one clock for every gateway) and
--          writes the new TATs only if ALL buckets admit: all or nothing.
-- batch    several requests (the single-server store's group commit). KEYS lists each bucket
--          kind (a key with its spec) once; ARGV[2..] are two integers per kind, in KEYS order:
--          interval_us, burst; then the number of requests; then per request its number of
--          buckets m and m times kind (an index into KEYS) and cost. The requests are decided
--          in argument order at one Redis TIME, each all or nothing exactly as `acquire`, each
--          seeing the draws of the requests before it; every changed key is written once at
--          the end. So each request gets what `acquire` would answer if the requests ran one
--          after another at that TIME, and the keys end as they would then.
-- refund   gives `cost` tokens back to every bucket, never beyond full (used by the cluster
--          store when buckets in another slot rejected the request). Arguments as `acquire`.
--
-- State    one integer per key, the TAT in microseconds. A key expires when its bucket is full
--          again (PX = ceil((tat - now) / 1000) + 1 ms, never more than one full refill + 1 ms):
--          an absent key is a full bucket, so expiry loses nothing and no key is immortal.
--
-- Reply    4 integers per bucket, in argument order: admitted (0/1), remaining, next_token_us,
--          retry_after_us (-1: never, cost > burst). When a request is not admitted as a whole,
--          buckets that had room report admitted = 1 with their untouched level. `batch`
--          replies Redis TIME in microseconds first (the `now` of every decision in it).
--
-- Numbers  Lua 5.1 numbers are doubles: integers are exact only below 2^53 (~9.007e15). TIME in
--          microseconds is ~1.8e15 today. The Rust caller rejects burst, interval_us and
--          burst * interval_us above 2^52 and clamps cost to burst + 1, so every value computed
--          here (at most now + 2^52 + interval_us) stays exact until about the year 2100. A
--          batch does not change this: a TAT carried from one request to the next is one this
--          script would have written and read back, so it is within the same bound.
--          Integer division is floor plus a correction step so it equals Rust's `/` and `%`,
--          and numbers are written with %.0f (tostring would print 1.77e+15 and lose digits).

local EXACT = 9007199254740992 -- 2^53

local BAD_ARGS = 'ERR tollgate bucket.lua: want ARGV mode, then interval_us, burst, cost per key '
  .. '(batch: interval_us, burst per key, then count, then per request m and m times kind, cost)'

local mode = ARGV[1]
if mode ~= 'acquire' and mode ~= 'batch' and mode ~= 'refund' then
  return redis.error_reply(BAD_ARGS)
end

-- Redis < 5 replicates scripts verbatim, which forbids writes after TIME; this switches to
-- replicating the writes. Newer servers always do so (and deprecate the call).
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- floor(a / b) and a % b for integers 0 <= a, 1 <= b below 2^53, exactly.
local function idiv(a, b)
  local q = math.floor(a / b)
  while q * b > a do
    q = q - 1
  end
  while (q + 1) * b <= a do
    q = q + 1
  end
  return q, a - q * b
end

-- (remaining, next_token_us) of a bucket at `tat`, as `level` in bucket.rs.
local function level(burst, interval, tat)
  local used = tat - now
  if used < 0 then
    used = 0
  end
  local free = burst * interval - used
  if free < 0 then
    free = 0
  end
  local remaining, rest = idiv(free, interval)
  if remaining >= burst then
    return remaining, 0
  end
  return remaining, interval - rest
end

-- An integer argument, or nil when it is not a whole number in [min, 2^53).
local function int_arg(i, min)
  local v = tonumber(ARGV[i])
  if v == nil or v ~= v or v < min or v >= EXACT or v ~= math.floor(v) then
    return nil
  end
  return v
end

-- The buckets as parallel arrays (no table per bucket: a batch holds hundreds): each kind's
-- key, interval and burst; each bucket's kind and cost; each request's first and last bucket.
local kkey, kint, kburst = {}, {}, {}
local bkind, bcost = {}, {}
local rfirst, rlast = {}, {}
local nkinds, nbuckets, nrequests = #KEYS, 0, 0
local nargs = #ARGV

-- One kind per key from ARGV[at..]: its interval_us and burst, every `stride` arguments.
local function read_kinds(at, stride)
  for k = 1, nkinds do
    local base = at + stride * (k - 1)
    local interval, burst = int_arg(base, 1), int_arg(base + 1, 0)
    if interval == nil or burst == nil then
      return false
    end
    kkey[k], kint[k], kburst[k] = KEYS[k], interval, burst
  end
  return true
end

if mode == 'batch' then
  if not read_kinds(2, 2) then
    return redis.error_reply(BAD_ARGS)
  end
  local at = 2 + 2 * nkinds
  local count = int_arg(at, 0)
  if count == nil then
    return redis.error_reply(BAD_ARGS)
  end
  at = at + 1
  for q = 1, count do
    local m = int_arg(at, 0)
    if m == nil or at + 2 * m > nargs then
      return redis.error_reply(BAD_ARGS)
    end
    rfirst[q] = nbuckets + 1
    for j = 1, m do
      local k, cost = int_arg(at + 2 * j - 1, 1), int_arg(at + 2 * j, 0)
      if k == nil or k > nkinds or cost == nil then
        return redis.error_reply(BAD_ARGS)
      end
      nbuckets = nbuckets + 1
      bkind[nbuckets], bcost[nbuckets] = k, cost
    end
    rlast[q] = nbuckets
    at = at + 1 + 2 * m
  end
  nrequests = count
  if at ~= nargs + 1 then
    return redis.error_reply(BAD_ARGS)
  end
else
  if nargs ~= 1 + 3 * nkinds or not read_kinds(2, 3) then
    return redis.error_reply(BAD_ARGS)
  end
  for k = 1, nkinds do
    local cost = int_arg(4 + 3 * (k - 1), 0)
    if cost == nil then
      return redis.error_reply(BAD_ARGS)
    end
    bkind[k], bcost[k] = k, cost
  end
  nbuckets, nrequests = nkinds, 1
  rfirst[1], rlast[1] = 1, nkinds
end

-- The stored TAT, 0 (full) when absent. Anything that is not a sane integer (written by
-- something else) counts as a full bucket rather than blocking the key forever.
local function stored(key)
  local v = tonumber(redis.call('GET', key))
  if v == nil or v ~= v or v < 0 or v >= EXACT then
    return 0
  end
  return math.floor(v)
end

local function store(key, tat)
  if tat > now then
    local ms, rest = idiv(tat - now, 1000)
    if rest > 0 then
      ms = ms + 1
    end
    redis.call('SET', key, string.format('%.0f', tat), 'PX', string.format('%.0f', ms + 1))
  else
    redis.call('DEL', key)
  end
end

-- Each key's TAT after the decisions made so far (read from Redis once, on first use), and
-- the keys to write at the end, in first-change order. Writing once per key gives the state
-- one write per decision would leave: only the last TAT survives, and a TAT at or before
-- `now` (deleted) reads back as a full bucket, which `math.max(tat, now)` treats alike.
local tats, changed, is_changed = {}, {}, {}
local function tat_of(key)
  local v = tats[key]
  if v == nil then
    v = stored(key)
    tats[key] = v
  end
  return v
end
local function set_tat(key, tat)
  if not is_changed[key] then
    is_changed[key] = true
    changed[#changed + 1] = key
  end
  tats[key] = tat
end
local function write_changed()
  for i = 1, #changed do
    local key = changed[i]
    store(key, tats[key])
  end
end

local reply = {}

if mode == 'refund' then
  for i = 1, nbuckets do
    local k = bkind[i]
    local key, interval, burst, cost = kkey[k], kint[k], kburst[k], bcost[i]
    local tat = tat_of(key)
    -- refund: tat.saturating_sub(cost * interval).max(now.min(tat))
    local back = tat - cost * interval
    if back < 0 then
      back = 0
    end
    local floor_at = now
    if tat < floor_at then
      floor_at = tat
    end
    if back < floor_at then
      back = floor_at
    end
    set_tat(key, back)
    local remaining, next_us = level(burst, interval, math.max(back, now))
    reply[#reply + 1] = 1
    reply[#reply + 1] = remaining
    reply[#reply + 1] = next_us
    reply[#reply + 1] = 0
  end
  write_changed()
  return reply
end

-- `n` values in `reply` so far; a bucket's 4 start at reply[base + 1].
local n = 0
if mode == 'batch' then
  reply[1] = now
  n = 1
end

-- Each bucket's TAT before its request, for reporting it untouched if the request is refused.
local befores = {}
for q = 1, nrequests do
  local first, last = rfirst[q], rlast[q]
  -- This request's draws: a key listed twice sees its first draw; kept only if all admit.
  -- A one-bucket request (the common case) needs no table: its draw is `single`.
  local draws = nil
  if last > first then
    draws = {}
  end
  local single = nil
  local all = true
  local start = n
  for i = first, last do
    local k = bkind[i]
    local key, interval, burst, cost = kkey[k], kint[k], kburst[k], bcost[i]
    local before = tat_of(key)
    befores[i] = before
    local tat = before
    if draws and draws[key] then
      tat = draws[key]
    end
    if tat < now then
      tat = now
    end
    local capacity = burst * interval
    if cost <= burst and tat + cost * interval - now <= capacity then
      local new_tat = tat + cost * interval
      if draws then
        draws[key] = new_tat
      else
        single = new_tat
      end
      local remaining, next_us = level(burst, interval, new_tat)
      reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4] = 1, remaining, next_us, 0
    else
      all = false
      local remaining, next_us = level(burst, interval, tat)
      local retry = -1
      if cost <= burst then
        retry = tat + cost * interval - now - capacity
      end
      reply[n + 1], reply[n + 2], reply[n + 3], reply[n + 4] = 0, remaining, next_us, retry
    end
    n = n + 4
  end

  if all then
    -- In bucket order, so the set of changed keys has a deterministic order.
    for i = first, last do
      local key = kkey[bkind[i]]
      set_tat(key, draws and draws[key] or single)
    end
  else
    for i = first, last do
      local base = start + 4 * (i - first)
      if reply[base + 1] == 1 then
        -- Had room, but nothing was taken: report the bucket as it is.
        local k = bkind[i]
        local remaining, next_us = level(kburst[k], kint[k], math.max(befores[i], now))
        reply[base + 2], reply[base + 3] = remaining, next_us
      end
    end
  end
end

write_changed()
return reply
