-- tollgate token buckets in Redis: GCRA exactly as `decide` and `refund` in
-- src/limit/bucket.rs, for several buckets at once, atomically (a script runs alone).
--
-- KEYS     the bucket keys. In Redis Cluster all keys of one call must share a hash slot; the
--          Rust caller groups keys by hash tag so they do.
-- ARGV[1]  "acquire" or "refund".
-- ARGV[2..] three integers per key, in KEYS order: interval_us, burst, cost.
--
-- acquire  decides every bucket against Redis TIME (one clock for every gateway) and writes
--          the new TATs only if ALL buckets admit: all or nothing.
-- refund   gives `cost` tokens back to every bucket, never beyond full (used by the cluster
--          store when buckets in another slot rejected the request).
--
-- State    one integer per key, the TAT in microseconds. A key expires when its bucket is full
--          again (PX = ceil((tat - now) / 1000) + 1 ms, never more than one full refill + 1 ms):
--          an absent key is a full bucket, so expiry loses nothing and no key is immortal.
--
-- Reply    4 integers per key, in KEYS order: admitted (0/1), remaining, next_token_us,
--          retry_after_us (-1: never, cost > burst). When a call is not admitted as a whole,
--          buckets that had room report admitted = 1 with their untouched level.
--
-- Numbers  Lua 5.1 numbers are doubles: integers are exact only below 2^53 (~9.007e15). TIME in
--          microseconds is ~1.8e15 today. The Rust caller rejects burst, interval_us and
--          burst * interval_us above 2^52 and clamps cost to burst + 1, so every value computed
--          here (at most now + 2^52 + interval_us) stays exact until about the year 2100.
--          Integer division is floor plus a correction step so it equals Rust's `/` and `%`,
--          and numbers are written with %.0f (tostring would print 1.77e+15 and lose digits).

local EXACT = 9007199254740992 -- 2^53

local mode = ARGV[1]
local n = #KEYS
if (mode ~= 'acquire' and mode ~= 'refund') or #ARGV ~= 1 + 3 * n then
  return redis.error_reply('ERR tollgate bucket.lua: want ARGV mode, then interval_us, burst, cost per key')
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

local specs = {}
for i = 1, n do
  local base = 1 + 3 * (i - 1)
  local interval, burst, cost = int_arg(base + 1, 1), int_arg(base + 2, 0), int_arg(base + 3, 0)
  if interval == nil or burst == nil or cost == nil then
    return redis.error_reply('ERR tollgate bucket.lua: bad interval_us, burst or cost for key ' .. i)
  end
  specs[i] = { interval = interval, burst = burst, cost = cost }
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

-- TATs decided by this call so far: a key listed twice sees its first draw.
local current = {}
local function tat_of(key)
  local v = current[key]
  if v == nil then
    v = stored(key)
  end
  return v
end

local reply = {}

if mode == 'refund' then
  for i = 1, n do
    local key, s = KEYS[i], specs[i]
    local tat = tat_of(key)
    -- refund: tat.saturating_sub(cost * interval).max(now.min(tat))
    local back = tat - s.cost * s.interval
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
    current[key] = back
    local remaining, next_us = level(s.burst, s.interval, math.max(back, now))
    reply[#reply + 1] = 1
    reply[#reply + 1] = remaining
    reply[#reply + 1] = next_us
    reply[#reply + 1] = 0
  end
  for key, tat in pairs(current) do
    store(key, tat)
  end
  return reply
end

local decisions = {}
local all = true
for i = 1, n do
  local key, s = KEYS[i], specs[i]
  local before = stored(key)
  local tat = current[key]
  if tat == nil then
    tat = before
  end
  tat = math.max(tat, now)
  local capacity = s.burst * s.interval
  local d
  if s.cost <= s.burst and tat + s.cost * s.interval - now <= capacity then
    local new_tat = tat + s.cost * s.interval
    current[key] = new_tat
    local remaining, next_us = level(s.burst, s.interval, new_tat)
    d = { 1, remaining, next_us, 0 }
  else
    all = false
    local remaining, next_us = level(s.burst, s.interval, tat)
    local retry = -1
    if s.cost <= s.burst then
      retry = tat + s.cost * s.interval - now - capacity
    end
    d = { 0, remaining, next_us, retry }
  end
  d.before = before
  decisions[i] = d
end

if all then
  for key, tat in pairs(current) do
    store(key, tat)
  end
end

for i = 1, n do
  local d, s = decisions[i], specs[i]
  if not all and d[1] == 1 then
    -- Had room, but nothing was taken: report the bucket as it is.
    local remaining, next_us = level(s.burst, s.interval, math.max(d.before, now))
    d = { 1, remaining, next_us, 0 }
  end
  reply[#reply + 1] = d[1]
  reply[#reply + 1] = d[2]
  reply[#reply + 1] = d[3]
  reply[#reply + 1] = d[4]
end
return reply
