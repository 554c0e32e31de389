-- concurrent, the twin of limiter::concurrency::concurrent: requests in flight, each holding
-- a slot that is a lease expiring `max_hold` after it was taken.
--
-- KEYS[1]  sluice:{<counter id>}:slots  a sorted set: one member per slot, scored by its
--          expiry (ms since the epoch)
-- KEYS[2]  sluice:{<counter id>}:seq    the last member id handed out
-- ARGV     limit, max_hold ms, now ms, hits, 1 to give slots back / 0 to take them
--
-- Take: drop expired slots, judge `before + max(hits, 1) > limit` (zero hits checks for one),
-- and add `hits` slots whether admitted or not (Envoy gives back rejected requests' slots
-- too), but never more than limit + 10000 in all. Give: drop expired slots, remove the
-- `hits` earliest (never below zero).
-- Returns { over (0|1), remaining, reset_ms (until the earliest slot expires, 0 if none),
--           slots taken or given back, slots expired }.
local limit = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local hits = tonumber(ARGV[4])
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local before = redis.call('ZCARD', KEYS[1])
local over = 0
local moved
local after
if ARGV[5] == '1' then
  moved = math.min(hits, before)
  if moved > 0 then
    redis.call('ZPOPMIN', KEYS[1], moved)
  end
  after = before - moved
else
  if before + math.max(hits, 1) > limit then
    over = 1
  end
  moved = math.min(hits, math.max(limit + 10000 - before, 0))
  if moved > 0 then
    local last = redis.call('INCRBY', KEYS[2], moved)
    local expiry = now + hold
    -- ZADD in chunks: Lua's stack bounds the arguments of one call.
    local i = 1
    while i <= moved do
      local args = {}
      local upto = math.min(i + 499, moved)
      for j = i, upto do
        args[#args + 1] = expiry
        args[#args + 1] = last - moved + j
      end
      redis.call('ZADD', KEYS[1], unpack(args))
      i = upto + 1
    end
    redis.call('PEXPIRE', KEYS[1], hold + 1000)
    redis.call('PEXPIRE', KEYS[2], hold + 1000)
  end
  after = before + moved
end
local remaining = limit - after
if remaining < 0 then
  remaining = 0
end
local reset = 0
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then
  reset = math.max(tonumber(first[2]) - now, 0)
end
return { over, remaining, reset, moved, expired }
