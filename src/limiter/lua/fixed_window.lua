-- fixed_window, the twin of limiter::algorithm::fixed_window.
--
-- KEYS[1]  sluice:{<counter id>}:<window>   (the window is part of the key)
-- ARGV[1]  limit
-- ARGV[2]  period in ms
-- ARGV[3]  now in ms since the epoch (the caller's clock, so every replica agrees)
-- ARGV[4]  hits
-- ARGV[5]  1 to give hits back (is_negative_hits), 0 to take them
--
-- Returns { over (0|1), remaining, reset_ms }.
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local hits = tonumber(ARGV[4])
local window = now - (now % period)
local count
if ARGV[5] == '1' then
  count = tonumber(redis.call('GET', KEYS[1]) or '0') - hits
  if count < 0 then
    count = 0
  end
  if redis.call('EXISTS', KEYS[1]) == 1 then
    -- %.0f: Redis turns Lua numbers into text with %.14g, which is not an integer past 1e14.
    redis.call('SET', KEYS[1], string.format('%.0f', count), 'KEEPTTL')
  end
else
  count = redis.call('INCRBY', KEYS[1], ARGV[4])
  if count == hits then
    -- Created by this call: it lives until its window ends. Relative (PEXPIRE, from the
    -- caller's `now`), so a skew between the caller's and Redis's clocks cannot expire it early.
    redis.call('PEXPIRE', KEYS[1], window + period - now)
  end
end
local over = 0
if count > limit then
  over = 1
end
local remaining = limit - count
if remaining < 0 then
  remaining = 0
end
return { over, remaining, window + period - now }
