-- token_bucket (GCRA), the twin of limiter::algorithm::token_bucket.
--
-- KEYS[1]  sluice:{<counter id>}:tb   the theoretical arrival time, µs since the epoch
-- ARGV     limit, period ms, now ms, hits, 1 to give hits back / 0 to take them / 2 to charge
--          them (tokens spent elsewhere: spent whatever the bucket holds), burst,
--          0 or a lease: take up to this many tokens at once (limiter::algorithm::
--          token_bucket_lease): at least ARGV[4], at most what the bucket holds and at most
--          an eighth of it unless ARGV[4] alone needs more
--
-- Returns { over (0|1), remaining, reset_ms, tokens taken }. Every value is an integer below 2^53, so
-- these doubles compute exactly what the Rust u64 arithmetic does.
local limit = tonumber(ARGV[1])
local period_ms = tonumber(ARGV[2])
local now_us = tonumber(ARGV[3]) * 1000
local hits = tonumber(ARGV[4])
local burst = tonumber(ARGV[6])
local block = tonumber(ARGV[7] or '0')

local stored = redis.call('GET', KEYS[1])
if stored then
  stored = tonumber(stored)
else
  stored = now_us
end
if limit == 0 then
  return { 1, 0, period_ms, 0 }
end

local interval = math.floor(period_ms * 1000 / limit)
if interval < 1 then
  interval = 1
end
local capacity = burst * interval
local tat = math.max(stored, now_us)
local cost = hits * interval

local function to_ms(us)
  return math.ceil(us / 1000)
end

local function store(value)
  -- %.0f, not tostring: Lua would print large numbers in exponent form and lose digits.
  redis.call('SET', KEYS[1], string.format('%.0f', value))
  -- Once full again the state says nothing a fresh bucket would not. Kept a second longer,
  -- so a bucket a moment from full is still there for the calls that come a moment later
  -- (a full bucket read late answers as a fresh one: tat is at most now).
  redis.call('PEXPIRE', KEYS[1], math.max(to_ms(value) - tonumber(ARGV[3]), 1) + 1000)
end

if ARGV[5] == '1' then
  tat = tat - cost
  if tat < now_us then
    tat = now_us
  end
  store(tat)
  local used = tat - now_us
  return { 0, math.floor(math.max(capacity - used, 0) / interval), to_ms(used), 0 }
end

if ARGV[5] == '2' then
  local next_tat = tat + cost
  store(next_tat)
  local used = next_tat - now_us
  local over = 0
  if used > capacity then
    over = 1
  end
  return { over, math.floor(math.max(capacity - used, 0) / interval), to_ms(used), 0 }
end

if block > 0 and hits > 0 then
  local available = math.floor(math.max(capacity - (tat - now_us), 0) / interval)
  if hits <= available then
    hits = math.min(math.max(block, hits), available, math.max(hits, math.ceil(available / 8)))
    cost = hits * interval
  end
end
local next_tat = tat + cost
-- A check (zero hits) passes only when a whole token is there.
local judged = tat + math.max(hits, 1) * interval
if judged - now_us <= capacity then
  store(next_tat)
  local used = next_tat - now_us
  return { 0, math.floor((capacity - used) / interval), to_ms(used), hits }
end
local used = tat - now_us
return { 1, math.floor(math.max(capacity - used, 0) / interval), to_ms(judged - capacity - now_us), 0 }
