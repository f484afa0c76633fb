"""Every documented answer of the publish API maps to its exception class,
provoked on a real gateway (docs/PROTOCOL.md §10)."""

import time
import urllib.error
import urllib.request

import pytest

from conftest import API_KEY, free_port
import wsgateway
from wsgateway import errors
from wsgateway.errors import error_from_response

GOOD = {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5}
CHANNEL = "channel:branch:5:waiters"


def raises(cls, code, fn):
    with pytest.raises(cls) as info:
        fn()
    e = info.value
    assert type(e) is cls
    assert e.code == code
    assert e.status == cls.status
    assert e.detail, "the gateway's detail is kept"
    return e


def counted_gateway(url, key=API_KEY, **kw):
    calls = []
    gw = wsgateway.Gateway(url, key, on_retry=calls.append, backoff_initial_s=0.01, **kw)
    return gw, calls


@pytest.mark.parametrize(
    "cls, code, call",
    [
        # An item given as a dict is sent as given: another field is the gateway's to refuse.
        (errors.InvalidBody, "invalid_body", lambda gw: gw.publish_many([{"channel": CHANNEL, "event": GOOD, "extra": 1}])),
        (errors.UnknownChannel, "unknown_channel", lambda gw: gw.publish("channel:nope", GOOD)),
        (errors.UnknownChannel, "unknown_channel", lambda gw: gw.publish("channel:branch:05:admin", GOOD)),
        (errors.InvalidEvent, "invalid_event", lambda gw: gw.publish(CHANNEL, {"type": "ROUND_READY", "tenant_id": 1})),
        (errors.InvalidEvent, "invalid_event", lambda gw: gw.publish("channel:branch:6:waiters", GOOD)),
        (errors.InvalidEvent, "invalid_event", lambda gw: gw.publish(CHANNEL, ["not", "an", "object"])),
        (errors.ReservedType, "reserved_type", lambda gw: gw.publish(CHANNEL, {**GOOD, "type": "connected"})),
        (errors.StaleEvent, "stale_event", lambda gw: gw.publish(CHANNEL, {**GOOD, "ts": time.time() - 3600})),
        # The test gateway allows 5 items and 3 channel names per item.
        (errors.TooManyItems, "too_many_items", lambda gw: gw.publish_many([(CHANNEL, GOOD)] * 6)),
        (errors.TooManyChannels, "too_many_channels", lambda gw: gw.publish([CHANNEL] * 4, GOOD)),
        # ... and 65536 bytes of body.
        (errors.BodyTooLarge, "body_too_large", lambda gw: gw.publish(CHANNEL, {**GOOD, "blob": "x" * 70_000})),
    ],
)
def test_refusals_map_to_their_class_and_are_not_retried(gateway, cls, code, call):
    gw, calls = counted_gateway(gateway.url)
    e = raises(cls, code, lambda: call(gw))
    assert calls == [], "a refusal is never retried"
    # The ids the request carried, for a later retry (none for an event that is not an object).
    assert e.event_ids and all(i is None or i.startswith("evt-") for i in e.event_ids)
    if cls.status == 400:
        assert isinstance(e, errors.InvalidRequest)
        assert e.detail.startswith("item 0: ") or code in ("too_many_items", "invalid_body")


def test_a_bad_item_refuses_the_whole_batch(gateway):
    gw, _ = counted_gateway(gateway.url)
    e = raises(errors.UnknownChannel, "unknown_channel",
               lambda: gw.publish_many([(CHANNEL, GOOD), ("channel:nope", GOOD)]))
    assert e.detail.startswith("item 1: ")
    assert len(e.event_ids) == 2


def test_wrong_key_is_unauthorized(gateway):
    gw, calls = counted_gateway(gateway.url, key="not-the-key")
    raises(errors.Unauthorized, "unauthorized", lambda: gw.publish(CHANNEL, GOOD))
    assert calls == []


def test_a_gateway_without_api_key_says_publish_disabled(start_gateway):
    off = start_gateway({})
    gw, calls = counted_gateway(off.url)
    raises(errors.PublishDisabled, "publish_disabled", lambda: gw.publish(CHANNEL, GOOD))
    assert calls == []


def test_405_and_unknown_answers_map_by_status(gateway):
    # The client always POSTs; a GET shows what a 405 (empty body) maps to.
    try:
        urllib.request.urlopen(gateway.url + "/api/publish", timeout=5)
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    assert status == 405
    e = error_from_response(status, body)
    assert type(e) is errors.MethodNotAllowed and e.code is None
    # A proxy's 502/503/504 without a JSON body: by status, still retryable when 503/504.
    assert type(error_from_response(503, b"<html>busy</html>")) is errors.BrokerUnavailable
    assert error_from_response(504, b"").retryable
    other = error_from_response(502, b"bad gateway")
    assert type(other) is errors.GatewayError and other.status == 502 and not other.retryable
    # A code that does not agree with its status is not trusted.
    assert type(error_from_response(400, b'{"error":"outcome_unknown","detail":"?"}')) is errors.InvalidRequest
    # A future 400 code keeps its code.
    future = error_from_response(400, b'{"error":"brand_new","detail":"d"}')
    assert type(future) is errors.InvalidRequest and future.code == "brand_new"


def test_no_gateway_is_a_connection_error_after_the_retries_with_the_same_ids():
    gw, calls = counted_gateway(f"http://127.0.0.1:{free_port()}", retries=2, timeout=2)
    with pytest.raises(errors.GatewayConnectionError) as info:
        gw.publish(CHANNEL, GOOD, event_id="order-1")
    assert info.value.status is None and info.value.event_ids == ["order-1"]
    assert isinstance(info.value.__cause__, OSError)
    assert [c.attempt for c in calls] == [1, 2]
    assert all(c.event_ids == ["order-1"] for c in calls)
    assert all(0 <= c.delay_s <= 0.01 * 2 ** (c.attempt - 1) for c in calls)
