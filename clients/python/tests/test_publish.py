"""publish() and publish_many() against a real gateway (embedded broker),
delivered to a real diner's WebSocket."""

import asyncio
import contextlib
import copy
import time

from conftest import API_KEY, TABLE_SECRET, connect_diner, no_more_events, recv_events, unique_ids
from wsgateway import AsyncGateway, Gateway, PublishResult, mint_table_token


@contextlib.contextmanager
def diner_for(gateway):
    ids = unique_ids()
    token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
    with connect_diner(gateway, token) as (ws, _):
        yield ws, ids


def event(ids, kind="ROUND_READY", **extra):
    return {"type": kind, "tenant_id": ids["tenant"], "branch_id": ids["branch"], **extra}


def test_publish_one_generates_an_id_and_the_diner_gets_the_event(gateway):
    with diner_for(gateway) as (ws, ids):
        gw = Gateway(gateway.url, API_KEY)
        original = event(ids, entity={"round": 1}, session_id=ids["session"])
        kept = copy.deepcopy(original)
        result = gw.publish(f"channel:session:{ids['session']}", original)
        assert isinstance(result, PublishResult)
        assert result.event_id.startswith("evt-") and len(result.event_id) == 36
        assert result.duplicate is False
        assert original == kept, "the caller's dict is not changed"
        [got] = recv_events(ws, lambda evs: len(evs) >= 1)
        assert got["event_id"] == result.event_id
        assert got["type"] == "ROUND_READY" and got["entity"] == {"round": 1}


def test_the_callers_id_is_kept_and_a_repeat_is_a_duplicate_delivered_once(gateway):
    with diner_for(gateway) as (ws, ids):
        gw = Gateway(gateway.url, API_KEY)
        channel = f"channel:session:{ids['session']}"
        my_id = f"round-{ids['session']}-ready"
        first = gw.publish(channel, event(ids), event_id=my_id)
        again = gw.publish(channel, event(ids, event_id=my_id))  # the id inside the event
        assert first == PublishResult(my_id, False)
        assert again == PublishResult(my_id, True)
        marker = gw.publish(channel, event(ids, "ROUND_SERVED"))
        evs = recv_events(ws, lambda evs: any(e["event_id"] == marker.event_id for e in evs))
        assert [e["event_id"] for e in evs] == [my_id, marker.event_id]
        assert no_more_events(ws, 0.2) == []


def test_an_event_id_that_contradicts_the_events_own_is_refused_locally(gateway):
    gw = Gateway(gateway.url, API_KEY)
    try:
        gw.publish("channel:session:1", {"type": "X", "tenant_id": 1, "branch_id": 5, "event_id": "a"}, event_id="b")
    except ValueError as e:
        assert "differs" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_publish_on_several_channels_and_publish_many(gateway):
    with diner_for(gateway) as (ws, ids):
        gw = Gateway(gateway.url, API_KEY)
        s = f"channel:session:{ids['session']}"
        multi = gw.publish([s, f"channel:branch:{ids['branch']}:waiters"], event(ids, "TABLE_SESSION_STARTED"))
        results = gw.publish_many(
            [
                (s, event(ids, "ROUND_SUBMITTED")),
                (s, event(ids, "ROUND_IN_KITCHEN"), "kitchen-" + str(ids["session"])),
                {"channels": [s], "event": event(ids, "ROUND_READY")},
            ]
        )
        assert len(results) == 3
        assert results[1] == PublishResult("kitchen-" + str(ids["session"]), False)
        assert all(r.event_id.startswith("evt-") for r in (results[0], results[2]))
        assert len({multi.event_id, *(r.event_id for r in results)}) == 4
        evs = recv_events(ws, lambda evs: len(evs) >= 4)
        assert [e["type"] for e in evs] == ["TABLE_SESSION_STARTED", "ROUND_SUBMITTED", "ROUND_IN_KITCHEN", "ROUND_READY"]
        assert [e["event_id"] for e in evs] == [multi.event_id] + [r.event_id for r in results]
        assert gw.publish_many([]) == []


def test_async_gateway_publishes_too(gateway):
    with diner_for(gateway) as (ws, ids):

        async def main():
            gw = AsyncGateway(gateway.url, API_KEY)
            s = f"channel:session:{ids['session']}"
            one = await gw.publish(s, event(ids, ts=time.time()))
            many = await gw.publish_many([(s, event(ids, "ROUND_SERVED")), (s, event(ids, "TABLE_CLEARED"))])
            return [one, *many]

        results = asyncio.run(main())
        evs = recv_events(ws, lambda evs: len(evs) >= 3)
        assert [e["event_id"] for e in evs] == [r.event_id for r in results]
