"""ack_within_s and presence() without a gateway: the checks made before
any request, the exact bodies sent and the answers' mapping, against a
small local HTTP server that records each request and answers what the
test tells it to (the gateway's documented answers)."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port
from wsgateway import (
    AsyncGateway,
    Gateway,
    GatewayConnectionError,
    InvalidQuery,
    OutboxError,
    PresenceConnection,
    PresenceDisabled,
    PresenceUnavailable,
    PublishDisabled,
    Unauthorized,
    add_outbox_row,
)

EVENT = {"type": "ROUND_SUBMITTED", "tenant_id": 1, "branch_id": 5}
KITCHEN = "channel:branch:5:kitchen"


class Recorder:
    """Answers each request with `self.answer` (status, body dict) and
    records (method, path, headers, body)."""

    def __init__(self):
        self.requests = []
        self.answer = (202, None)
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                rec.requests.append((self.command, self.path, dict(self.headers), body))
                status, payload = rec.answer
                if payload is None:  # a publish: one id per item sent
                    sent = json.loads(body)
                    items = sent if isinstance(sent, list) else [sent]
                    payload = {"event_ids": [i["event"]["event_id"] for i in items], "duplicates": [False] * len(items)}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self):
        return [json.loads(b) for (_, _, _, b) in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


@pytest.mark.parametrize("bad", [0, 301, -1, 1.5, 30.0, True, "30", [30]])
def test_a_bad_ack_within_s_is_refused_before_any_request(bad):
    # Nothing listens there: a request would raise GatewayConnectionError instead.
    gw = Gateway(f"http://127.0.0.1:{free_port()}", "key", retries=0)
    with pytest.raises(ValueError, match="ack_within_s must be an int from 1 to 300"):
        gw.publish(KITCHEN, EVENT, ack_within_s=bad)
    with pytest.raises(ValueError, match="ack_within_s"):
        gw.publish_many([(KITCHEN, EVENT, None, bad)])
    with pytest.raises(ValueError, match="ack_within_s"):
        gw.publish_many([{"channel": KITCHEN, "event": EVENT, "ack_within_s": bad}])
    with pytest.raises(ValueError, match="ack_within_s"):
        asyncio.run(AsyncGateway(gw.base_url, "key", retries=0).publish(KITCHEN, EVENT, ack_within_s=bad))
    with pytest.raises(GatewayConnectionError):
        gw.publish(KITCHEN, EVENT, ack_within_s=1)  # a good one does reach the (absent) gateway


def test_ack_within_s_and_an_ack_in_the_event_are_refused_together():
    gw = Gateway(f"http://127.0.0.1:{free_port()}", "key", retries=0)
    with pytest.raises(ValueError, match="own `ack`"):
        gw.publish(KITCHEN, {**EVENT, "ack": {"within_s": 5}}, ack_within_s=5)
    with pytest.raises(ValueError, match="both"):
        gw.publish_many([{"channel": KITCHEN, "event": EVENT, "ack": {"within_s": 5}, "ack_within_s": 5}])


def test_ack_within_s_is_sent_as_the_items_ack(recorder):
    gw = Gateway(recorder.url, "key")
    original = dict(EVENT)
    r = gw.publish(KITCHEN, original, event_id="round-1", ack_within_s=30)
    assert r.event_id == "round-1"
    assert original == EVENT, "the caller's dict is not changed"
    gw.publish(KITCHEN, EVENT, event_id="round-2")  # no ack asked: no field
    gw.publish_many(
        [
            (KITCHEN, EVENT, "a", 1),
            (KITCHEN, EVENT, "b", None),
            (KITCHEN, EVENT, "c"),
            {"channel": KITCHEN, "event": {**EVENT, "event_id": "d"}, "ack_within_s": 300},
            {"channel": KITCHEN, "event": {**EVENT, "event_id": "e"}, "ack": {"within_s": 7}},  # as given
        ]
    )
    one, plain, many = recorder.bodies()
    assert one == {"channel": KITCHEN, "event": {**EVENT, "event_id": "round-1"}, "ack": {"within_s": 30}}
    assert "ack" not in plain and "ack" not in plain["event"]
    assert [i.get("ack") for i in many] == [{"within_s": 1}, None, None, {"within_s": 300}, {"within_s": 7}]
    assert all("ack_within_s" not in i for i in many)


def test_async_publish_sends_ack_too(recorder):
    async def main():
        gw = AsyncGateway(recorder.url, "key")
        await gw.publish([KITCHEN, "channel:branch:5:waiters"], EVENT, ack_within_s=12)
        await gw.publish_many([(KITCHEN, EVENT, None, 13)])

    asyncio.run(main())
    one, many = recorder.bodies()
    assert one["ack"] == {"within_s": 12} and one["channels"] == [KITCHEN, "channel:branch:5:waiters"]
    assert many[0]["ack"] == {"within_s": 13}


class RecordingConnection:
    """Stands in for a psycopg connection outside autocommit: records the one INSERT."""

    autocommit = False

    def __init__(self):
        self.executed = []

    def execute(self, sql, params):
        self.executed.append((sql, params))


def test_outbox_row_with_ack_within_s_puts_ack_in_the_stored_event():
    conn = RecordingConnection()
    the_id = add_outbox_row(conn, KITCHEN, EVENT, event_id="row-1", ack_within_s=45)
    [(_, (channels, text, row_id))] = conn.executed
    assert (channels, row_id, the_id) == ([KITCHEN], "row-1", "row-1")
    assert json.loads(text) == {**EVENT, "event_id": "row-1", "ack": {"within_s": 45}}
    add_outbox_row(conn, KITCHEN, EVENT, event_id="row-2")
    assert "ack" not in json.loads(conn.executed[1][1][1])


@pytest.mark.parametrize("bad", [0, 301, 2.5, False, "10"])
def test_outbox_refuses_a_bad_ack_within_s_before_any_sql(bad):
    conn = RecordingConnection()
    with pytest.raises(OutboxError, match="ack_within_s"):
        add_outbox_row(conn, KITCHEN, EVENT, ack_within_s=bad)
    with pytest.raises(OutboxError, match="own `ack`"):
        add_outbox_row(conn, KITCHEN, {**EVENT, "ack": {"within_s": 3}}, ack_within_s=3)
    assert conn.executed == []


PRESENCE = {
    "tenant_id": 1,
    "branch_id": 5,
    "connections": [
        {"id": "n1/1", "endpoint": "kitchen", "user_id": 9, "sector_ids": None, "connected_at": 1765090000123, "node": "n1"},
        {"id": "n1/2", "endpoint": "diner", "session_id": 77, "table_id": 12, "sector_ids": None,
         "connected_at": 1765090000456, "node": "n1"},
        {"id": "n2/1", "endpoint": "waiter", "user_id": 4, "sector_ids": [1, 2], "connected_at": 1765090000789,
         "node": "n2", "some_new_field": True},
    ],
}


def test_presence_gets_the_list_with_the_key(recorder):
    recorder.answer = (200, PRESENCE)
    got = Gateway(recorder.url + "/", " key ").presence(1, 5)
    assert got == [
        PresenceConnection("n1/1", "kitchen", 1765090000123, "n1", None, user_id=9),
        PresenceConnection("n1/2", "diner", 1765090000456, "n1", None, session_id=77, table_id=12),
        PresenceConnection("n2/1", "waiter", 1765090000789, "n2", [1, 2], user_id=4),
    ]
    [(method, path, headers, body)] = recorder.requests
    assert (method, path, body) == ("GET", "/api/presence?tenant_id=1&branch_id=5", b"")
    assert headers["Authorization"] == "Bearer key"
    assert asyncio.run(AsyncGateway(recorder.url, "key").presence(1, 5)) == got


@pytest.mark.parametrize(
    "status, body, cls, retried",
    [
        (401, {"error": "unauthorized", "detail": "bad key"}, Unauthorized, False),
        (404, {"error": "presence_disabled", "detail": "no WSGATEWAY_API_KEY"}, PresenceDisabled, False),
        (400, {"error": "invalid_query", "detail": "branch_id: not an integer"}, InvalidQuery, False),
        (503, {"error": "presence_unavailable", "detail": "redis down"}, PresenceUnavailable, True),
    ],
)
def test_presence_errors_map_to_their_classes(recorder, status, body, cls, retried):
    recorder.answer = (status, body)
    retries = []
    gw = Gateway(recorder.url, "key", retries=2, backoff_initial_s=0.001, on_retry=retries.append)
    with pytest.raises(cls) as info:
        gw.presence(1, 5)
    assert info.value.status == status and info.value.code == body["error"] and info.value.detail == body["detail"]
    assert not isinstance(info.value, PublishDisabled) or status == 404
    assert len(retries) == (2 if retried else 0)
    assert len(recorder.requests) == (3 if retried else 1)


@pytest.mark.parametrize("bad", [(None, 5), (1, "5"), (True, 5), (1, 5.0)])
def test_presence_refuses_non_int_ids_locally(bad):
    with pytest.raises(ValueError, match="must be an int"):
        Gateway(f"http://127.0.0.1:{free_port()}", "key").presence(*bad)
