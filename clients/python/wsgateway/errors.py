"""Typed errors for every answer of the publish API (docs/PROTOCOL.md §10)
and of ``GET /api/presence``.

Every error is a :class:`GatewayError` with ``status`` (the HTTP status, or
``None`` when no answer came), ``code`` (the body's ``error``, e.g.
``"unknown_channel"``) and ``detail`` (the body's ``detail``, for people:
match on the class or the code, never on the detail).

``event_ids`` holds the ids the failed request carried, one per item, so
that a caller can retry the same publication later with the same ids.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Type

__all__ = [
    "GatewayError",
    "InvalidRequest",
    "InvalidBody",
    "UnknownChannel",
    "InvalidEvent",
    "ReservedType",
    "StaleEvent",
    "TooManyItems",
    "TooManyChannels",
    "InvalidQuery",
    "Unauthorized",
    "PublishDisabled",
    "PresenceDisabled",
    "MethodNotAllowed",
    "BodyTooLarge",
    "BrokerUnavailable",
    "OutcomeUnknown",
    "PresenceUnavailable",
    "GatewayConnectionError",
    "error_from_response",
]


class GatewayError(Exception):
    """Base class. ``status`` is ``None`` for :class:`GatewayConnectionError`."""

    status: Optional[int] = None
    code: Optional[str] = None
    #: Whether retrying with the same event ids is safe and may succeed.
    retryable = False

    def __init__(
        self,
        detail: str = "",
        *,
        status: Optional[int] = None,
        code: Optional[str] = None,
        event_ids: Optional[List[str]] = None,
    ) -> None:
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.detail = detail
        self.event_ids: List[str] = list(event_ids or [])
        super().__init__(self._message())

    def _message(self) -> str:
        head = " ".join(str(x) for x in (self.status, self.code) if x is not None)
        return f"{head}: {self.detail}" if head else self.detail


class InvalidRequest(GatewayError):
    """400: the request was refused whole; nothing of it was published."""

    status = 400


class InvalidBody(InvalidRequest):
    """400 ``invalid_body``: not JSON, an empty array, a malformed item."""

    code = "invalid_body"


class UnknownChannel(InvalidRequest):
    """400 ``unknown_channel``: a channel name not of the seven families."""

    code = "unknown_channel"


class InvalidEvent(InvalidRequest):
    """400 ``invalid_event``: a field rule or a channel agreement broken."""

    code = "invalid_event"


class ReservedType(InvalidRequest):
    """400 ``reserved_type``: the event's ``type`` is one of the gateway's own."""

    code = "reserved_type"


class StaleEvent(InvalidRequest):
    """400 ``stale_event``: ``ts`` older than the gateway's stale limit."""

    code = "stale_event"


class TooManyItems(InvalidRequest):
    """400 ``too_many_items``: more items than ``WSGATEWAY_MAX_PUBLISH_ITEMS``."""

    code = "too_many_items"


class TooManyChannels(InvalidRequest):
    """400 ``too_many_channels``: an item with more than ``WSGATEWAY_MAX_PUBLISH_CHANNELS`` names."""

    code = "too_many_channels"


class InvalidQuery(InvalidRequest):
    """400 ``invalid_query`` (``GET /api/presence``): ``tenant_id`` or ``branch_id`` missing or not an integer."""

    code = "invalid_query"


class Unauthorized(GatewayError):
    """401 ``unauthorized``: missing or wrong API key."""

    status = 401
    code = "unauthorized"


class PublishDisabled(GatewayError):
    """404 ``publish_disabled``: the gateway runs without ``WSGATEWAY_API_KEY``."""

    status = 404
    code = "publish_disabled"


class PresenceDisabled(PublishDisabled):
    """404 ``presence_disabled`` (``GET /api/presence``): the gateway runs
    without ``WSGATEWAY_API_KEY``. A :class:`PublishDisabled`, as its cause is the same."""

    code = "presence_disabled"


class MethodNotAllowed(GatewayError):
    """405 (empty body): not a POST. This client always POSTs; a proxy may not."""

    status = 405


class BodyTooLarge(GatewayError):
    """413 ``body_too_large``: larger than ``WSGATEWAY_MAX_PUBLISH_BYTES``."""

    status = 413
    code = "body_too_large"


class BrokerUnavailable(GatewayError):
    """503 ``broker_unavailable``: nothing was published; retrying is safe."""

    status = 503
    code = "broker_unavailable"
    retryable = True


class OutcomeUnknown(GatewayError):
    """504 ``outcome_unknown``: maybe published; retry with the same event ids."""

    status = 504
    code = "outcome_unknown"
    retryable = True


class PresenceUnavailable(GatewayError):
    """503 ``presence_unavailable`` (``GET /api/presence``): the Redis broker cannot be read; retrying is safe."""

    status = 503
    code = "presence_unavailable"
    retryable = True


class GatewayConnectionError(GatewayError):
    """No HTTP answer: connection refused or broken, or a timeout.

    When the request may have been sent (a timeout, a broken connection),
    the events may have been published, as after a 504: retry with the same
    ids. ``__cause__`` is the underlying exception.
    """

    retryable = True


_BY_CODE: Dict[str, Type[GatewayError]] = {
    cls.code: cls  # type: ignore[misc]
    for cls in (
        InvalidBody,
        UnknownChannel,
        InvalidEvent,
        ReservedType,
        StaleEvent,
        TooManyItems,
        TooManyChannels,
        InvalidQuery,
        Unauthorized,
        PublishDisabled,
        PresenceDisabled,
        BodyTooLarge,
        BrokerUnavailable,
        OutcomeUnknown,
        PresenceUnavailable,
    )
}

_BY_STATUS: Dict[int, Type[GatewayError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: PublishDisabled,
    405: MethodNotAllowed,
    413: BodyTooLarge,
    503: BrokerUnavailable,
    504: OutcomeUnknown,
}


def error_from_response(
    status: int, body: bytes, event_ids: Optional[List[str]] = None
) -> GatewayError:
    """The exception for a non-202 answer: by its ``error`` code when the body
    has a known one (and its status agrees), else by its status, else a plain
    :class:`GatewayError`. A 503 or 504 from a proxy in front of the gateway
    (no JSON body) therefore maps to the same retryable classes."""
    code: Optional[str] = None
    detail = ""
    try:
        parsed = json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        parsed = None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), str):
            code = parsed["error"]
        if isinstance(parsed.get("detail"), str):
            detail = parsed["detail"]
    elif body:
        detail = body[:500].decode("utf-8", "replace")
    cls = _BY_CODE.get(code or "")
    if cls is None or cls.status != status:
        cls = _BY_STATUS.get(status, GatewayError)
    return cls(detail, status=status, code=code, event_ids=event_ids)
