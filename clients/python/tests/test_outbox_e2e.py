"""End to end: the gateway consumes the outbox (WSGATEWAY_OUTBOX_TABLE,
DATABASE_URL): a row committed with the helpers reaches a diner's
WebSocket, a rolled-back one never does.

Needs the gateway's outbox consumer (issue #32); against a gateway without
it, this test fails: the committed row is never published."""

import asyncio
import json
import secrets
import subprocess

import asyncpg
import psycopg
import pytest

from conftest import (
    API_KEY,
    DATABASE_URL,
    OUTBOX_DDL,
    TABLE_SECRET,
    connect_diner,
    gateway_bin,
    no_more_events,
    recv_events,
    unique_ids,
)
from wsgateway import add_outbox_row, add_outbox_row_asyncpg, mint_table_token


@pytest.fixture
def consumed_table():
    """A schema of this test's own, with the table `wsgateway outbox schema`
    makes (its output is applied when it prints SQL), dropped after."""
    schema = f"wsgw_py_e2e_{secrets.token_hex(6)}"
    table = f"{schema}.wsgateway_outbox"
    env = {"PATH": "/usr/bin:/bin", "WSGATEWAY_OUTBOX_TABLE": table, "DATABASE_URL": DATABASE_URL}
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        made = subprocess.run([gateway_bin(), "outbox", "schema"], env=env, capture_output=True, text=True, timeout=30)
        if made.returncode == 0 and "CREATE" in made.stdout.upper():
            conn.execute(made.stdout)  # the table and its NOTIFY trigger
        conn.execute(OUTBOX_DDL.format(table=table))  # a no-op when the command made it
    yield table
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def test_committed_rows_reach_the_diner_and_rolled_back_ones_never(start_gateway, consumed_table):
    gw = start_gateway(
        {"WSGATEWAY_API_KEY": API_KEY, "WSGATEWAY_OUTBOX_TABLE": consumed_table, "DATABASE_URL": DATABASE_URL}
    )
    ids = unique_ids()
    channel = f"channel:session:{ids['session']}"

    def event(kind):
        return {"type": kind, "tenant_id": ids["tenant"], "branch_id": ids["branch"], "session_id": ids["session"]}

    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    with connect_diner(gw, token) as (ws, _):
        with psycopg.connect(DATABASE_URL) as conn:
            with conn.transaction():
                committed = add_outbox_row(conn, channel, event("ROUND_SUBMITTED"), table=consumed_table)
            with pytest.raises(RuntimeError):
                with conn.transaction():
                    rolled_back = add_outbox_row(conn, channel, event("ROUND_CANCELLED"), table=consumed_table)
                    raise RuntimeError("rollback")

        async def asyncpg_row():
            conn = await asyncpg.connect(DATABASE_URL)
            try:
                async with conn.transaction():
                    return await add_outbox_row_asyncpg(conn, [channel], event("ROUND_READY"), table=consumed_table)
            finally:
                await conn.close()

        last = asyncio.run(asyncpg_row())
        try:
            evs = recv_events(ws, lambda evs: any(e.get("event_id") == last for e in evs), timeout_s=10)
        except AssertionError as e:
            raise AssertionError(f"{e}\ngateway log:\n{gw.log_text()}") from None
        assert [e["event_id"] for e in evs] == [committed, last]
        assert [e["type"] for e in evs] == ["ROUND_SUBMITTED", "ROUND_READY"]
        assert rolled_back not in [e["event_id"] for e in no_more_events(ws, 0.3)]


def test_a_row_with_ack_within_s_reaches_the_diner_asking_for_an_ack(start_gateway, consumed_table):
    gw = start_gateway(
        {"WSGATEWAY_API_KEY": API_KEY, "WSGATEWAY_OUTBOX_TABLE": consumed_table, "DATABASE_URL": DATABASE_URL}
    )
    ids = unique_ids()
    channel = f"channel:session:{ids['session']}"
    event = {"type": "PAYMENT_APPROVED", "tenant_id": ids["tenant"], "branch_id": ids["branch"], "session_id": ids["session"]}
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    with connect_diner(gw, token) as (ws, _):
        with psycopg.connect(DATABASE_URL) as conn:
            with conn.transaction():
                asked = add_outbox_row(conn, channel, event, table=consumed_table, ack_within_s=1)
        try:
            [got] = recv_events(ws, lambda evs: len(evs) >= 1, timeout_s=10)
        except AssertionError as e:
            raise AssertionError(f"{e}\ngateway log:\n{gw.log_text()}") from None
        assert got["event_id"] == asked and got["ack"] == {"within_s": 1}
        # Not acknowledged: the one redelivery follows, with redelivered: true.
        [again] = recv_events(ws, lambda evs: len(evs) >= 1, timeout_s=10)
        assert again["event_id"] == asked and again["redelivered"] is True
        ws.send(json.dumps({"type": "ack", "event_ids": [asked]}))
