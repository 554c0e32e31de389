-- sliding_window, the twin of limiter::algorithm::sliding_window.
--
-- KEYS[1]  sluice:{<counter id>}:<window>            this window's admitted hits
-- KEYS[2]  sluice:{<counter id>}:<window - period>   the previous window's
-- ARGV     limit, period ms, now ms, hits, 1 to give hits back / 0 to take them / 2 to charge
--          them (hits admitted elsewhere: counted whatever the estimate says)
--
-- Returns { over (0|1), remaining, reset_ms }. The arithmetic follows the Rust function step
-- by step (same operations in the same order on doubles), so both answer alike.
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local hits = tonumber(ARGV[4])
local window = now - (now % period)
local elapsed = now - window
local curr = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
local weighted = math.ceil(prev * (period - elapsed) / period)
local estimate = weighted + curr
local to_end = window + period - now

if ARGV[5] == '1' then
  curr = curr - hits
  if curr < 0 then
    curr = 0
  end
  if redis.call('EXISTS', KEYS[1]) == 1 then
    -- %.0f: Redis turns Lua numbers into text with %.14g, which is not an integer past 1e14.
    redis.call('SET', KEYS[1], string.format('%.0f', curr), 'KEEPTTL')
  end
  estimate = weighted + curr
  local over = 0
  if estimate > limit then
    over = 1
  end
  local remaining = limit - estimate
  if remaining < 0 then
    remaining = 0
  end
  return { over, remaining, to_end }
end

if ARGV[5] == '2' then
  -- ARGV[7] of a charge: the estimate the caller last saw in this window (a floor). When the
  -- window's key is gone (Redis restarted empty, or evicted it), the count starts from there.
  local floor = tonumber(ARGV[7] or '0')
  local add = hits
  if floor > estimate and redis.call('EXISTS', KEYS[1]) == 0 then
    add = add + floor - estimate
    estimate = floor
  end
  local after = estimate + hits
  if add > 0 then
    redis.call('INCRBY', KEYS[1], string.format('%.0f', add))
    redis.call('PEXPIRE', KEYS[1], window + 2 * period - now)
  end
  local over = 0
  if after > limit then
    over = 1
  end
  local remaining = limit - after
  if remaining < 0 then
    remaining = 0
  end
  return { over, remaining, to_end }
end

local after = estimate + hits
-- A check (zero hits) passes only when one more hit would.
if estimate + math.max(hits, 1) <= limit then
  if hits > 0 then
    redis.call('INCRBY', KEYS[1], ARGV[4])
    -- It still matters as the previous window of the next one.
    redis.call('PEXPIRE', KEYS[1], window + 2 * period - now)
  end
  return { 0, limit - after, to_end }
end

-- Over: the first ms at which the decaying previous window lets the hits pass.
local reset = to_end
local need = limit - curr - math.max(hits, 1)
if need >= 0 and prev > 0 then
  local at = math.ceil(period - need * period / prev)
  if at < 0 then
    at = 0
  end
  if at < period then
    reset = at - elapsed
    if reset < 1 then
      reset = 1
    end
  end
end
local remaining = limit - estimate
if remaining < 0 then
  remaining = 0
end
return { 1, remaining, reset }
