"""Table tokens for diners (docs/PROTOCOL.md §3, "Table token").

An HS256 JWT signed with the gateway's ``TABLE_TOKEN_SECRET``, with the
integer claims ``tenant_id``, ``branch_id``, ``table_id``, ``session_id``,
and ``exp`` (Unix seconds); ``iat`` is added for the record (the gateway
ignores it). ``iss`` and ``aud`` are not checked on table tokens, so none
is set. The diner connects to ``/ws/diner?table_token=<token>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, Dict, Optional

__all__ = ["mint_table_token", "table_token_claims"]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
#: The gateway refuses a token longer than this (4001).
MAX_TOKEN_BYTES = 8192


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int(name: str, value: Any) -> int:
    # bool is an int in Python, but `true` is not an integer in JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not _I64_MIN <= value <= _I64_MAX:
        raise ValueError(f"{name} does not fit a signed 64-bit integer")
    return value


def table_token_claims(
    tenant_id: int,
    branch_id: int,
    table_id: int,
    session_id: int,
    *,
    ttl_s: int = 3600,
    now: Optional[int] = None,
) -> Dict[str, int]:
    """The claims :func:`mint_table_token` signs."""
    issued = int(time.time()) if now is None else _int("now", now)
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int):
        raise TypeError("ttl_s must be an int (seconds)")
    return {
        "tenant_id": _int("tenant_id", tenant_id),
        "branch_id": _int("branch_id", branch_id),
        "table_id": _int("table_id", table_id),
        "session_id": _int("session_id", session_id),
        "iat": issued,
        "exp": issued + ttl_s,
    }


def mint_table_token(
    secret: str,
    tenant_id: int,
    branch_id: int,
    table_id: int,
    session_id: int,
    *,
    ttl_s: int = 3600,
    now: Optional[int] = None,
) -> str:
    """A diner's table token, valid ``ttl_s`` seconds from ``now`` (default:
    the current time). Give it a life at least as long as the table session
    is likely to last, or hand the diner's app a fresh one before ``exp``:
    the gateway closes a connection whose token has expired (4001).

    An empty secret is refused, as ``wsgateway token`` refuses it: a token
    signed with it would be valid for nobody (or for everybody, if the
    gateway were misconfigured the same way)."""
    if not isinstance(secret, (str, bytes)) or not secret.strip():
        raise ValueError("secret is empty (is TABLE_TOKEN_SECRET set?)")
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    claims = table_token_claims(
        tenant_id, branch_id, table_id, session_id, ttl_s=ttl_s, now=now
    )
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode("ascii")
    signature = _b64url(hmac.new(key, signing_input, hashlib.sha256).digest())
    return f"{head}.{body}.{signature}"
