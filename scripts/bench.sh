#!/usr/bin/env bash
# The standard load matrix of sluice, on this machine, over loopback gRPC.
#
# Builds release, starts a private redis-server and three servers on free loopback ports —
# the no-op baseline (`sluice baseline`: same tonic stack, answers OK without any work),
# sluice with the memory store and sluice with Redis — then runs sluice-load against each
# scenario and prints a markdown table: throughput, answers, errors, latency percentiles and
# the ratio of each throughput to the baseline's, then the targets and whether they are met.
# Every process started here is stopped on exit (also on Ctrl-C or an error).
#
# Settings (environment):
#   BENCH_DURATION     length of each run             (default 10s)
#   BENCH_CONCURRENCY  workers of sluice-load (-c)     (default 32)
#   BENCH_CONNECTIONS  HTTP/2 connections              (default 4)
#   BENCH_ROUNDS       interleaved rounds of baseline, memory and redis (default 3)
#   BENCH_SKIP_BUILD   set to use the existing release binaries
#   BENCH_OUT          directory for the JSON reports (default: a temporary one, removed)
#
# 20 runs of 10 s plus a warm-up per server: about 3.5 minutes once the release build is done
# (an incremental release build after a change to sluice takes 2-6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${BENCH_DURATION:-10s}"
CONCURRENCY="${BENCH_CONCURRENCY:-32}"
CONNECTIONS="${BENCH_CONNECTIONS:-4}"
ROUNDS="${BENCH_ROUNDS:-3}"
LIMITS=benches/ghz/limits
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
SLUICE="$TARGET_DIR/release/sluice"
LOAD="$TARGET_DIR/release/sluice-load"

log() { printf '==> %s\n' "$*" >&2; }

for tool in redis-server python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt-get install redis-server python3)" >&2; exit 1; }
done

work="$(mktemp -d)"
out="${BENCH_OUT:-$work/reports}"
mkdir -p "$out"
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A loopback port nothing listens on now; never 6379 (a developer's own Redis).
free_port() {
  python3 - <<'EOF'
import socket
while True:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    if port != 6379:
        print(port)
        break
EOF
}

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "cargo build --release (sluice, sluice-load)"
  cargo build --release --locked --bin sluice --bin sluice-load
fi
"$SLUICE" check "$LIMITS" >/dev/null

redis_port="$(free_port)"
log "redis-server on 127.0.0.1:$redis_port (no persistence)"
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
  --logfile "$work/redis.log" --dir "$work" &
pids+=($!)
redis_pid=$!

baseline_port="$(free_port)"
log "sluice baseline on 127.0.0.1:$baseline_port"
"$SLUICE" baseline --grpc-addr "127.0.0.1:$baseline_port" 2>"$work/baseline.log" &
pids+=($!)
declare -A server_pid=(["$baseline_port"]=$!)

memory_port="$(free_port)"
log "sluice (memory) on 127.0.0.1:$memory_port"
"$SLUICE" serve --grpc-addr "127.0.0.1:$memory_port" --http-addr "127.0.0.1:$(free_port)" \
  --limits-dir "$LIMITS" --backend memory --log warn 2>"$work/memory.log" &
pids+=($!)
server_pid["$memory_port"]=$!

redis_sluice_port="$(free_port)"
log "sluice (redis) on 127.0.0.1:$redis_sluice_port"
SLUICE_REDIS_URL="redis://127.0.0.1:$redis_port" \
  "$SLUICE" serve --grpc-addr "127.0.0.1:$redis_sluice_port" --http-addr "127.0.0.1:$(free_port)" \
  --limits-dir "$LIMITS" --backend redis --log warn 2>"$work/redis-sluice.log" &
pids+=($!)
server_pid["$redis_sluice_port"]=$!

# Ready = one request answered without error (for sluice with Redis: Redis reached too).
wait_ready() {
  local port=$1 name=$2 i
  for i in $(seq 1 150); do
    if "$LOAD" "127.0.0.1:$port" -n 1 -c 1 --domain bench --descriptor 'route=keys,x-api-key=ready' \
      --json 2>/dev/null | grep -q '"error_count":0'; then
      return 0
    fi
    sleep 0.1
  done
  echo "error: $name on $port did not answer within 15 s; its log:" >&2
  cat "$work/$name.log" >&2 || true
  exit 1
}
wait_ready "$baseline_port" baseline
wait_ready "$memory_port" memory
wait_ready "$redis_sluice_port" redis-sluice

# CPU time, in ticks (USER_HZ, 100 per second), used so far by a process, and by the whole
# machine. With them each run reports the server's CPU per request (robust on a busy machine)
# and how much CPU something else used meanwhile (the run's noise).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# run NAME PORT DESCRIPTOR [sluice-load args...]: one measured run, report in $out/NAME.json,
# CPU ticks in $out/NAME.cpu (server, redis-server, whole machine).
run() {
  local name=$1 port=$2 descriptor=$3
  shift 3
  log "$name: $descriptor $*"
  local pid=${server_pid[$port]} s0 r0 b0
  s0=$(cpu_ticks "$pid"); r0=$(cpu_ticks "$redis_pid"); b0=$(busy_ticks)
  "$LOAD" "127.0.0.1:$port" -z "$DURATION" -c "$CONCURRENCY" --connections "$CONNECTIONS" \
    --domain bench --descriptor "$descriptor" --json="$out/$name.json" "$@" >/dev/null
  echo "$(($(cpu_ticks "$pid") - s0)) $(($(cpu_ticks "$redis_pid") - r0)) $(($(busy_ticks) - b0))" >"$out/$name.cpu"
}

# Warm-up: connections, allocator, Redis script cache; not measured.
keys='route=keys,x-api-key=k{rand:1000}'
for port in "$baseline_port" "$memory_port" "$redis_sluice_port"; do
  "$LOAD" "127.0.0.1:$port" -z 2s -c "$CONCURRENCY" --connections "$CONNECTIONS" \
    --domain bench --descriptor "$keys" >/dev/null
done

# The three runs the targets compare, interleaved over several rounds so that a burst of
# other activity on the machine hits all three alike; the table shows each one's median round.
for round in $(seq 1 "$ROUNDS"); do
  run "baseline.$round" "$baseline_port" "$keys"
  run "memory.$round" "$memory_port" "$keys"
  run "redis.$round" "$redis_sluice_port" "$keys"
done
run memory-sliding "$memory_port" 'route=keys-sliding,x-api-key=k{rand:1000}'
run memory-token "$memory_port" 'route=keys-token,x-api-key=k{rand:1000}'
run redis-sliding "$redis_sluice_port" 'route=keys-sliding,x-api-key=k{rand:1000}'
run redis-token "$redis_sluice_port" 'route=keys-token,x-api-key=k{rand:1000}'
run redis-hot "$redis_sluice_port" 'route=hot'
run memory-hot "$memory_port" 'route=hot'

# Latency at half the peak: paced at half of what the unpaced run reached.
half() {
  python3 - "$out" "$1" <<'EOF'
import glob, json, os, statistics, sys
runs = [json.load(open(p))["throughput_rps"] for p in glob.glob(os.path.join(sys.argv[1], sys.argv[2] + ".*.json"))]
print(max(1, int(statistics.median(runs) / 2)))
EOF
}
memory_half="$(half memory)"
run memory-half "$memory_port" "$keys" --rps "$memory_half"
run redis-half "$redis_sluice_port" "$keys" --rps "$(half redis)"
# The transport's own floor at that rate: the no-op baseline paced like memory-half.
run baseline-half "$baseline_port" "$keys" --rps "$memory_half"

# Last, as they leave hundreds of thousands of counters behind in the stores.
run memory-1m "$memory_port" 'route=keys,x-api-key=m{rand:1000000}'
run redis-1m "$redis_sluice_port" 'route=keys,x-api-key=m{rand:1000000}'

python3 - "$out" "$DURATION" "$CONCURRENCY" "$CONNECTIONS" "$ROUNDS" <<'EOF'
import collections, json, os, sys

out, duration, conc, conns, rounds = sys.argv[1:6]
# name.round.json: several rounds of one run; keep the round with the median throughput.
groups = collections.defaultdict(list)
for n in os.listdir(out):
    if n.endswith(".json"):
        x = json.load(open(os.path.join(out, n)))
        server, redis, busy = (int(t) / 100 for t in open(os.path.join(out, n[:-5] + ".cpu")).read().split())
        x["server_us"] = server * 1e6 / max(1, x["requests"])
        x["redis_us"] = redis * 1e6 / max(1, x["requests"])
        # CPUs used by anything but this benchmark's processes during the run.
        x["other_cpus"] = max(0.0, busy - server - redis - (x["client_cpu_s"] or 0)) / x["duration_s"]
        groups[n[:-5].split(".")[0]].append(x)
r = {}
for name, runs in groups.items():
    runs.sort(key=lambda x: x["throughput_rps"])
    r[name] = runs[(len(runs) - 1) // 2]
    r[name]["rounds"] = [x["throughput_rps"] for x in runs]
rows = [
    ("baseline", "no-op RLS", "1000 keys"),
    ("memory", "sluice memory", "1000 keys, fixed_window"),
    ("redis", "sluice redis", "1000 keys, fixed_window"),
    ("memory-sliding", "sluice memory", "1000 keys, sliding_window"),
    ("memory-token", "sluice memory", "1000 keys, token_bucket"),
    ("redis-sliding", "sluice redis", "1000 keys, sliding_window"),
    ("redis-token", "sluice redis", "1000 keys, token_bucket"),
    ("redis-hot", "sluice redis", "1 hot key, over limit"),
    ("memory-hot", "sluice memory", "1 hot key, over limit"),
    ("memory-1m", "sluice memory", "1M values, fixed_window"),
    ("redis-1m", "sluice redis", "1M values, fixed_window"),
    ("memory-half", "sluice memory", "1000 keys, paced at half its peak"),
    ("redis-half", "sluice redis", "1000 keys, paced at half its peak"),
    ("baseline-half", "no-op RLS", "1000 keys, paced like memory-half"),
]
base = r["baseline"]["throughput_rps"]
print(f"sluice-load -z {duration} -c {conc} --connections {conns}, loopback, {os.cpu_count()} CPUs shared by client and servers; "
      f"baseline, memory and redis: median of {rounds} interleaved rounds\n")
print("| scenario | server | workload | req/s | x baseline | OK | OVER_LIMIT | errors | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | server CPU µs/req | other CPUs |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, server, workload in rows:
    x = r.get(name)
    if x is None:
        continue
    l = x["latency_ms"]
    if len(x["rounds"]) > 1:
        workload += " (rounds: " + ", ".join(f"{t:.0f}" for t in x["rounds"]) + " req/s)"
    print(f"| {name} | {server} | {workload} | {x['throughput_rps']:.0f} | {x['throughput_rps'] / base:.2f} "
          f"| {x['ok']} | {x['over_limit']} | {x['error_count']} | {l['p50']:.3f} | {l['p90']:.3f} "
          f"| {l['p99']:.3f} | {l['p99_9']:.3f} | {l['max']:.3f} "
          f"| {x['server_us']:.1f}{' + %.1f redis' % x['redis_us'] if server.endswith('redis') else ''} | {x['other_cpus']:.2f} |")

def verdict(ok):
    return "met" if ok else "MISSED"

mem, red = r["memory"]["throughput_rps"], r["redis"]["throughput_rps"]
errors = sum(x["error_count"] for x in r.values())
print("\n| target | measured | |")
print("|---|---|---|")
print(f"| memory >= 0.85x baseline | {mem / base:.2f}x | {verdict(mem / base >= 0.85)} |")
print(f"| Redis >= 0.5x memory | {red / mem:.2f}x | {verdict(red / mem >= 0.5)} |")
for name in ("memory-half", "redis-half"):
    p99 = r[name]["latency_ms"]["p99"]
    print(f"| p99 < 2 ms at half the peak rate ({name.split('-')[0]}, {r[name]['target_rps']:.0f} req/s) | {p99:.3f} ms | {verdict(p99 < 2.0)} |")
print(f"| zero errors | {errors} | {verdict(errors == 0)} |")
print(f"\n(p99 of the no-op baseline at memory-half's rate: {r['baseline-half']['latency_ms']['p99']:.3f} ms. "
      "server CPU µs/req: CPU time of the sluice process (and of redis-server) per request. "
      "other CPUs: CPU used meanwhile by processes outside this benchmark; above ~0.1 the run was disturbed.)")
EOF
