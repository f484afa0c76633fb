#!/usr/bin/env bash
# The one command that runs every check: formatting, lints, and every test
# (unit and integration: real gateways, real WebSocket clients over loopback,
# a real Redis, a real PostgreSQL), for the whole workspace: the gateway and
# its load generator (bench/). It provides what the tests need,
# installing (apt-get) and starting them when missing:
#   - a Redis server binary (tests start and kill their own) and a running
#     Redis at REDIS_URL (default redis://127.0.0.1:6379);
#   - a PostgreSQL at TEST_DATABASE_URL (default
#     postgres://postgres@127.0.0.1:5432/test) with the backend's
#     waiter_sector_assignment table;
#   - PostgreSQL's server binaries and setpriv, for the TLS tests' own
#     cluster (tests/postgres_tls.rs).
# Then the demo page's checks (demo_page_checks, at the end): Chromium
# (apt-get) for the browser test in tests/browser/, and the committed copy
# of the TypeScript client's bundle checked against a fresh build.
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

ensure_postgres() {
  command -v psql >/dev/null 2>&1 || apt_install postgresql postgresql-client
  local url="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
  local ours="postgres://postgres:wsgateway-test@127.0.0.1:5432/test"
  local started_here=""
  if [ -z "${TEST_DATABASE_URL:-}" ] && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    ls /etc/postgresql/*/main >/dev/null 2>&1 || apt_install postgresql
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "== starting PostgreSQL $version on 127.0.0.1:5432"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 100); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.1; done
    pg_isready -q -h 127.0.0.1 -p 5432 || die "PostgreSQL did not start"
    started_here=1
  fi
  if ! psql "$url" -qtAc 'SELECT 1' >/dev/null 2>&1; then
    [ -z "${TEST_DATABASE_URL:-}" ] || die "TEST_DATABASE_URL is set but cannot be used"
    if ! psql "$ours" -qtAc 'SELECT 1' >/dev/null 2>&1; then
      # Only a cluster this script started (a fresh Debian install, where
      # TCP logins need a password and there is no database "test") is
      # prepared; anything else is the user's to configure.
      [ -n "$started_here" ] || die "cannot log in to PostgreSQL at 127.0.0.1:5432: set TEST_DATABASE_URL"
      echo "== preparing the test database"
      as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'wsgateway-test'\"" >/dev/null
      as_root su postgres -c "createdb test" 2>/dev/null || true
      psql "$ours" -qtAc 'SELECT 1' >/dev/null || die "cannot log in to PostgreSQL at 127.0.0.1:5432"
    fi
    url="$ours"
    export TEST_DATABASE_URL="$url"
  fi
  PGOPTIONS='-c client_min_messages=warning' psql "$url" -q -v ON_ERROR_STOP=1 \
    -f tests/fixtures/waiter_sector_assignment.sql >/dev/null
}

# tests/postgres_tls.rs starts its own cluster with ssl=on: it needs the
# server binaries (/usr/lib/postgresql/<version>/bin/initdb and postgres, the
# newest version is used), the postgres user, and setpriv to run them as that
# user, which only root may do.
ensure_postgres_server() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
  ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
    || die "PostgreSQL's server binaries (/usr/lib/postgresql/<version>/bin/initdb, postgres) are missing: install the postgresql package"
  id -u postgres >/dev/null 2>&1 || die "there is no 'postgres' user (the postgresql package creates it)"
  if ! command -v setpriv >/dev/null 2>&1; then
    # util-linux up to Debian 12; its own package after.
    apt_install setpriv || apt_install util-linux || true
  fi
  command -v setpriv >/dev/null 2>&1 || die "setpriv is missing: install util-linux (or Debian's setpriv package)"
  [ "$(id -u)" = 0 ] || die "tests/postgres_tls.rs runs its PostgreSQL as the postgres user (setpriv), which needs root: run as root"
}

command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
ensure_redis
ensure_postgres
ensure_postgres_server

echo "== cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run 'cargo fmt --all'"
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace

# ---- The demo page (src/http/demo/): its copy of the TypeScript client's
# bundle, and the browser test (tests/browser/: headless Chromium from
# Debian's package, driving the page served by real gateway processes).
# Needs Node 20+ and npm; installs chromium and curl when missing.
ensure_chromium() {
  local chromium="${CHROMIUM_BIN:-/usr/bin/chromium}"
  [ -x "$chromium" ] || apt_install chromium
  [ -x "$chromium" ] || die "no Chromium at $chromium: install Debian's chromium package (apt-get install chromium), or set CHROMIUM_BIN"
}

demo_page_checks() {
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    || die "node and npm not found: the demo page's checks need Node 20 or later"
  ensure_chromium
  command -v curl >/dev/null 2>&1 || apt_install curl
  [ -f clients/typescript/package.json ] || die "clients/typescript is missing: the demo page's client bundle is built from it"
  echo "== building the TypeScript client (for the demo page's bundle)"
  (cd clients/typescript && npm ci --no-audit --no-fund && npm run build)
  echo "== demo page: the committed client bundle is the built one"
  scripts/demo_bundle.sh check
  echo "== demo page: browser test (headless Chromium)"
  cargo build --locked --bin wsgateway
  local bin
  bin="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/wsgateway"
  (cd tests/browser \
    && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund \
    && WSGATEWAY_BIN="$bin" npm test)
}

demo_page_checks
