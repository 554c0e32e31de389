-- RLQS quota shares: the twin of limiter::quota::step (see there for the rules).
-- KEYS[1]  the bucket's demand table (hash: client -> "rate:expires_ms")
-- KEYS[2..] one window per limit on the key (its start is in the key)
-- ARGV[1] now (ms)   ARGV[2] client   ARGV[3] rate (1/1000 per s)   ARGV[4] charge
-- ARGV[5] want       ARGV[6] demand ttl (ms)   ARGV[7] most clients kept
-- then per window: limit, period (ms)
-- Returns { granted, left after the grant, clients counted }.
local now = tonumber(ARGV[1])
local client = ARGV[2]
local rate = tonumber(ARGV[3])
local charge = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local most = tonumber(ARGV[7])

local all = redis.call('HGETALL', KEYS[1])
local others, clients = 0, 0
for i = 1, #all, 2 do
  local r, e = string.match(all[i + 1], '^(%d+):(%d+)$')
  if r == nil or tonumber(e) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= client then
    others = others + tonumber(r)
    clients = clients + 1
  end
end
if clients < most then
  redis.call('HSET', KEYS[1], client, string.format('%d:%d', rate, now + ttl))
  clients = clients + 1
end
redis.call('PEXPIRE', KEYS[1], ttl)
local total = others + rate

local left = -1
for k = 2, #KEYS do
  local limit = tonumber(ARGV[8 + 2 * (k - 2)])
  local used = tonumber(redis.call('GET', KEYS[k]) or '0') + charge
  local l = math.max(limit - used, 0)
  if left < 0 or l < left then left = l end
end
if left < 0 then left = 0 end

local granted = 0
if left > 0 and want > 0 then
  local fair = left
  if total > 0 and rate < total then fair = math.floor(left * rate / total) end
  granted = math.min(math.max(math.min(want, fair), 1), left)
end

if charge + granted > 0 then
  for k = 2, #KEYS do
    local period = tonumber(ARGV[9 + 2 * (k - 2)])
    redis.call('INCRBY', KEYS[k], charge + granted)
    redis.call('PEXPIRE', KEYS[k], period + 1000)
  end
end
return { granted, left - granted, clients }
