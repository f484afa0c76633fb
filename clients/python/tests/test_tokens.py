"""Table tokens minted here are what the gateway accepts (docs/PROTOCOL.md §3)."""

import base64
import json
import subprocess
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from conftest import API_KEY, TABLE_SECRET, connect_diner, gateway_bin, recv_events, unique_ids
from wsgateway import Gateway, mint_table_token
from wsgateway.tokens import table_token_claims


def payload(token):
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_a_minted_token_is_accepted_with_its_claims(gateway):
    ids = unique_ids()
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"], ttl_s=600)
    with connect_diner(gateway, token) as (_, frame):
        assert frame["endpoint"] == "diner"
        assert (frame["tenant_id"], frame["branch_id"], frame["table_id"], frame["session_id"]) == (
            ids["tenant"], ids["branch"], ids["table"], ids["session"])


def test_a_diner_receives_what_publish_sends_on_its_session(gateway):
    ids = unique_ids()
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    with connect_diner(gateway, token) as (ws, _):
        gw = Gateway(gateway.url, API_KEY)
        # Another session's event, then ours: only ours arrives.
        gw.publish(f"channel:session:{ids['session'] + 1}", {"type": "ROUND_READY", "tenant_id": 1, "branch_id": ids["branch"]})
        sent = gw.publish(f"channel:session:{ids['session']}",
                          {"type": "ROUND_READY", "tenant_id": 1, "branch_id": ids["branch"], "session_id": ids["session"]})
        [got] = recv_events(ws, lambda evs: len(evs) >= 1)
        assert got["event_id"] == sent.event_id and got["session_id"] == ids["session"]


def refused_code(gateway, token):
    with connect(f"{gateway.ws_url}/ws/diner?table_token={token}", open_timeout=10) as ws:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                frame = json.loads(ws.recv(timeout=10))
                assert frame["type"] != "connected", f"accepted: {frame}"
    return info.value.rcvd.code


def test_expired_and_wrongly_signed_tokens_are_refused_with_4001(gateway):
    ids = unique_ids()
    args = (ids["tenant"], ids["branch"], ids["table"], ids["session"])
    # Expired a minute ago: beyond the gateway's leeway (5 s by default).
    expired = mint_table_token(TABLE_SECRET, *args, ttl_s=60, now=int(time.time()) - 120)
    assert refused_code(gateway, expired) == 4001
    assert refused_code(gateway, mint_table_token("another-secret", *args)) == 4001
    # The staff secret is not the table secret.
    assert refused_code(gateway, mint_table_token("py-test-jwt-secret", *args)) == 4001


def test_the_claims_are_those_of_wsgateway_token_table():
    now = int(time.time())
    cli = subprocess.run(
        [gateway_bin(), "token", "table", "--secret", "s", "--tenant", "1", "--branch", "5",
         "--table", "12", "--session", "77", "--ttl-s", "600"],
        check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    theirs = payload(cli)
    ours = payload(mint_table_token("s", 1, 5, 12, 77, ttl_s=600, now=now))
    assert {k: v for k, v in ours.items() if k != "iat"} == {**theirs, "exp": now + 600}
    assert abs(theirs["exp"] - (now + 600)) <= 5
    head = json.loads(base64.urlsafe_b64decode(mint_table_token("s", 1, 5, 12, 77).split(".")[0] + "=="))
    assert head == {"alg": "HS256", "typ": "JWT"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        mint_table_token("", 1, 5, 12, 77)
    with pytest.raises(ValueError):
        mint_table_token("   ", 1, 5, 12, 77)
    with pytest.raises(TypeError):
        mint_table_token("s", True, 5, 12, 77)
    with pytest.raises(TypeError):
        mint_table_token("s", 1, "5", 12, 77)
    with pytest.raises(ValueError):
        mint_table_token("s", 1, 5, 12, 2**63)
    assert table_token_claims(1, 5, 12, 77, ttl_s=10, now=100) == {
        "tenant_id": 1, "branch_id": 5, "table_id": 12, "session_id": 77, "iat": 100, "exp": 110}
