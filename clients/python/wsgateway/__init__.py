"""Backend helpers for the wsgateway WebSocket notification gateway.

- :class:`Gateway` / :class:`AsyncGateway`: ``POST /api/publish`` with
  retries that reuse each event's id (docs/PROTOCOL.md §10), optionally
  asking for acknowledgements (``ack_within_s``), and ``GET
  /api/presence`` (who is connected to a branch);
- :mod:`wsgateway.errors`: one exception class per documented answer;
- :func:`mint_table_token`: diners' table tokens (§3);
- :func:`add_outbox_row` and friends: an outbox row in the caller's own
  transaction, for psycopg 3 and asyncpg.

No runtime dependency beyond the standard library.
"""

from .client import AsyncGateway, Gateway, PresenceConnection, PublishResult, RetryInfo, new_event_id
from . import errors
from .errors import *  # noqa: F401,F403 (one class per documented answer: errors.__all__)
from .outbox import OutboxError, add_outbox_row, add_outbox_row_async, add_outbox_row_asyncpg
from .tokens import mint_table_token

__version__ = "0.1.0"

__all__ = [
    "AsyncGateway",
    "Gateway",
    "PublishResult",
    "PresenceConnection",
    "RetryInfo",
    "new_event_id",
    *[name for name in errors.__all__ if name != "error_from_response"],
    "mint_table_token",
    "add_outbox_row",
    "add_outbox_row_async",
    "add_outbox_row_asyncpg",
    "OutboxError",
]
