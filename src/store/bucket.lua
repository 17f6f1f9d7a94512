-- tollgate token buckets in Redis: GCRA exactly as `decide` and `refund` in
-- src/limit/bucket.rs, for several buckets at once, atomically (a script runs alone).
--
-- KEYS     the bucket keys. In Redis Cluster all keys of one call must share a hash slot; the
--          Rust caller groups keys by hash tag so they do.
-- ARGV[1]  "acquire", "batch" or "refund".
--
-- acquire  one request. ARGV[2..]: three integers per key, in KEYS order: interval_us, burst,
--          cost. Decides every bucket against Redis TIME (one clock for every gateway) and
--          writes the new TATs only if ALL buckets admit: all or nothing.
-- batch    several requests (the single-server store's group commit). KEYS lists each key
--          once. ARGV[2] is the number of requests, then per request: its number of buckets m,
--          then m times key_index (into KEYS), interval_us, burst, cost. The requests are
--          decided in ARGV order at one Redis TIME, each all or nothing exactly as `acquire`,
--          each seeing the draws of the requests before it; every changed key is written once
--          at the end. So each request gets what `acquire` would answer if the requests ran
--          one after another at that TIME, and the keys end as they would then.
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
  .. '(batch: count, then per request m and m times key_index, interval_us, burst, cost)'

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

-- One bucket of a request from ARGV[i..i+2] (interval_us, burst, cost), or nil if malformed.
local function bucket_at(i, key)
  local interval, burst, cost = int_arg(i, 1), int_arg(i + 1, 0), int_arg(i + 2, 0)
  if key == nil or interval == nil or burst == nil or cost == nil then
    return nil
  end
  return { key = key, interval = interval, burst = burst, cost = cost }
end

-- Every bucket in argument order, and each request as {first, last} bucket index.
local buckets, requests = {}, {}
local nargs = #ARGV
if mode == 'batch' then
  local count = int_arg(2, 0)
  if count == nil then
    return redis.error_reply(BAD_ARGS)
  end
  local at = 3
  for q = 1, count do
    local m = int_arg(at, 0)
    if m == nil or at + 4 * m > nargs then
      return redis.error_reply(BAD_ARGS)
    end
    local first = #buckets + 1
    for j = 0, m - 1 do
      local base = at + 1 + 4 * j
      local k = int_arg(base, 1)
      local b = k and bucket_at(base + 1, KEYS[k])
      if not b then
        return redis.error_reply(BAD_ARGS)
      end
      buckets[#buckets + 1] = b
    end
    requests[q] = { first, #buckets }
    at = at + 1 + 4 * m
  end
  if at ~= nargs + 1 then
    return redis.error_reply(BAD_ARGS)
  end
else
  if nargs ~= 1 + 3 * #KEYS then
    return redis.error_reply(BAD_ARGS)
  end
  for i = 1, #KEYS do
    local b = bucket_at(2 + 3 * (i - 1), KEYS[i])
    if not b then
      return redis.error_reply(BAD_ARGS)
    end
    buckets[i] = b
  end
  requests[1] = { 1, #buckets }
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
  for i = 1, #buckets do
    local b = buckets[i]
    local tat = tat_of(b.key)
    -- refund: tat.saturating_sub(cost * interval).max(now.min(tat))
    local back = tat - b.cost * b.interval
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
    set_tat(b.key, back)
    local remaining, next_us = level(b.burst, b.interval, math.max(back, now))
    reply[#reply + 1] = 1
    reply[#reply + 1] = remaining
    reply[#reply + 1] = next_us
    reply[#reply + 1] = 0
  end
  write_changed()
  return reply
end

if mode == 'batch' then
  reply[1] = now
end

for q = 1, #requests do
  local first, last = requests[q][1], requests[q][2]
  -- This request's draws: a key listed twice sees its first draw; kept only if all admit.
  local draws = {}
  local decisions = {}
  local all = true
  for i = first, last do
    local b = buckets[i]
    local before = tat_of(b.key)
    local tat = draws[b.key]
    if tat == nil then
      tat = before
    end
    tat = math.max(tat, now)
    local capacity = b.burst * b.interval
    local d
    if b.cost <= b.burst and tat + b.cost * b.interval - now <= capacity then
      local new_tat = tat + b.cost * b.interval
      draws[b.key] = new_tat
      local remaining, next_us = level(b.burst, b.interval, new_tat)
      d = { 1, remaining, next_us, 0 }
    else
      all = false
      local remaining, next_us = level(b.burst, b.interval, tat)
      local retry = -1
      if b.cost <= b.burst then
        retry = tat + b.cost * b.interval - now - capacity
      end
      d = { 0, remaining, next_us, retry }
    end
    d.before = before
    decisions[i - first + 1] = d
  end

  if all then
    -- In bucket order, so the set of changed keys has a deterministic order.
    for i = first, last do
      local key = buckets[i].key
      set_tat(key, draws[key])
    end
  end

  for i = first, last do
    local d, b = decisions[i - first + 1], buckets[i]
    if not all and d[1] == 1 then
      -- Had room, but nothing was taken: report the bucket as it is.
      local remaining, next_us = level(b.burst, b.interval, math.max(d.before, now))
      d = { 1, remaining, next_us, 0 }
    end
    reply[#reply + 1] = d[1]
    reply[#reply + 1] = d[2]
    reply[#reply + 1] = d[3]
    reply[#reply + 1] = d[4]
  end
end

write_changed()
return reply
