#!/usr/bin/env bash
# The one command that runs every check: formatting, lints, and every test
# (unit and integration: real gateways, real WebSocket clients over loopback,
# a real Redis). It provides what the tests need: a Redis server binary (for
# tests that start and kill their own) and a running Redis at REDIS_URL
# (default redis://127.0.0.1:6379), installing and starting them if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "scripts/test.sh: $*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "need root to run: $* (install it yourself, then re-run)"
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "$1 is missing and apt-get is not available: install $1"
  echo "== installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  command -v redis-server >/dev/null 2>&1 || die "redis-server could not be installed"
  if [ -n "${REDIS_URL:-}" ]; then
    redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG \
      || die "REDIS_URL is set but no Redis answers there"
    return
  fi
  if ! redis-cli -p 6379 ping 2>/dev/null | grep -q PONG; then
    echo "== starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --logfile "${TMPDIR:-/tmp}/wsgateway-test-redis.log"
    for _ in $(seq 50); do
      redis-cli -p 6379 ping 2>/dev/null | grep -q PONG && return
      sleep 0.1
    done
    die "redis-server did not start (see ${TMPDIR:-/tmp}/wsgateway-test-redis.log)"
  fi
}

command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
ensure_redis

echo "== cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run 'cargo fmt --all'"
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked
