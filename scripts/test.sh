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
#     cluster (tests/it/postgres_tls.rs);
#   - Node.js 20+ and npm, for the TypeScript client's tests
#     (clients/typescript), which run against the gateway binary cargo built;
#   - Chromium (Debian's package) and curl, for the demo page's browser test
#     (tests/browser/), which also checks the committed copy of the client's
#     bundle against a fresh build;
#   - systemd-analyze, and a Python with kubernetes-validate and dockerfile
#     (PyPI, in a virtualenv under target/), for the deployment files' tests
#     (tests/it/packaging.rs);
#   - in that virtualenv, the Python package (clients/python, editable) with
#     its test extra's pinned versions (pytest, psycopg, asyncpg, websockets),
#     for its tests, which run against the gateway binary cargo built.
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

# tests/it/postgres_tls.rs starts its own cluster with ssl=on: it needs the
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
  [ "$(id -u)" = 0 ] || die "tests/it/postgres_tls.rs runs its PostgreSQL as the postgres user (setpriv), which needs root: run as root"
}

# The TypeScript client (clients/typescript) is tested with Node's own test
# runner against real gateway processes; Node 20 is the oldest it supports.
ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  command -v node >/dev/null 2>&1 || die "node could not be installed: install Node.js 20 or newer"
  command -v npm >/dev/null 2>&1 || die "npm could not be installed: install npm"
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  [ "$major" -ge 20 ] || die "Node.js $(node --version) is too old for clients/typescript: install Node.js 20 or newer"
}

command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup) first"
# The demo page's browser test drives Debian's Chromium (never a
# downloaded browser build) and runs the curl command the page shows.
ensure_chromium() {
  local chromium="${CHROMIUM_BIN:-/usr/bin/chromium}"
  [ -x "$chromium" ] || apt_install chromium
  [ -x "$chromium" ] || die "no Chromium at $chromium: install Debian's chromium package (apt-get install chromium), or set CHROMIUM_BIN"
  command -v curl >/dev/null 2>&1 || apt_install curl
  command -v curl >/dev/null 2>&1 || die "curl could not be installed"
}

# tests/it/packaging.rs: `systemd-analyze verify` on the systemd unit, the
# Kubernetes manifests validated offline by kubernetes-validate (PyPI, which
# bundles Kubernetes' schemas), and the Dockerfile read by BuildKit's parser
# (PyPI's dockerfile), both in a virtualenv of their own, whose Python (with
# PyYAML and jsonschema) the tests find in WSGATEWAY_TEST_PYTHON.
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
DOCKERFILE_PARSER="dockerfile==3.4.0"
ensure_packaging_tools() {
  command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
  command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze is missing: install systemd"
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  local target="${CARGO_TARGET_DIR:-target}"
  case "$target" in /*) ;; *) target="$(pwd)/$target" ;; esac
  local venv="$target/test-python"
  local have
  have="$("$venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null || true)"
  if ! grep -qx "$KUBERNETES_VALIDATE" <<<"$have" || ! grep -qx "$DOCKERFILE_PARSER" <<<"$have"; then
    echo "== installing $KUBERNETES_VALIDATE and $DOCKERFILE_PARSER (PyPI) into $venv"
    python3 -m venv "$venv" || { apt_install python3-venv && python3 -m venv "$venv"; } \
      || die "cannot make a Python virtualenv at $venv (install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" "$DOCKERFILE_PARSER" \
      || die "cannot install $KUBERNETES_VALIDATE and $DOCKERFILE_PARSER from PyPI"
  fi
  export WSGATEWAY_TEST_PYTHON="$venv/bin/python"
}

# clients/python: installed editable, with the exact versions of its `test`
# extra (clients/python/pyproject.toml), into the virtualenv above; pip runs
# only when something is missing or of another version.
ensure_python_client() {
  local python="$WSGATEWAY_TEST_PYTHON"
  if ! "$python" - <<'PY'
import importlib.metadata as md, pathlib, re, sys
text = pathlib.Path("clients/python/pyproject.toml").read_text()
pins = re.findall(r'"([^"]+)"', re.search(r"^test = \[(.*?)\]", text, re.S | re.M).group(1))
for pin in pins:
    name, version = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[.*\])?==(.+)", pin).groups()
    try:
        if md.version(name) != version:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
try:
    import wsgateway
except ImportError:
    sys.exit(1)
here = pathlib.Path("clients/python/wsgateway").resolve()
sys.exit(0 if pathlib.Path(wsgateway.__file__).resolve().parent == here else 1)
PY
  then
    echo "== installing clients/python (editable) and its test extra (PyPI) into $(dirname "$(dirname "$python")")"
    "$python" -m pip install --quiet --disable-pip-version-check -e "clients/python[test]" \
      || die "cannot install clients/python[test] into the virtualenv (PyPI: pytest, psycopg, asyncpg, websockets)"
  fi
}

ensure_redis
ensure_postgres
ensure_postgres_server
ensure_node
ensure_chromium
ensure_packaging_tools
ensure_python_client

echo "== cargo fmt --check"
cargo fmt --all -- --check || die "code is not formatted: run 'cargo fmt --all'"
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace
echo "== TypeScript client (clients/typescript)"
bin="$(pwd)/${CARGO_TARGET_DIR:-target}/debug/wsgateway"
case "${CARGO_TARGET_DIR:-}" in /*) bin="$CARGO_TARGET_DIR/debug/wsgateway" ;; esac
[ -x "$bin" ] || die "cargo test did not leave the gateway binary at $bin"
(cd clients/typescript && npm ci --no-audit --no-fund && npm run build && WSGATEWAY_BIN="$bin" npm test) \
  || die "the TypeScript client's tests failed (clients/typescript)"
echo "== Python package (clients/python)"
(cd clients/python && WSGATEWAY_BIN="$bin" "$WSGATEWAY_TEST_PYTHON" -m pytest -q tests) \
  || die "the Python package's tests failed (clients/python; run them again with: cd clients/python && WSGATEWAY_BIN=$bin $WSGATEWAY_TEST_PYTHON -m pytest tests)"
echo "== demo page: the committed client bundle is the built one"
scripts/demo_bundle.sh check
echo "== demo page: browser test (tests/browser, headless Chromium)"
(cd tests/browser \
  && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund \
  && WSGATEWAY_BIN="$bin" npm test) \
  || die "the demo page's browser test failed (tests/browser)"
