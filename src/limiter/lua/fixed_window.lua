-- fixed_window, the twin of limiter::algorithm::fixed_window.
--
-- KEYS[1]  sluice:{<counter id>}:<window>   (the window is part of the key)
-- ARGV[1]  limit
-- ARGV[2]  period in ms
-- ARGV[3]  now in ms since the epoch (the caller's clock, so every replica agrees)
-- ARGV[4]  hits
-- ARGV[5]  1 to give hits back (is_negative_hits), 0 to take them, 2 to charge them (a take:
--          a fixed window counts every hit, over or not)
-- ARGV[6]  (burst, unused here)
-- ARGV[7]  0, or a lease (for a charge: the floor, see below): take up to this many hits at once (limiter::algorithm::
--          fixed_window_lease): at least ARGV[4], at most what is left and at most an
--          eighth of it unless ARGV[4] alone needs more
--
-- Returns { over (0|1), remaining, reset_ms, hits taken }.
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local hits = tonumber(ARGV[4])
local block = tonumber(ARGV[7] or '0')
-- A charge carries, in ARGV[7], the count the caller last saw in this window (a floor): when
-- the key is gone (Redis restarted empty, or evicted it) the count starts from there again.
local floor = 0
if ARGV[5] == '2' then
  floor = block
  block = 0
end
local window = now - (now % period)
local taken = 0
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
  local add = hits
  if block > 0 and hits > 0 then
    local left = limit - tonumber(redis.call('GET', KEYS[1]) or '0')
    if left < 0 then
      left = 0
    end
    if hits <= left then
      add = math.min(math.max(block, hits), left, math.max(hits, math.ceil(left / 8)))
    end
  end
  if floor > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
    add = add + floor
  end
  count = redis.call('INCRBY', KEYS[1], add)
  if count <= limit then
    taken = add
  end
  if count == add then
    -- Created by this call: it lives until its window ends. Relative (PEXPIRE, from the
    -- caller's `now`), so a skew between the caller's and Redis's clocks cannot expire it early;
    -- plus a second, so a key made in the window's last milliseconds is still there for the
    -- calls of that millisecond that come a moment later (the key names its window, so a
    -- later window never reads it).
    redis.call('PEXPIRE', KEYS[1], window + period - now + 1000)
  end
end
local over = 0
-- A check (zero hits) is over when nothing is left.
if count > limit or (ARGV[5] ~= '1' and hits == 0 and count >= limit) then
  over = 1
end
local remaining = limit - count
if remaining < 0 then
  remaining = 0
end
return { over, remaining, window + period - now, taken }
