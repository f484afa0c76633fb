"""Retries against a real gateway in Redis mode, with a redis-server of our
own that is absent, killed and restarted, or paused (SIGSTOP): real 503
`broker_unavailable` and 504 `outcome_unknown` answers. A recording proxy
between the client and the gateway shows what each attempt really sent."""

import json
import urllib.request

import pytest

from conftest import (
    API_KEY,
    TABLE_SECRET,
    RecordingProxy,
    RedisProc,
    connect_diner,
    free_port,
    no_more_events,
    recv_events,
    unique_ids,
    wait_for,
)
from wsgateway import BrokerUnavailable, Gateway, OutcomeUnknown, mint_table_token


def redis_gateway(start_gateway, redis_url):
    return start_gateway(
        {
            "WSGATEWAY_API_KEY": API_KEY,
            "REDIS_URL": redis_url,
            "WSGATEWAY_REDIS_TIMEOUT_S": "0.5",
            "WSGATEWAY_REDIS_RETRY_BASE_S": "0.05",
            "WSGATEWAY_REDIS_RETRY_MAX_S": "0.3",
            "WSGATEWAY_REDIS_HEALTH_CHECK_S": "0.5",
            # Keep the breaker out of the way: its 30 s recovery would
            # outlast the test; the answers are then Redis's own.
            "WSGATEWAY_BREAKER_FAILURE_THRESHOLD": "1000",
        }
    )


def detailed(gw):
    try:
        with urllib.request.urlopen(gw.url + "/ws/health/detailed", timeout=2) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    except OSError:
        return {}


def healthy(gw):
    return detailed(gw).get("status") == "healthy"


@pytest.fixture
def proxy_to():
    proxies = []

    def make(gw):
        p = RecordingProxy(gw.port)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


def event_for(ids, **extra):
    return {"type": "ROUND_READY", "tenant_id": ids["tenant"], "branch_id": ids["branch"], **extra}


def test_503_is_retried_the_configured_number_of_times_with_the_same_body(start_gateway, proxy_to):
    gw = redis_gateway(start_gateway, f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    proxy = proxy_to(gw)
    retries = []
    client = Gateway(proxy.url, API_KEY, retries=3, backoff_initial_s=0.01, backoff_max_s=0.05, on_retry=retries.append)
    with pytest.raises(BrokerUnavailable) as info:
        client.publish_many([("channel:branch:5:waiters", event_for(unique_ids())), ("channel:branch:5:kitchen", event_for(unique_ids()))])
    sent = [body for body, _ in proxy.requests]
    assert [status for _, status in proxy.requests] == [503] * 4
    assert len(set(sent)) == 1, "every attempt sends the same body"
    ids = [item["event"]["event_id"] for item in json.loads(sent[0])]
    assert info.value.event_ids == ids and len(set(ids)) == 2
    assert [r.attempt for r in retries] == [1, 2, 3]
    assert all(type(r.error) is BrokerUnavailable and r.event_ids == ids for r in retries)


def test_a_publish_retried_across_a_redis_restart_is_delivered_once(start_gateway, proxy_to):
    redis = RedisProc().start()
    try:
        gw = redis_gateway(start_gateway, redis.url)
        wait_for(lambda: healthy(gw), "the gateway healthy on its Redis")
        proxy = proxy_to(gw)
        ids = unique_ids()
        token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
        with connect_diner(gw, token) as (ws, _):
            redis.stop()
            wait_for(lambda: not detailed(gw).get("broker", {}).get("publishing", True), "the gateway to see Redis gone")

            def restart_redis(info):
                if info.attempt == 1:
                    redis.start()
                    wait_for(lambda: healthy(gw), "the gateway back on the restarted Redis")

            retries = []
            client = Gateway(proxy.url, API_KEY, retries=10, backoff_initial_s=0.05, backoff_max_s=0.2,
                             on_retry=lambda i: (retries.append(i), restart_redis(i)))
            channel = f"channel:session:{ids['session']}"
            result = client.publish(channel, event_for(ids), event_id=f"order-{ids['session']}-ready")
            assert result.event_id == f"order-{ids['session']}-ready" and result.duplicate is False
            assert type(retries[0].error) is BrokerUnavailable
            assert proxy.requests[0][1] == 503 and proxy.requests[-1][1] == 202
            assert len({body for body, _ in proxy.requests}) == 1
            marker = client.publish(channel, event_for(ids, type="ROUND_SERVED"))
            evs = recv_events(ws, lambda evs: any(e["event_id"] == marker.event_id for e in evs))
            assert [e["event_id"] for e in evs] == [result.event_id, marker.event_id]
            assert no_more_events(ws, 0.2) == []
    finally:
        redis.stop()


def test_a_504_is_retried_with_the_same_id_and_delivered_once(start_gateway, proxy_to):
    redis = RedisProc().start()
    try:
        gw = redis_gateway(start_gateway, redis.url)
        wait_for(lambda: healthy(gw), "the gateway healthy on its Redis")
        proxy = proxy_to(gw)
        ids = unique_ids()
        token = mint_table_token(TABLE_SECRET, ids["tenant"], ids["branch"], ids["table"], ids["session"])
        with connect_diner(gw, token) as (ws, _):
            redis.pause()  # the request reaches Redis, no answer comes: 504

            def resume(info):
                if info.attempt == 1:
                    redis.resume()
                    wait_for(lambda: healthy(gw), "the gateway healthy again")

            retries = []
            client = Gateway(proxy.url, API_KEY, retries=10, backoff_initial_s=0.05, backoff_max_s=0.2,
                             on_retry=lambda i: (retries.append(i), resume(i)))
            channel = f"channel:session:{ids['session']}"
            result = client.publish(channel, event_for(ids))
            assert type(retries[0].error) is OutcomeUnknown
            assert proxy.requests[0][1] == 504 and proxy.requests[-1][1] == 202
            assert len({body for body, _ in proxy.requests}) == 1
            assert json.loads(proxy.requests[0][0])["event"]["event_id"] == result.event_id
            marker = client.publish(channel, event_for(ids, type="ROUND_SERVED"))
            evs = recv_events(ws, lambda evs: any(e["event_id"] == marker.event_id for e in evs))
            # Once, whether the first attempt ran after all (the retry is then a duplicate) or not.
            assert [e["event_id"] for e in evs] == [result.event_id, marker.event_id], (result, evs)
            assert no_more_events(ws, 0.2) == []
    finally:
        redis.stop()
