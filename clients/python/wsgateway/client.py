"""Publishing over the gateway's HTTP API (docs/PROTOCOL.md §10), and
reading who is connected (``GET /api/presence``).

Standard library only. Every event gets an ``event_id`` before the first
attempt (the caller's, or a generated one) and every retry sends the very
same body, so a retry after an unknown outcome (504, a timeout, a broken
connection) is de-duplicated by the gateway: published once, answered
``duplicate=True``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from .errors import GatewayConnectionError, GatewayError, error_from_response

__all__ = [
    "Gateway",
    "AsyncGateway",
    "PublishResult",
    "PresenceConnection",
    "RetryInfo",
    "new_event_id",
    "check_ack_within_s",
]

#: ``ack_within_s`` bounds (seconds), as the gateway checks them.
ACK_WITHIN_S_MIN, ACK_WITHIN_S_MAX = 1, 300

Channels = Union[str, Sequence[str]]
#: An item of ``publish_many``: ``(channels, event)``,
#: ``(channels, event, event_id)``, or a dict ``{"channel"|"channels": ..., "event": {...}}``.
Item = Union[
    Tuple[Channels, Mapping[str, Any]],
    Tuple[Channels, Mapping[str, Any], Optional[str]],
    Tuple[Channels, Mapping[str, Any], Optional[str], Optional[int]],
    Mapping[str, Any],
]


def new_event_id() -> str:
    """A fresh event id: ``"evt-"`` and 32 hex digits. It has non-digits,
    as the protocol asks of publishers' ids (a digits-only id could equal a
    number the gateway gives)."""
    return "evt-" + uuid.uuid4().hex


@dataclass(frozen=True)
class PublishResult:
    """One published item: its id, and whether the gateway had already
    published an event with that id (then nothing was published again)."""

    event_id: str
    duplicate: bool


@dataclass(frozen=True)
class PresenceConnection:
    """One connection of a branch, as ``GET /api/presence`` lists it.

    Staff (``waiter``, ``kitchen``, ``admin``) have ``user_id``; diners
    ``session_id`` and ``table_id``. ``sector_ids`` is a waiter's sectors,
    or ``None``. ``connected_at`` is Unix milliseconds; ``node`` the
    gateway node's name.
    """

    id: str
    endpoint: str
    connected_at: int
    node: str
    sector_ids: Optional[List[int]] = None
    user_id: Optional[int] = None
    session_id: Optional[int] = None
    table_id: Optional[int] = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "PresenceConnection":
        return cls(
            id=d["id"],
            endpoint=d["endpoint"],
            connected_at=d["connected_at"],
            node=d["node"],
            sector_ids=d.get("sector_ids"),
            user_id=d.get("user_id"),
            session_id=d.get("session_id"),
            table_id=d.get("table_id"),
        )


def check_ack_within_s(value: Any, error: type = ValueError) -> int:
    """``value`` when it is an int (not a bool) in 1..300, else raises
    ``error`` (the gateway would answer 400)."""
    if isinstance(value, bool) or not isinstance(value, int) or not ACK_WITHIN_S_MIN <= value <= ACK_WITHIN_S_MAX:
        raise error(
            f"ack_within_s must be an int from {ACK_WITHIN_S_MIN} to {ACK_WITHIN_S_MAX} (seconds), not {value!r}"
        )
    return value


def _with_ack(item: Dict[str, Any], ack_within_s: Optional[int]) -> Dict[str, Any]:
    """The item with ``"ack": {"within_s": N}`` when ``ack_within_s`` is given."""
    if ack_within_s is None:
        return item
    check_ack_within_s(ack_within_s)
    event = item.get("event")
    if isinstance(event, Mapping) and "ack" in event:
        raise ValueError("ack_within_s is given and the event has its own `ack`: give one of them")
    return {**item, "ack": {"within_s": ack_within_s}}


@dataclass(frozen=True)
class RetryInfo:
    """Given to ``on_retry`` before each retry."""

    attempt: int  # the attempt that failed, 1 for the first
    error: GatewayError
    delay_s: float  # the wait before the next attempt
    event_ids: List[str]  # the ids the retry sends again, unchanged


def _with_id(event: Mapping[str, Any], event_id: Optional[str]) -> Dict[str, Any]:
    if not isinstance(event, Mapping):
        # Sent as is: the gateway answers 400 invalid_event, typed.
        return event  # type: ignore[return-value]
    copy = dict(event)
    given = copy.get("event_id")
    if event_id is not None and given is not None and given != event_id:
        raise ValueError(
            f"event_id={event_id!r} differs from the event's own event_id {given!r}"
        )
    copy["event_id"] = event_id if event_id is not None else (given if given is not None else new_event_id())
    return copy


def _channels_field(channels: Channels) -> Dict[str, Any]:
    if isinstance(channels, str):
        return {"channel": channels}
    return {"channels": list(channels)}


def _build_item(item: Item) -> Dict[str, Any]:
    if isinstance(item, Mapping):
        # Sent as given (an unexpected field is the gateway's to refuse,
        # 400 invalid_body), with the event's id set, and `ack_within_s`
        # turned into the item's `ack`.
        out = dict(item)
        ack_within_s = out.pop("ack_within_s", None)
        if ack_within_s is not None and "ack" in out:
            raise ValueError("an item with both `ack_within_s` and `ack`: give one of them")
        if "event" in out:
            out["event"] = _with_id(out["event"], None)
        return _with_ack(out, ack_within_s)
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3, 4):
        raise TypeError(
            "an item is (channels, event), (channels, event, event_id), "
            "(channels, event, event_id, ack_within_s) or a dict"
        )
    channels, event = item[0], item[1]
    event_id = item[2] if len(item) >= 3 else None
    ack_within_s = item[3] if len(item) == 4 else None
    return _with_ack({**_channels_field(channels), "event": _with_id(event, event_id)}, ack_within_s)


def _presence_query(tenant_id: int, branch_id: int) -> str:
    for name, value in (("tenant_id", tenant_id), ("branch_id", branch_id)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, not {value!r}")
    return "?" + urllib.parse.urlencode({"tenant_id": tenant_id, "branch_id": branch_id})


def _parse_presence(status: int, payload: bytes) -> List[PresenceConnection]:
    try:
        answer = json.loads(payload)
        return [PresenceConnection.from_json(c) for c in answer["connections"]]
    except (ValueError, KeyError, TypeError) as e:
        raise GatewayError(f"a {status} with an unexpected body: {payload[:200]!r}", status=status) from e


def _ids_of(items: List[Dict[str, Any]]) -> List[str]:
    ids = []
    for it in items:
        ev = it.get("event")
        ids.append(ev.get("event_id") if isinstance(ev, dict) else None)
    return ids


def _encode(items: List[Dict[str, Any]], batch: bool) -> Tuple[bytes, List[str]]:
    """The request body every attempt sends, and the items' event ids."""
    payload = items if batch else items[0]
    return json.dumps(payload, separators=(",", ":")).encode("utf-8"), _ids_of(items)


class _Base:
    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 5.0,
        on_retry: Optional[Callable[[RetryInfo], None]] = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url must be the gateway's http:// or https:// base URL")
        if not api_key or not api_key.strip():
            raise ValueError("api_key is empty (is WSGATEWAY_API_KEY set?)")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        self.base_url = url.rstrip("/")
        self.endpoint = self.base_url + "/api/publish"
        self.presence_endpoint = self.base_url + "/api/presence"
        self.api_key = api_key.strip()
        self.timeout = timeout
        self.retries = retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.on_retry = on_retry

    def _delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2^(attempt-1))]."""
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling)

    def _request(self, url: str, body: Optional[bytes], ids: List[str]) -> Tuple[int, bytes]:
        """One request (POST with a body, else GET). Returns (status,
        payload) of a 2xx answer, or raises a GatewayError."""
        headers = {"Authorization": f"Bearer {self.api_key}", "User-Agent": "wsgateway-python/0.1.0"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            url, data=body, method="POST" if body is not None else "GET", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            try:
                payload = e.read()
            except (OSError, http.client.HTTPException):
                payload = b""
            raise error_from_response(e.code, payload, ids) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, socket.timeout) as e:
            reason = getattr(e, "reason", e)
            raise GatewayConnectionError(
                f"no answer from {url.split('?')[0]}: {reason}", event_ids=ids
            ) from e

    def _presence_attempt(self, query: str) -> List[PresenceConnection]:
        status, payload = self._request(self.presence_endpoint + query, None, [])
        if status != 200:
            raise error_from_response(status, payload)
        return _parse_presence(status, payload)

    def _attempt(self, body: bytes, ids: List[str]) -> List[PublishResult]:
        """One POST. Returns the results, or raises a GatewayError."""
        status, payload = self._request(self.endpoint, body, ids)
        if status != 202:
            raise error_from_response(status, payload, ids)
        try:
            answer = json.loads(payload)
            results = [
                PublishResult(str(i), bool(d))
                for i, d in zip(answer["event_ids"], answer["duplicates"])
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise GatewayError(
                f"a 202 with an unexpected body: {payload[:200]!r}", status=status, event_ids=ids
            ) from e
        return results


class Gateway(_Base):
    """Publishes through ``POST {url}/api/publish``.

    ``retries`` is the number of retries after the first attempt; only a 503,
    a 504, a refused or broken connection and a timeout are retried, after a
    full-jitter delay of at most ``min(backoff_max_s, backoff_initial_s *
    2^(n-1))`` for retry n. ``on_retry(RetryInfo)`` is called before each
    retry's wait. Any other answer raises its error (errors.py) at once.
    """

    def publish(
        self,
        channels: Channels,
        event: Mapping[str, Any],
        event_id: Optional[str] = None,
        *,
        ack_within_s: Optional[int] = None,
    ) -> PublishResult:
        """One event on one channel (a ``str``) or several (a list, one
        event id for all). ``event_id`` (or the event's own ``event_id``) is
        kept; without either, one is generated. The caller's dict is not
        changed. ``ack_within_s`` (1..300) asks the receiving clients for an
        acknowledgement within that many seconds: without one, the gateway
        redelivers the event once, then escalates to the branch's admins."""
        item = _with_ack({**_channels_field(channels), "event": _with_id(event, event_id)}, ack_within_s)
        return self._send([item])[0]

    def publish_many(self, items: Iterable[Item]) -> List[PublishResult]:
        """Several items in one request (all published, in order, or none).
        Returns one result per item, in order; an empty ``items`` sends
        nothing and returns ``[]``."""
        built = [_build_item(i) for i in items]
        if not built:
            return []
        return self._send(built, batch=True)

    def presence(self, tenant_id: int, branch_id: int) -> List[PresenceConnection]:
        """Who is connected to a branch, on every node (``GET
        /api/presence``), ordered by ``connected_at``. Retried like a
        publish (a 503 ``presence_unavailable``, no answer)."""
        query = _presence_query(tenant_id, branch_id)
        return self._retrying(lambda: self._presence_attempt(query), [])

    def _send(self, items: List[Dict[str, Any]], batch: bool = False) -> List[PublishResult]:
        body, ids = _encode(items, batch)
        return self._retrying(lambda: self._attempt(body, ids), ids)

    def _retrying(self, call: Callable[[], Any], ids: List[str]) -> Any:
        attempt = 1
        while True:
            try:
                return call()
            except GatewayError as e:
                if not e.retryable or attempt > self.retries:
                    raise
                delay = self._delay(attempt)
                if self.on_retry is not None:
                    self.on_retry(RetryInfo(attempt, e, delay, list(ids)))
                time.sleep(delay)
                attempt += 1


class AsyncGateway(_Base):
    """The same as :class:`Gateway` for asyncio: each attempt runs the
    blocking standard-library call in a worker thread
    (``asyncio.to_thread``), and the waits between retries are
    ``asyncio.sleep``. Cancelling a call stops its retries, but an attempt
    already under way in its thread still completes: the event may then be
    published (retry it with the same ``event_id``, never a new one)."""

    async def publish(
        self,
        channels: Channels,
        event: Mapping[str, Any],
        event_id: Optional[str] = None,
        *,
        ack_within_s: Optional[int] = None,
    ) -> PublishResult:
        item = _with_ack({**_channels_field(channels), "event": _with_id(event, event_id)}, ack_within_s)
        return (await self._send([item]))[0]

    async def publish_many(self, items: Iterable[Item]) -> List[PublishResult]:
        built = [_build_item(i) for i in items]
        if not built:
            return []
        return await self._send(built, batch=True)

    async def presence(self, tenant_id: int, branch_id: int) -> List[PresenceConnection]:
        query = _presence_query(tenant_id, branch_id)
        return await self._retrying(lambda: self._presence_attempt(query), [])

    async def _send(self, items: List[Dict[str, Any]], batch: bool = False) -> List[PublishResult]:
        body, ids = _encode(items, batch)
        return await self._retrying(lambda: self._attempt(body, ids), ids)

    async def _retrying(self, call: Callable[[], Any], ids: List[str]) -> Any:
        attempt = 1
        while True:
            try:
                return await asyncio.to_thread(call)
            except GatewayError as e:
                if not e.retryable or attempt > self.retries:
                    raise
                delay = self._delay(attempt)
                if self.on_retry is not None:
                    self.on_retry(RetryInfo(attempt, e, delay, list(ids)))
                await asyncio.sleep(delay)
                attempt += 1
