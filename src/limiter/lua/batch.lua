-- batch: runs many counter calls in one script, each by its algorithm's function above (the
-- four algorithm scripts, each wrapped as `local function name(KEYS, ARGV) ... end`).
--
-- ARGV[1]  the number of calls; then per call:
--          algorithm (1 fixed_window, 2 sliding_window, 3 token_bucket, 4 concurrent), number of keys,
--          limit, period ms, now ms, hits, 0 to take / 1 to give back / 2 to charge
--          (record hits admitted elsewhere, whatever the counter holds), burst, lease block
-- KEYS     every call's keys, in call order
--
-- Returns one { over, remaining, reset_ms[, hits taken[, slots expired]] } per call, in call
-- order.
local algorithms = { fixed_window, sliding_window, token_bucket, concurrent }
local out = {}
local k = 1
local a = 2
for i = 1, tonumber(ARGV[1]) do
  local algorithm = algorithms[tonumber(ARGV[a])]
  local nkeys = tonumber(ARGV[a + 1])
  local keys = {}
  for j = 1, nkeys do
    keys[j] = KEYS[k + j - 1]
  end
  local args = {}
  for j = 1, 7 do
    args[j] = ARGV[a + 1 + j]
  end
  out[i] = algorithm(keys, args)
  k = k + nkeys
  a = a + 9
end
return out
