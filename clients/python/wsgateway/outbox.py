"""Transactional outbox rows: an event is published if, and only if, the
caller's transaction commits.

The gateway consumes a table created by ``wsgateway outbox schema``::

    CREATE TABLE IF NOT EXISTS wsgateway_outbox (
        id bigserial PRIMARY KEY,
        channels text[] NOT NULL,
        event jsonb NOT NULL,
        event_id text,
        created_at timestamptz NOT NULL DEFAULT now()
    );

Each helper runs ONE parameterized ``INSERT`` on the connection it is given,
in that connection's current transaction: it never commits, never rolls
back, never opens a connection. The drivers are not imported here; the
helper only calls the connection's own ``execute``:

- :func:`add_outbox_row`: a psycopg 3 ``Connection`` or ``Cursor`` (sync);
- :func:`add_outbox_row_async`: a psycopg 3 ``AsyncConnection`` or ``AsyncCursor``;
- :func:`add_outbox_row_asyncpg`: an asyncpg ``Connection`` (or pool connection).

Checks done locally, before any SQL, are the cheap ones (the table name,
channel names, the event's required fields and its agreement with the
channels); the gateway checks everything again and sets an invalid row
aside instead of publishing it.
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from .client import check_ack_within_s, new_event_id

__all__ = [
    "add_outbox_row",
    "add_outbox_row_async",
    "add_outbox_row_asyncpg",
    "OutboxError",
    "quote_table",
]

DEFAULT_TABLE = "wsgateway_outbox"


class OutboxError(ValueError):
    """A row refused before any SQL: a bad table name, channel or event,
    or (with ``require_transaction``) no open transaction."""


# Lower-case unquoted identifiers only: quoted or not, they name the same
# table, so this helper and the gateway (WSGATEWAY_OUTBOX_TABLE) cannot
# disagree about case folding.
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")

_ID = r"(0|[1-9][0-9]{0,18})"
_CHANNEL = re.compile(
    r"channel:(?:"
    rf"branch:(?P<b>{_ID}):(?:waiters|kitchen|admin)"
    rf"|sector:(?P<sb>{_ID}):(?P<s>{_ID}):waiters"
    rf"|session:(?P<session>{_ID})"
    rf"|user:{_ID}"
    r"|tenant:staff"
    r")\Z"
)
_I64_MAX = 2**63 - 1
_RESERVED_TYPES = frozenset(
    {"connected", "pong", "error", "resync", "token_refreshed", "sectors_updated"}
)
MAX_EVENT_ID_BYTES = 128


def quote_table(table: str) -> str:
    """``name`` or ``schema.name``, each part a lower-case identifier
    (letters, digits, ``_``; at most 63), as a quoted SQL name."""
    if not isinstance(table, str):
        raise OutboxError("table must be a str")
    parts = table.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise OutboxError(
            f"bad outbox table name {table!r}: expected identifier or schema.identifier, "
            "lower-case letters, digits and _ (at most 63 each, not starting with a digit)"
        )
    return ".".join(f'"{p}"' for p in parts)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v <= _I64_MAX


def _check(
    channels: Union[str, Sequence[str]],
    event: Mapping[str, Any],
    event_id: Optional[str],
    ack_within_s: Optional[int] = None,
) -> Tuple[List[str], str, str]:
    if isinstance(channels, str):
        channels = [channels]
    if not isinstance(channels, (list, tuple)) or not channels:
        raise OutboxError("channels must be a channel name or a non-empty list of them")
    if not isinstance(event, Mapping):
        raise OutboxError("event must be a dict")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise OutboxError("the event needs a non-empty str `type`")
    if kind in _RESERVED_TYPES:
        raise OutboxError(f"the event's type {kind!r} is reserved for the gateway's own frames")
    for field in ("tenant_id", "branch_id"):
        if not _is_int(event.get(field)):
            raise OutboxError(f"the event needs an int `{field}`")
    for field in ("sector_id", "session_id", "table_id"):
        if event.get(field) is not None and not _is_int(event[field]):
            raise OutboxError(f"the event's `{field}` must be an int when present")
    for name in channels:
        m = _CHANNEL.match(name) if isinstance(name, str) else None
        if m is None:
            raise OutboxError(f"unknown channel {name!r}")
        branch = m.group("b") or m.group("sb")
        if branch is not None and int(branch) != event["branch_id"]:
            raise OutboxError(f"the event's branch_id differs from its channel's ({name})")
        if m.group("s") is not None and event.get("sector_id") is not None and int(m.group("s")) != event["sector_id"]:
            raise OutboxError(f"the event's sector_id differs from its channel's ({name})")
        if m.group("session") is not None and event.get("session_id") is not None and int(m.group("session")) != event["session_id"]:
            raise OutboxError(f"the event's session_id differs from its channel's ({name})")

    given = event.get("event_id")
    if event_id is not None and given is not None and given != event_id:
        raise OutboxError(f"event_id={event_id!r} differs from the event's own event_id {given!r}")
    the_id = event_id if event_id is not None else (given if given is not None else new_event_id())
    if not isinstance(the_id, str) or not the_id or len(the_id.encode("utf-8")) > MAX_EVENT_ID_BYTES:
        raise OutboxError(f"event_id must be a non-empty str of at most {MAX_EVENT_ID_BYTES} bytes")
    row_event = dict(event)
    row_event["event_id"] = the_id
    if ack_within_s is not None:
        check_ack_within_s(ack_within_s, OutboxError)
        if "ack" in event:
            raise OutboxError("ack_within_s is given and the event has its own `ack`: give one of them")
        # The outbox takes the event-level field (the row has no item around the event).
        row_event["ack"] = {"within_s": ack_within_s}
    try:
        text = json.dumps(row_event, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise OutboxError(f"the event is not JSON-serializable: {e}") from e
    return list(channels), text, the_id


# `::text::jsonb`: the event is sent as text and parsed by PostgreSQL, so
# that a jsonb codec registered on the connection (asyncpg's set_type_codec,
# a psycopg Jsonb dumper) never encodes it a second time.
def _sql(table: str, placeholders: Tuple[str, str, str]) -> str:
    a, b, c = placeholders
    return f"INSERT INTO {quote_table(table)} (channels, event, event_id) VALUES ({a}::text[], {b}::text::jsonb, {c}::text)"


def _psycopg_connection(conn: Any) -> Any:
    return getattr(conn, "connection", conn)


def _psycopg_check_transaction(conn: Any) -> None:
    c = _psycopg_connection(conn)
    # autocommit with no BEGIN (no `with conn.transaction():`): the INSERT
    # would commit by itself, whatever the caller's work does after it.
    status = getattr(getattr(c, "info", None), "transaction_status", None)
    if getattr(c, "autocommit", False) and status is not None and int(status) == 0:
        raise OutboxError(
            "the connection is in autocommit mode outside a transaction: the row would be "
            "committed on its own; use `with conn.transaction():` (or pass require_transaction=False)"
        )


def add_outbox_row(
    conn: Any,
    channels: Union[str, Sequence[str]],
    event: Mapping[str, Any],
    *,
    event_id: Optional[str] = None,
    table: str = DEFAULT_TABLE,
    require_transaction: bool = True,
    ack_within_s: Optional[int] = None,
) -> str:
    """Adds one outbox row with psycopg 3 (sync ``Connection`` or ``Cursor``)
    in the current transaction, and returns the event's id (``event_id``,
    else the event's own, else a generated one; it is also put in the
    stored event). Commit as usual: the gateway publishes the row after
    the commit, never after a rollback.

    With ``require_transaction`` (the default), an autocommit connection
    outside ``conn.transaction()`` is refused (the row would commit alone).

    ``ack_within_s`` (1..300) sets the stored event's ``"ack": {"within_s":
    N}``: the receiving clients are asked to acknowledge it within N
    seconds, or the gateway redelivers it once, then escalates.
    """
    sql = _sql(table, ("%s", "%s", "%s"))
    names, text, the_id = _check(channels, event, event_id, ack_within_s)
    if require_transaction:
        _psycopg_check_transaction(conn)
    conn.execute(sql, (names, text, the_id))
    return the_id


async def add_outbox_row_async(
    conn: Any,
    channels: Union[str, Sequence[str]],
    event: Mapping[str, Any],
    *,
    event_id: Optional[str] = None,
    table: str = DEFAULT_TABLE,
    require_transaction: bool = True,
    ack_within_s: Optional[int] = None,
) -> str:
    """:func:`add_outbox_row` for psycopg 3's ``AsyncConnection`` or ``AsyncCursor``."""
    sql = _sql(table, ("%s", "%s", "%s"))
    names, text, the_id = _check(channels, event, event_id, ack_within_s)
    if require_transaction:
        _psycopg_check_transaction(conn)
    await conn.execute(sql, (names, text, the_id))
    return the_id


async def add_outbox_row_asyncpg(
    conn: Any,
    channels: Union[str, Sequence[str]],
    event: Mapping[str, Any],
    *,
    event_id: Optional[str] = None,
    table: str = DEFAULT_TABLE,
    require_transaction: bool = True,
    ack_within_s: Optional[int] = None,
) -> str:
    """:func:`add_outbox_row` for an asyncpg ``Connection``. asyncpg runs
    each statement in its own transaction unless one is open, so with
    ``require_transaction`` (the default) a connection outside
    ``async with conn.transaction():`` is refused."""
    sql = _sql(table, ("$1", "$2", "$3"))
    names, text, the_id = _check(channels, event, event_id, ack_within_s)
    if require_transaction and not conn.is_in_transaction():
        raise OutboxError(
            "the asyncpg connection is not in a transaction: the row would be committed on "
            "its own; use `async with conn.transaction():` (or pass require_transaction=False)"
        )
    await conn.execute(sql, names, text, the_id)
    return the_id
