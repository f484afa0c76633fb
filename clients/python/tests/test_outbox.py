"""The outbox helpers on a real PostgreSQL, for psycopg 3 (sync and async)
and asyncpg: one INSERT in the caller's transaction, gone after a rollback."""

import asyncio
import json

import asyncpg
import psycopg
import pytest

from conftest import DATABASE_URL
from wsgateway import OutboxError, add_outbox_row, add_outbox_row_async, add_outbox_row_asyncpg
from wsgateway.outbox import quote_table

EVENT = {"type": "ROUND_SUBMITTED", "tenant_id": 1, "branch_id": 5, "session_id": 77, "entity": {"round_id": 981}}
CHANNELS = ["channel:branch:5:kitchen", "channel:session:77"]


def rows(table, event_id):
    """Committed rows with this id, seen from another connection."""
    with psycopg.connect(DATABASE_URL) as other:
        return other.execute(
            f"SELECT channels, event, event_id FROM {table} WHERE event_id = %s", (event_id,)
        ).fetchall()


def check_row(row, event_id, channels=CHANNELS, event=EVENT):
    got_channels, got_event, got_id = row
    assert got_channels == channels
    assert got_id == event_id
    assert got_event == {**event, "event_id": event_id}, "a jsonb object, with the id in it"


# --- psycopg, sync ----------------------------------------------------------

def test_psycopg_row_in_the_transaction_commit_and_rollback(outbox_table):
    with psycopg.connect(DATABASE_URL) as conn:
        with conn.transaction():
            conn.execute("SELECT 1")  # the caller's own work
            committed = add_outbox_row(conn, CHANNELS, EVENT, table=outbox_table)
            assert committed.startswith("evt-")
            [row] = conn.execute(f"SELECT channels, event, event_id FROM {outbox_table} WHERE event_id = %s", (committed,)).fetchall()
            check_row(row, committed)
            assert rows(outbox_table, committed) == [], "not visible before the commit"
        assert len(rows(outbox_table, committed)) == 1

        with pytest.raises(RuntimeError):
            with conn.transaction():
                with conn.cursor() as cur:  # a cursor works too
                    rolled = add_outbox_row(cur, "channel:branch:5:waiters", {**EVENT, "type": "ROUND_READY"},
                                            event_id="order-981-ready", table=outbox_table)
                raise RuntimeError("the order could not be written")
        assert rolled == "order-981-ready"
        assert rows(outbox_table, rolled) == []


def test_psycopg_non_autocommit_connection_and_the_transaction_check(outbox_table):
    with psycopg.connect(DATABASE_URL) as conn:  # not autocommit: execute() opens a transaction
        the_id = add_outbox_row(conn, CHANNELS, EVENT, table=outbox_table)
        conn.rollback()
        assert rows(outbox_table, the_id) == []
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        with pytest.raises(OutboxError, match="autocommit"):
            add_outbox_row(conn, CHANNELS, EVENT, table=outbox_table)
        alone = add_outbox_row(conn, CHANNELS, EVENT, table=outbox_table, require_transaction=False)
        assert len(rows(outbox_table, alone)) == 1


# --- psycopg, async ---------------------------------------------------------

def test_psycopg_async_row_commit_and_rollback(outbox_table):
    async def main():
        async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
            async with conn.transaction():
                committed = await add_outbox_row_async(conn, CHANNELS, EVENT, table=outbox_table, event_id="order-982")
                cur = await conn.execute(f"SELECT channels, event, event_id FROM {outbox_table} WHERE event_id = %s", (committed,))
                check_row(await cur.fetchone(), "order-982")
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    async with conn.cursor() as cur:
                        rolled = await add_outbox_row_async(cur, CHANNELS, EVENT, table=outbox_table)
                    raise RuntimeError("rollback")
            with pytest.raises(OutboxError, match="autocommit"):
                await add_outbox_row_async(conn, CHANNELS, EVENT, table=outbox_table)
            return committed, rolled

    committed, rolled = asyncio.run(main())
    assert len(rows(outbox_table, committed)) == 1
    assert rows(outbox_table, rolled) == []


# --- asyncpg ----------------------------------------------------------------

def test_asyncpg_row_commit_and_rollback(outbox_table):
    async def main():
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            async with conn.transaction():
                committed = await add_outbox_row_asyncpg(conn, CHANNELS, EVENT, table=outbox_table)
                row = await conn.fetchrow(f"SELECT channels, event::text AS event, event_id FROM {outbox_table} WHERE event_id = $1", committed)
                check_row((row["channels"], json.loads(row["event"]), row["event_id"]), committed)
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    rolled = await add_outbox_row_asyncpg(conn, CHANNELS, EVENT, table=outbox_table)
                    raise RuntimeError("rollback")
            with pytest.raises(OutboxError, match="not in a transaction"):
                await add_outbox_row_asyncpg(conn, CHANNELS, EVENT, table=outbox_table)
            return committed, rolled
        finally:
            await conn.close()

    committed, rolled = asyncio.run(main())
    assert len(rows(outbox_table, committed)) == 1
    assert rows(outbox_table, rolled) == []


def test_asyncpg_with_a_jsonb_codec_still_stores_an_object(outbox_table):
    async def main():
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            # A common application setup: jsonb as Python objects.
            await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
            async with conn.transaction():
                return await add_outbox_row_asyncpg(conn, CHANNELS, EVENT, table=outbox_table)
        finally:
            await conn.close()

    the_id = asyncio.run(main())
    [row] = rows(outbox_table, the_id)
    check_row(row, the_id)


# --- refused before any SQL ---------------------------------------------------

class NoSql:
    """A connection that fails the test if anything reaches it."""

    autocommit = False

    def execute(self, *args, **kwargs):
        raise AssertionError(f"SQL was run: {args}")

    def is_in_transaction(self):
        return True


@pytest.mark.parametrize(
    "table",
    ["", "wsgateway_outbox; DROP TABLE x", 'a"b', "app.outbox.more", "App.Outbox", "1table",
     "a b", ".outbox", "outbox.", "x" * 64, "public.wsgateway-outbox"],
)
def test_bad_table_names_are_refused_before_any_sql(table):
    with pytest.raises(OutboxError, match="table"):
        add_outbox_row(NoSql(), CHANNELS, EVENT, table=table)
    with pytest.raises(OutboxError, match="table"):
        asyncio.run(add_outbox_row_async(NoSql(), CHANNELS, EVENT, table=table))
    with pytest.raises(OutboxError, match="table"):
        asyncio.run(add_outbox_row_asyncpg(NoSql(), CHANNELS, EVENT, table=table))


def test_good_table_names_are_quoted():
    assert quote_table("wsgateway_outbox") == '"wsgateway_outbox"'
    assert quote_table("app.wsgateway_outbox") == '"app"."wsgateway_outbox"'


@pytest.mark.parametrize(
    "channels, event, why",
    [
        ([], EVENT, "channels"),
        (["channel:nope"], EVENT, "unknown channel"),
        ([5], EVENT, "unknown channel"),
        (["channel:branch:05:waiters"], EVENT, "unknown channel"),
        (["channel:branch:6:waiters"], EVENT, "branch_id differs"),
        (["channel:session:78"], EVENT, "session_id differs"),
        (["channel:sector:5:3:waiters"], {**EVENT, "sector_id": 4}, "sector_id differs"),
        (CHANNELS, {"tenant_id": 1, "branch_id": 5}, "type"),
        (CHANNELS, {**EVENT, "type": "resync"}, "reserved"),
        (CHANNELS, {**EVENT, "tenant_id": "1"}, "tenant_id"),
        (CHANNELS, {**EVENT, "branch_id": True}, "branch_id"),
        (CHANNELS, {**EVENT, "entity": {1, 2}}, "JSON"),
        (CHANNELS, {**EVENT, "event_id": ""}, "event_id"),
        (CHANNELS, "not a dict", "dict"),
    ],
)
def test_bad_rows_are_refused_before_any_sql(channels, event, why):
    with pytest.raises(OutboxError, match=why):
        add_outbox_row(NoSql(), channels, event)


def test_a_contradicting_event_id_is_refused():
    with pytest.raises(OutboxError, match="differs"):
        add_outbox_row(NoSql(), CHANNELS, {**EVENT, "event_id": "a"}, event_id="b")
