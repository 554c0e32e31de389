#!/usr/bin/env bash
# The standard load matrix of sluice, on this machine, over loopback gRPC, in one run.
#
# Builds release, starts a private redis-server and four servers on free loopback ports:
#   baseline  `sluice baseline`: a no-op RLS on the same tonic stack and settings as
#             `sluice serve` (health, reflection, TCP_NODELAY), answering OK without any work
#   bare      `sluice baseline --plain`: the same no-op RLS on a bare tonic server
#             (`Server::builder()` defaults, no health, no reflection)
#   memory    `sluice serve --backend memory`
#   redis     `sluice serve --backend redis`, against the private redis-server
# all serving benches/ghz/limits/bench.yaml. For each scenario — one hot key and 10 000 keys
# (`k{rand:10000}`), each with fixed_window, sliding_window and token_bucket, and the hot key
# with `lease: auto` (fixed_window and token_bucket) — and each server,
# it runs sluice-load unpaced (the peak), then paced at half that peak (`--rps`), and prints a
# markdown table: throughput, p50/p99/p99.9 at the peak and at half of it, answers, errors,
# server CPU per request; then the throughput ratios memory / baseline, memory / bare and
# Redis / memory, and Redis EVALSHA calls per answered request (CONFIG RESETSTAT before each
# Redis run, INFO commandstats after). Last, one extra Redis run under strace counts the sluice
# process's socket writes per request (to Redis and to its clients); skipped when strace is not
# installed (apt-get install strace) or BENCH_STRACE=0.
# Every process started here is stopped on exit (also on Ctrl-C or an error); everything
# listens on 127.0.0.1 only; every load run is bounded by -z and a timeout.
#
# Settings (environment):
#   BENCH_DURATION     length of each run, e.g. 5s or 1m           (default 5s)
#   BENCH_CONCURRENCY  workers of sluice-load (-c)                  (default 32)
#   BENCH_CONNECTIONS  HTTP/2 connections of sluice-load            (default 4)
#   BENCH_ROUNDS       rounds of the whole matrix; the table shows each row's median round
#                      (by peak throughput)                         (default 1)
#   BENCH_KEYS         distinct keys of the "10 000 keys" scenarios (default 10000)
#   BENCH_STRACE       0 to skip the strace run                     (default 1)
#   BENCH_SCENARIOS    the scenarios to run, space-separated (default all: hot-fixed
#                      hot-sliding hot-token hot-fixed-lease hot-token-lease keys-fixed
#                      keys-sliding keys-token)
#   BENCH_SKIP_BUILD   set to use the existing release binaries
#   BENCH_OUT          directory for the JSON reports and table.md (default: a temporary one,
#                      removed)
#   CARGO_TARGET_DIR   where the release binaries are built / looked up (default target)
#
# With the defaults: 48 runs of 5 s plus warm-ups and the strace run, about 5 minutes once the
# release build is done (an incremental release build takes 2-6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${BENCH_DURATION:-5s}"
CONCURRENCY="${BENCH_CONCURRENCY:-32}"
CONNECTIONS="${BENCH_CONNECTIONS:-4}"
ROUNDS="${BENCH_ROUNDS:-1}"
KEYS="${BENCH_KEYS:-10000}"
STRACE="${BENCH_STRACE:-1}"
LIMITS=benches/ghz/limits
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
SLUICE="$TARGET_DIR/release/sluice"
LOAD="$TARGET_DIR/release/sluice-load"
started=$(date +%s)

log() { printf '==> %s\n' "$*" >&2; }

for tool in redis-server redis-cli python3 timeout; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt-get install redis-server python3 coreutils)" >&2; exit 1; }
done

# BENCH_DURATION in seconds, for the timeout that bounds every load run.
case "$DURATION" in
  *[0-9]s) duration_s=${DURATION%s} ;;
  *[0-9]m) duration_s=$((${DURATION%m} * 60)) ;;
  *) echo "error: BENCH_DURATION must look like 5s or 1m, not '$DURATION'" >&2; exit 2 ;;
esac
[[ "$duration_s" =~ ^[0-9]+$ && "$duration_s" -ge 1 && "$duration_s" -le 600 ]] \
  || { echo "error: BENCH_DURATION must be 1s..10m" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "error: BENCH_ROUNDS must be 1..99" >&2; exit 2; }
[[ "$KEYS" =~ ^[1-9][0-9]*$ ]] || { echo "error: BENCH_KEYS must be a positive integer" >&2; exit 2; }

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
built=$(date +%s)
"$SLUICE" check "$LIMITS" >/dev/null

redis_port="$(free_port)"
log "redis-server on 127.0.0.1:$redis_port (no persistence)"
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
  --logfile "$work/redis.log" --dir "$work" &
pids+=($!)
redis_pid=$!
rcli() { redis-cli -h 127.0.0.1 -p "$redis_port" "$@"; }

servers=(baseline bare memory redis)
declare -A port server_pid
for s in "${servers[@]}"; do port[$s]="$(free_port)"; done

log "sluice baseline on 127.0.0.1:${port[baseline]}"
"$SLUICE" baseline --grpc-addr "127.0.0.1:${port[baseline]}" 2>"$work/server-baseline.log" &
pids+=($!); server_pid[baseline]=$!

log "bare tonic server (sluice baseline --plain) on 127.0.0.1:${port[bare]}"
"$SLUICE" baseline --plain --grpc-addr "127.0.0.1:${port[bare]}" 2>"$work/server-bare.log" &
pids+=($!); server_pid[bare]=$!

log "sluice (memory) on 127.0.0.1:${port[memory]}"
"$SLUICE" serve --grpc-addr "127.0.0.1:${port[memory]}" --http-addr "127.0.0.1:$(free_port)" \
  --limits-dir "$LIMITS" --backend memory --log warn 2>"$work/server-memory.log" &
pids+=($!); server_pid[memory]=$!

log "sluice (redis) on 127.0.0.1:${port[redis]}"
SLUICE_REDIS_URL="redis://127.0.0.1:$redis_port" \
  "$SLUICE" serve --grpc-addr "127.0.0.1:${port[redis]}" --http-addr "127.0.0.1:$(free_port)" \
  --limits-dir "$LIMITS" --backend redis --log warn 2>"$work/server-redis.log" &
pids+=($!); server_pid[redis]=$!

# load PORT DESCRIPTOR [sluice-load args...]: one sluice-load run, killed if it outlives
# BENCH_DURATION by 30 s.
load() {
  local p=$1 descriptor=$2
  shift 2
  timeout --kill-after=5 $((duration_s + 30)) "$LOAD" "127.0.0.1:$p" --domain bench \
    --descriptor "$descriptor" "$@"
}
# The load of the measured runs and warm-ups: BENCH_CONCURRENCY workers on BENCH_CONNECTIONS.
workers=(-c "$CONCURRENCY" --connections "$CONNECTIONS")

# Ready = one request answered without error (for sluice with Redis: Redis reached too).
wait_ready() {
  local s=$1 i
  for i in $(seq 1 150); do
    if load "${port[$s]}" 'route=keys,x-api-key=ready' -n 1 -c 1 --connections 1 --json 2>/dev/null \
      | grep -q '"error_count":0'; then
      return 0
    fi
    sleep 0.1
  done
  echo "error: $s on ${port[$s]} did not answer within 15 s; its log:" >&2
  cat "$work/server-$s.log" >&2 || true
  exit 1
}
for s in "${servers[@]}"; do wait_ready "$s"; done

# CPU time, in ticks (USER_HZ, 100 per second), used so far by a process, and by the whole
# machine: each run reports the server's CPU per request (robust on a busy machine) and how
# much CPU something else used meanwhile (the run's noise).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# Calls of each command Redis counted since the last CONFIG RESETSTAT, as JSON.
redis_calls() {
  rcli INFO commandstats | python3 -c '
import json, re, sys
print(json.dumps({m[1]: int(m[2]) for m in re.finditer(r"^cmdstat_(\S+?):calls=(\d+)", sys.stdin.read(), re.M)}))'
}

# run NAME SERVER DESCRIPTOR [sluice-load args...]: one measured run; report in $out/NAME.json,
# CPU ticks in $out/NAME.cpu (server, redis-server, whole machine), Redis command calls in
# $out/NAME.redis (Redis runs only).
run() {
  local name=$1 s=$2 descriptor=$3
  shift 3
  log "$name: $descriptor $*"
  local s0 r0 b0
  [ "$s" = redis ] && rcli CONFIG RESETSTAT >/dev/null
  s0=$(cpu_ticks "${server_pid[$s]}"); r0=$(cpu_ticks "$redis_pid"); b0=$(busy_ticks)
  load "${port[$s]}" "$descriptor" "${workers[@]}" -z "$DURATION" --json="$out/$name.json" "$@" >/dev/null
  echo "$(($(cpu_ticks "${server_pid[$s]}") - s0)) $(($(cpu_ticks "$redis_pid") - r0)) $(($(busy_ticks) - b0))" >"$out/$name.cpu"
  [ "$s" = redis ] && redis_calls >"$out/$name.redis"
  return 0
}

peak_rps() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["throughput_rps"])' "$1"; }

# Warm-up: connections, allocator, Redis script cache; not measured.
for s in "${servers[@]}"; do
  load "${port[$s]}" "route=keys,x-api-key=w{rand:$KEYS}" "${workers[@]}" -z 2s >/dev/null
done

read -r -a scenarios <<<"${BENCH_SCENARIOS:-hot-fixed hot-sliding hot-token hot-fixed-lease hot-token-lease keys-fixed keys-sliding keys-token}"
declare -A descriptor=(
  [hot-fixed]='route=hot-fixed'
  [hot-sliding]='route=hot-sliding'
  [hot-token]='route=hot-token'
  [hot-fixed-lease]='route=hot-fixed-lease'
  [hot-token-lease]='route=hot-token-lease'
  [keys-fixed]="route=keys,x-api-key=k{rand:$KEYS}"
  [keys-sliding]="route=keys-sliding,x-api-key=k{rand:$KEYS}"
  [keys-token]="route=keys-token,x-api-key=k{rand:$KEYS}"
)

for sc in "${scenarios[@]}"; do
  [ -n "${descriptor[$sc]:-}" ] || { echo "error: unknown scenario '$sc' in BENCH_SCENARIOS" >&2; exit 2; }
done

# The four servers back to back per scenario, so that a burst of other activity on the machine
# hits the runs a ratio compares alike. Each peak run is followed by its half-peak run.
for round in $(seq 1 "$ROUNDS"); do
  for sc in "${scenarios[@]}"; do
    for s in "${servers[@]}"; do
      run "$s.$sc.$round.peak" "$s" "${descriptor[$sc]}"
      half=$(python3 -c 'import sys; print(max(1, int(float(sys.argv[1]) / 2)))' \
        "$(peak_rps "$out/$s.$sc.$round.peak.json")")
      run "$s.$sc.$round.half" "$s" "${descriptor[$sc]}" --rps "$half"
    done
  done
done

# Socket writes of the sluice process per request, with Redis, 10 000 keys, fixed_window,
# unpaced: strace attached to all its threads, each write classified by its file descriptor
# (a connection to Redis, a connection from a client, anything else such as eventfd wake-ups).
# strace slows every system call down, so this run's throughput is well below the peak's.
strace_note="not measured: BENCH_STRACE=0"
if [ "$STRACE" != 0 ] && ! command -v strace >/dev/null; then
  strace_note="not measured: strace is not installed (apt-get install strace)"
elif [ "$STRACE" != 0 ]; then
  log "strace run: sluice (redis), keys-fixed, unpaced"
  rcli CONFIG RESETSTAT >/dev/null
  strace -qq -f -s 0 -e trace=write,writev,sendmsg,sendto -o "$work/strace.txt" \
    -p "${server_pid[redis]}" 2>"$work/strace.err" &
  strace_pid=$!
  pids=("$strace_pid" "${pids[@]}")
  sleep 1
  if kill -0 "$strace_pid" 2>/dev/null; then
    load "${port[redis]}" "${descriptor[keys-fixed]}" "${workers[@]}" -z "$DURATION" \
      --json="$out/strace.json" >/dev/null &
    load_pid=$!
    pids+=("$load_pid")
    # fd -> socket inode of the sluice process and the loopback connections, every 0.5 s
    # while the load runs (the clients' connections close when it ends).
    : >"$work/fds.txt"; : >"$work/tcp.txt"
    while kill -0 "$load_pid" 2>/dev/null; do
      sleep 0.5
      for fd in /proc/"${server_pid[redis]}"/fd/*; do
        printf '%s %s\n' "${fd##*/}" "$(readlink "$fd" 2>/dev/null || true)"
      done >>"$work/fds.txt"
      cat /proc/net/tcp /proc/net/tcp6 >>"$work/tcp.txt" 2>/dev/null || true
    done
    wait "$load_pid"
    redis_calls >"$out/strace.redis"
    kill -INT "$strace_pid" 2>/dev/null || true
    wait "$strace_pid" 2>/dev/null || true
    python3 - "$work" "$out" "$redis_port" "${port[redis]}" <<'EOF'
import collections, json, re, sys
work, out, redis_port, sluice_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
inode_peer = {}
for line in open(f"{work}/tcp.txt"):
    f = line.split()
    if len(f) > 9 and ":" in f[1] and f[0] != "sl":
        local, remote = int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16)
        inode_peer[f[9]] = "redis" if remote == redis_port else "clients" if local == sluice_port else "other"
kind = {}
for line in open(f"{work}/fds.txt"):
    fd, _, target = line.strip().partition(" ")
    m = re.match(r"socket:\[(\d+)\]", target)
    if m and m[1] in inode_peer:
        kind[fd] = inode_peer[m[1]]
    else:
        kind.setdefault(fd, "other")
calls = collections.Counter()
for line in open(f"{work}/strace.txt"):
    m = re.match(r"\d+\s+(write|writev|sendmsg|sendto)\((\d+),", line)
    if m:
        calls[kind.get(m[2], "other")] += 1
load = json.load(open(f"{out}/strace.json"))
json.dump({"writes": calls, "answered": load["ok"] + load["over_limit"],
           "throughput_rps": load["throughput_rps"],
           "evalsha": json.load(open(f"{out}/strace.redis")).get("evalsha", 0)},
          open(f"{out}/strace.writes.json", "w"))
EOF
    strace_note=""
  else
    strace_note="not measured: strace could not attach ($(head -c 200 "$work/strace.err"))"
  fi
fi

finished=$(date +%s)
python3 - "$out" "$DURATION" "$CONCURRENCY" "$CONNECTIONS" "$ROUNDS" "$KEYS" "$strace_note" \
  "$((built - started))" "$((finished - built))" "$(git describe --always --dirty 2>/dev/null || echo unknown)" <<'EOF' | tee "$out/table.md"
import collections, json, os, sys

out, duration, conc, conns, rounds, keys, strace_note, build_s, run_s, rev = sys.argv[1:11]
runs = {}
for n in os.listdir(out):
    if not n.endswith((".peak.json", ".half.json")):
        continue
    base = os.path.join(out, n[:-5])
    x = json.load(open(base + ".json"))
    server, redis, busy = (int(t) / 100 for t in open(base + ".cpu").read().split())
    x["server_us"] = server * 1e6 / max(1, x["requests"])
    x["redis_us"] = redis * 1e6 / max(1, x["requests"])
    # CPUs used by anything but this benchmark's processes during the run.
    x["other_cpus"] = max(0.0, busy - server - redis - (x["client_cpu_s"] or 0)) / x["duration_s"]
    x["answered"] = x["ok"] + x["over_limit"] + x["unknown_code"]
    if os.path.exists(base + ".redis"):
        x["redis_calls"] = json.load(open(base + ".redis"))
        x["evalsha_per_req"] = x["redis_calls"].get("evalsha", 0) / max(1, x["answered"])
    s, sc, rnd, kind = n[:-5].split(".")
    runs[(s, sc, int(rnd), kind)] = x

servers = [("baseline", "sluice baseline"), ("bare", "bare tonic"), ("memory", "sluice memory"), ("redis", "sluice Redis")]
scenarios = [("hot-fixed", "1 hot key, fixed_window"), ("hot-sliding", "1 hot key, sliding_window"),
             ("hot-token", "1 hot key, token_bucket"),
             ("hot-fixed-lease", "1 hot key, fixed_window, lease: auto"),
             ("hot-token-lease", "1 hot key, token_bucket, lease: auto"),
             ("keys-fixed", f"{int(keys):,} keys, fixed_window"),
             ("keys-sliding", f"{int(keys):,} keys, sliding_window"), ("keys-token", f"{int(keys):,} keys, token_bucket")]
# Per server and scenario, the round with the median peak throughput (its half-peak run with it).
pick = {}
for s, _ in servers:
    for sc, _ in scenarios:
        rs = sorted((r for (a, b, r, k) in runs if (a, b, k) == (s, sc, "peak")),
                    key=lambda r: runs[(s, sc, r, "peak")]["throughput_rps"])
        if rs:
            r = rs[(len(rs) - 1) // 2]
            pick[(s, sc)] = (runs[(s, sc, r, "peak")], runs.get((s, sc, r, "half")))

def f(v):
    return f"{v:.2f}"

print(f"`scripts/bench.sh` at {rev}: sluice-load -z {duration} -c {conc} --connections {conns}, loopback, "
      f"{os.cpu_count()} CPUs shared by the load generator, the servers and Redis; "
      f"{rounds} round(s){' (median round shown)' if int(rounds) > 1 else ''}; "
      f"build {int(build_s) // 60} min {int(build_s) % 60} s, runs {int(run_s) // 60} min {int(run_s) % 60} s.\n")
print("| scenario | server | peak req/s | p50 ms | p99 ms | p99.9 ms | half-peak req/s | p50 ms | p99 ms | p99.9 ms | OK | OVER_LIMIT | errors | CPU µs/req at peak | other CPUs |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
others = []
for sc, scname in scenarios:
    for s, sname in servers:
        if (s, sc) not in pick:
            continue
        p, h = pick[(s, sc)]
        lp = p["latency_ms"]
        both = [x for x in (p, h) if x]
        others += [x["other_cpus"] for x in both]
        cpu = f"{p['server_us']:.1f}" + (f" + {p['redis_us']:.1f} Redis" if s == "redis" else "")
        half = (f"{h['throughput_rps']:.0f} | {f(h['latency_ms']['p50'])} | {f(h['latency_ms']['p99'])} | {f(h['latency_ms']['p99_9'])}"
                if h else "- | - | - | -")
        print(f"| {scname} | {sname} | {p['throughput_rps']:.0f} | {f(lp['p50'])} | {f(lp['p99'])} | {f(lp['p99_9'])} | {half} "
              f"| {sum(x['ok'] for x in both)} | {sum(x['over_limit'] for x in both)} | {sum(x['error_count'] for x in both)} | {cpu} "
              f"| {max(x['other_cpus'] for x in both):.2f} |")

def ratio(a, b, sc):
    if (a, sc) in pick and (b, sc) in pick:
        return f"{pick[(a, sc)][0]['throughput_rps'] / max(1.0, pick[(b, sc)][0]['throughput_rps']):.2f}"
    return "-"

print("\n| scenario | memory / baseline | memory / bare tonic | Redis / memory | Redis EVALSHA per request at peak | at half peak |")
print("|---|---:|---:|---:|---:|---:|")
for sc, scname in scenarios:
    if not any((s, sc) in pick for s, _ in servers):
        continue
    ev = [f"{x['evalsha_per_req']:.3f}" if x and "evalsha_per_req" in x else "-" for x in pick.get(("redis", sc), (None, None))]
    print(f"| {scname} | {ratio('memory', 'baseline', sc)} | {ratio('memory', 'bare', sc)} | {ratio('redis', 'memory', sc)} | {ev[0]} | {ev[1]} |")

print("\nThroughput ratios are of the peak (unpaced) runs. OK / OVER_LIMIT / errors: both runs of the row. "
      "CPU µs/req: CPU time of the server process (and of redis-server) per request in the peak run. "
      "other CPUs: CPUs used by processes outside the benchmark during the row's runs (the larger of the two); "
      "above ~0.1 the row was disturbed. "
      "EVALSHA per request: `cmdstat_evalsha` calls (CONFIG RESETSTAT before the run) / requests answered.")
if others:
    print(f"Other processes on the machine used {sum(others) / len(others):.2f} CPUs on average during the runs "
          f"(at most {max(others):.2f} in one run).")
w = os.path.join(out, "strace.writes.json")
if os.path.exists(w):
    x = json.load(open(w))
    n = max(1, x["answered"])
    c = x["writes"]
    print(f"\nSocket writes of sluice with Redis per request (strace -f on write, writev, sendmsg, sendto; "
          f"{int(keys):,} keys, fixed_window, unpaced, {x['throughput_rps']:.0f} req/s under strace, "
          f"{x['answered']} requests, EVALSHA per request {x['evalsha'] / n:.3f}): "
          f"to Redis {c.get('redis', 0) / n:.3f}, to clients {c.get('clients', 0) / n:.3f}, "
          f"other writes (eventfd wake-ups, logs) {c.get('other', 0) / n:.3f}.")
else:
    print(f"\nSocket writes per request: {strace_note}.")
EOF
