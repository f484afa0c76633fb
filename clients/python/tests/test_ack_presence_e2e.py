"""ack_within_s and presence() end to end, against a real gateway: an
event published with an ack request reaches a WebSocket client with its
`ack` field (and, acknowledged by that client, is neither redelivered nor
escalated); GET /api/presence lists a connected diner and kitchen client,
and its refusals map to their classes.

Needs the gateway's acknowledgements and presence (issue #33); against a
gateway without them, these tests fail."""

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import urllib.request

import pytest

from conftest import (
    API_KEY,
    JWT_SECRET,
    TABLE_SECRET,
    RedisProc,
    connect_diner,
    no_more_events,
    recv_events,
    unique_ids,
    wait_for,
)
from wsgateway import (
    AsyncGateway,
    Gateway,
    InvalidQuery,
    PresenceDisabled,
    PresenceUnavailable,
    PublishDisabled,
    Unauthorized,
    mint_table_token,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def staff_token(sub, tenant, branches, roles, ttl_s=3600):
    now = int(time.time())
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = {"sub": sub, "tenant_id": tenant, "branch_ids": branches, "roles": roles, "exp": now + ttl_s, "iat": now,
              "jti": secrets.token_hex(8)}
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(JWT_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


@contextlib.contextmanager
def connect_staff(gw, endpoint, token):
    from websockets.sync.client import connect

    with connect(f"{gw.ws_url}/ws/{endpoint}?token={token}", open_timeout=10, max_size=2**20) as ws:
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "connected", frame
        yield ws, frame


def metric(gw, name, labels):
    """The value of one sample of /ws/metrics (0 when absent)."""
    with urllib.request.urlopen(gw.url + "/ws/metrics", timeout=5) as r:
        text = r.read().decode()
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_publish_with_ack_within_s_reaches_the_client_with_ack_and_its_ack_counts(gateway):
    ids = unique_ids()
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    channel = f"channel:session:{ids['session']}"
    gw = Gateway(gateway.url, API_KEY)
    acked_before = metric(gateway, "wsgateway_acks_total", {"outcome": "acknowledged"})
    with connect_diner(gateway, token) as (ws, _):
        event = {"type": "PAYMENT_APPROVED", "tenant_id": ids["tenant"], "branch_id": ids["branch"], "session_id": ids["session"]}
        asked = gw.publish(channel, event, ack_within_s=2)
        plain = gw.publish(channel, {**event, "type": "ROUND_READY"})
        many = gw.publish_many([(channel, {**event, "type": "ROUND_SERVED"}, None, 3)])
        evs = recv_events(ws, lambda evs: len(evs) >= 3)
        assert [e["event_id"] for e in evs] == [asked.event_id, plain.event_id, many[0].event_id]
        assert evs[0]["ack"] == {"within_s": 2}
        assert "ack" not in evs[1]
        assert evs[2]["ack"] == {"within_s": 3}
        assert not any(e.get("redelivered") for e in evs)
        # The diner acknowledges both: no redelivery within the deadlines and a margin.
        ws.send(json.dumps({"type": "ack", "event_ids": [asked.event_id, many[0].event_id]}))
        wait_for(lambda: metric(gateway, "wsgateway_acks_total", {"outcome": "acknowledged"}) >= acked_before + 2,
                 "the two acks counted as acknowledged")
        assert no_more_events(ws, 3 + 1.5) == [], "acknowledged: not redelivered"


def test_async_publish_with_ack_within_s(gateway):
    ids = unique_ids()
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    channel = f"channel:session:{ids['session']}"
    with connect_diner(gateway, token) as (ws, _):
        import asyncio

        event = {"type": "ROUND_READY", "tenant_id": ids["tenant"], "branch_id": ids["branch"], "session_id": ids["session"]}
        r = asyncio.run(AsyncGateway(gateway.url, API_KEY).publish(channel, event, ack_within_s=60))
        [got] = recv_events(ws, lambda evs: len(evs) >= 1)
        assert got["event_id"] == r.event_id and got["ack"] == {"within_s": 60}
        ws.send(json.dumps({"type": "ack", "event_ids": [r.event_id]}))


def test_an_unacknowledged_event_is_redelivered_once_with_redelivered_true(gateway):
    ids = unique_ids()
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    channel = f"channel:session:{ids['session']}"
    with connect_diner(gateway, token) as (ws, _):
        event = {"type": "PAYMENT_APPROVED", "tenant_id": ids["tenant"], "branch_id": ids["branch"], "session_id": ids["session"]}
        r = Gateway(gateway.url, API_KEY).publish(channel, event, ack_within_s=1)
        evs = recv_events(ws, lambda evs: len(evs) >= 2, timeout_s=10)
        assert [e["event_id"] for e in evs] == [r.event_id, r.event_id]
        assert "redelivered" not in evs[0]
        assert evs[1]["redelivered"] is True and next(iter(evs[1])) == "redelivered", "its first field"
        assert evs[1]["ack"] == {"within_s": 1}
        assert no_more_events(ws, 2.5) == [], "redelivered at most once"


def test_presence_lists_a_connected_diner_and_kitchen_client(start_gateway):
    gw_proc = start_gateway({"WSGATEWAY_API_KEY": API_KEY, "WSGATEWAY_NODE_NAME": "py-presence-node"})
    ids = unique_ids()
    tenant, branch = ids["tenant"], ids["branch"]
    gw = Gateway(gw_proc.url, API_KEY)
    assert gw.presence(tenant, branch) == []
    table_token = mint_table_token(TABLE_SECRET, tenant, branch, ids["table"], ids["session"])
    kitchen_token = staff_token(9, tenant, [branch], ["KITCHEN"])
    before = int(time.time() * 1000)
    with connect_staff(gw_proc, "kitchen", kitchen_token):
        with connect_diner(gw_proc, table_token):
            conns = wait_for(lambda: (c := gw.presence(tenant, branch)) and len(c) == 2 and c, "two connections listed")
            kitchen, diner = conns
            assert kitchen.endpoint == "kitchen" and kitchen.user_id == 9
            assert kitchen.session_id is None and kitchen.table_id is None and kitchen.sector_ids is None
            assert diner.endpoint == "diner" and diner.session_id == ids["session"] and diner.table_id == ids["table"]
            assert diner.user_id is None
            assert all(c.node == "py-presence-node" for c in conns)
            assert before - 1000 <= kitchen.connected_at <= diner.connected_at <= int(time.time() * 1000) + 1000
            assert kitchen.id != diner.id
            # Another branch, another tenant: not listed.
            assert gw.presence(tenant, branch + 1) == []
            assert gw.presence(tenant + 1, branch) == []
            import asyncio

            assert asyncio.run(AsyncGateway(gw_proc.url, API_KEY).presence(tenant, branch)) == conns
        # A closed connection leaves the list at once.
        left = wait_for(lambda: (c := gw.presence(tenant, branch)) is not None and len(c) == 1 and c, "the diner gone")
        assert left[0].endpoint == "kitchen"
    wait_for(lambda: gw.presence(tenant, branch) == [], "both gone")


def test_presence_refusals(gateway, start_gateway):
    with pytest.raises(Unauthorized):
        Gateway(gateway.url, "not-the-key").presence(1, 5)
    gw = Gateway(gateway.url, API_KEY)
    with pytest.raises(InvalidQuery) as info:
        gw._presence_attempt("?tenant_id=1&branch_id=five")
    assert info.value.status == 400 and info.value.code == "invalid_query"
    with pytest.raises(InvalidQuery):
        gw._presence_attempt("?tenant_id=1")
    off = start_gateway({})
    with pytest.raises(PresenceDisabled) as info:
        Gateway(off.url, API_KEY).presence(1, 5)
    assert isinstance(info.value, PublishDisabled) and info.value.status == 404


def test_presence_unavailable_when_redis_cannot_be_read(start_gateway):
    redis = RedisProc().start()
    try:
        gw_proc = start_gateway(
            {
                "WSGATEWAY_API_KEY": API_KEY,
                "REDIS_URL": redis.url,
                "WSGATEWAY_REDIS_TIMEOUT_S": "0.5",
                "WSGATEWAY_REDIS_RETRY_BASE_S": "0.05",
                "WSGATEWAY_REDIS_RETRY_MAX_S": "0.3",
            }
        )
        gw = Gateway(gw_proc.url, API_KEY, retries=0, timeout=10)
        assert gw.presence(1, 5) == []
        redis.stop()
        with pytest.raises(PresenceUnavailable) as info:
            gw.presence(1, 5)
        assert info.value.status == 503 and info.value.retryable
    finally:
        redis.stop()
