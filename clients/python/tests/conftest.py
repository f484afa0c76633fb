"""Test support: real gateway and redis-server processes, started and
killed by pid; a real PostgreSQL at TEST_DATABASE_URL; condition waits
with deadlines, never fixed sleeps as assertions."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

HERE = Path(__file__).resolve().parent
JWT_SECRET = "py-test-jwt-secret"
TABLE_SECRET = "py-test-table-secret"
API_KEY = "py-test-api-key"
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")

# Publishing and WebSockets go to 127.0.0.1: never through a proxy.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def gateway_bin() -> str:
    bin_ = os.environ.get("WSGATEWAY_BIN") or str(HERE.parent.parent.parent / "target/debug/wsgateway")
    if not os.access(bin_, os.X_OK):
        pytest.exit(
            f"wsgateway binary not found at {bin_}: build it first (cargo build --bin wsgateway) "
            "or set WSGATEWAY_BIN",
            returncode=2,
        )
    return bin_


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], what: str, timeout_s: float = 15.0, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)


_started: List[subprocess.Popen] = []


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a paused redis-server
        except ProcessLookupError:
            pass
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _kill_leftovers():
    yield
    for p in _started:
        _kill(p)


class GatewayProc:
    def __init__(self, env: Dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log = log
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "JWT_SECRET": JWT_SECRET,
            "TABLE_TOKEN_SECRET": TABLE_SECRET,
            "WSGATEWAY_LISTEN": f"127.0.0.1:{self.port}",
            "WSGATEWAY_DRAIN_S": "0",
            "WSGATEWAY_SHUTDOWN_GRACE_S": "1",
            "RUST_LOG": "info",
            **env,
        }
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [gateway_bin(), "serve"], env=full, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        _started.append(self.proc)
        try:
            wait_for(self._healthy, f"gateway health on port {self.port}", 30)
        except AssertionError:
            self.stop()
            raise AssertionError(f"the gateway did not become healthy; its log:\n{self.log_text()}")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited at start ({self.proc.returncode}):\n{self.log_text()}")
        try:
            with urllib.request.urlopen(self.url + "/ws/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        _kill(self.proc)
        self._log_file.close()


class RedisProc:
    """A redis-server of our own, without persistence, on a fixed port so
    that it can be stopped and started again where the gateway expects it."""

    def __init__(self, port: Optional[int] = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "RedisProc":
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _started.append(self.proc)
        wait_for(self.ping, f"redis-server on port {self.port}", 15)
        return self

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError("redis-server exited")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory):
    """start_gateway(env) -> GatewayProc, stopped at the end of the session."""
    procs: List[GatewayProc] = []

    def start(env: Dict[str, str]) -> GatewayProc:
        log = tmp_path_factory.mktemp("gateway") / "gateway.log"
        g = GatewayProc(env, log)
        procs.append(g)
        return g

    yield start
    for g in procs:
        g.stop()


@pytest.fixture(scope="session")
def gateway(start_gateway) -> GatewayProc:
    """Embedded broker, publish API on, small limits to reach every 400."""
    return start_gateway(
        {
            "WSGATEWAY_API_KEY": API_KEY,
            "WSGATEWAY_MAX_PUBLISH_BYTES": "65536",
            "WSGATEWAY_MAX_PUBLISH_ITEMS": "5",
            "WSGATEWAY_MAX_PUBLISH_CHANNELS": "3",
        }
    )


# --- a diner's WebSocket ---------------------------------------------------

@contextlib.contextmanager
def connect_diner(gw: GatewayProc, token: str):
    """Opens /ws/diner; yields (websocket, connected frame); closes it after."""
    from websockets.sync.client import connect

    with connect(f"{gw.ws_url}/ws/diner?table_token={token}", open_timeout=10, max_size=2**20) as ws:
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "connected", frame
        yield ws, frame


# The gateway's own frames (PROTOCOL §5, reserved types): not events.
GATEWAY_FRAMES = ("connected", "pong", "error", "resync", "token_refreshed", "sectors_updated")


def recv_events(ws, until: Callable[[List[dict]], bool], timeout_s: float = 10.0) -> List[dict]:
    """Reads frames until `until(events)` holds (events: non-protocol frames)."""
    from websockets.exceptions import ConnectionClosed

    events: List[dict] = []
    deadline = time.monotonic() + timeout_s
    while not until(events):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout_s} s; events so far: {events}")
        try:
            frame = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            continue
        except ConnectionClosed as e:
            raise AssertionError(f"connection closed ({e}); events so far: {events}")
        if frame.get("type") not in GATEWAY_FRAMES:
            events.append(frame)
    return events


def no_more_events(ws, quiet_s: float) -> List[dict]:
    """The events arriving within `quiet_s` (for 'never delivered' checks,
    made after a later event has arrived, so that quiet_s is only a margin)."""
    got: List[dict] = []
    deadline = time.monotonic() + quiet_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            frame = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            break
        if frame.get("type") not in GATEWAY_FRAMES:
            got.append(frame)
    return got


def unique_ids():
    """tenant, branch, table, session ids of their own for one test."""
    n = secrets.randbelow(10**9) + 1000
    return {"tenant": 1, "branch": 5, "table": n % 1000 + 1, "session": n}


# --- a recording HTTP proxy ------------------------------------------------

class RecordingProxy:
    """Forwards every POST to the gateway and records (body, status): what
    the client really sent on each attempt."""

    def __init__(self, target_port: int):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: List[tuple] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                upstream.request("POST", self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                payload = resp.read()
                upstream.close()
                proxy.requests.append((body, resp.status))
                self.send_response(resp.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def redis_command(port: int, *args: str) -> bytes:
    """One RESP command to a redis-server; returns the raw reply."""
    out = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(out)
        time.sleep(0.05)
        return s.recv(65536)


# --- PostgreSQL: an outbox table of this run's own ---------------------------

OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id bigserial PRIMARY KEY,
    channels text[] NOT NULL,
    event jsonb NOT NULL,
    event_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


@pytest.fixture(scope="session")
def outbox_table():
    """`<schema>.wsgateway_outbox` in a schema unique to this run, made with
    the DDL of `wsgateway outbox schema`; the schema is dropped after."""
    import psycopg

    schema = f"wsgw_py_{secrets.token_hex(6)}"
    table = f"{schema}.wsgateway_outbox"
    try:
        conn = psycopg.connect(DATABASE_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        pytest.exit(f"cannot connect to PostgreSQL at {DATABASE_URL} (set TEST_DATABASE_URL): {e}", returncode=2)
    with conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(OUTBOX_DDL.format(table=table))
    yield table
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
