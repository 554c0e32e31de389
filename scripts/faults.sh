#!/usr/bin/env bash
# Runs the Redis fault matrix (tests/redis_faults.rs) in full, on a release build, and prints
# its results as a Markdown table.
#
# Each case runs the real sluice binary on a real redis-server under load, injects one fault
# (CLIENT KILL, OOM, a restart that requires a password, a Sentinel master killed), recovers
# it and prints one `fault-matrix:` line; this script turns those lines into the table. The
# healthy case runs at full size (SLUICE_FAULTS_FULL=1: 1,000 streams, 100,000 requests; the
# normal suite runs it at a fifth of that).
# Release, because the load (2,500 requests/s) is meant to measure sluice, not a debug build;
# one case at a time, because two loads on a small machine measure the machine.
#
# Needs redis-server and redis-cli on PATH (scripts/test.sh installs them). Exits non-zero
# when a case fails its bounds; the table shows every case that printed its line either way.
set -uo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null && command -v redis-cli >/dev/null || {
  echo "error: redis-server and redis-cli are needed (run scripts/test.sh, or apt-get install redis-server redis-tools)" >&2
  exit 1
}

log="$(mktemp -t sluice-faults.XXXXXX)"
trap 'rm -f "$log"' EXIT

echo "==> cargo test --release --test redis_faults (full size); output in $log while it runs" >&2
SLUICE_FAULTS_FULL=1 cargo test --release --locked --test redis_faults -- --nocapture --test-threads=1 \
  >"$log" 2>&1
status=$?

echo
echo "| fault | replicas | admitted / limit | Redis counter | errors | recovery |"
echo "|---|---|---|---|---|---|"
grep -o 'fault-matrix: .*' "$log" | sed 's/^fault-matrix: //' | awk '
  {
    delete f
    for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    printf "| %s | %s | %s / %s (%s) | %s | %s | %s |\n",
      f["fault"], f["replicas"], f["admitted"], f["limit"], f["ratio"], f["redis"], f["errors"], f["recovery"]
  }'
echo
# The test harness's verdict, and the failures in full when there are any.
grep -E '^test result:' "$log"
sed -n '/^failures:$/,/^test result:/p' "$log" | grep -E '^    [a-z0-9_]+$' | sort -u | sed 's/^ */failed: /'
if [ "$status" -ne 0 ]; then
  echo
  echo "redis_faults failed (exit $status); its output:" >&2
  cat "$log" >&2
fi
exit "$status"
