// Resume across a gateway restart, with the Redis broker (history lives in
// Redis, so it survives the restart), and de-duplication by event_id.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { freePort, publish, recordedClient, startGateway, startRedis, staffToken, states, waitFor } from './helpers.js';

let redis;
before(async () => {
  redis = await startRedis();
});
after(async () => {
  await redis?.stop();
});

test('a gateway restart mid-stream: 1012, reconnection, resume; no event lost or repeated', async () => {
  const port = await freePort();
  const env = { REDIS_URL: redis.url };
  let a = await startGateway({ port, env });
  // The publisher's node: it stays up while the client's node restarts.
  const b = await startGateway({ env });
  try {
    const rec = recordedClient({ url: a.ws, endpoint: 'waiter', backoff: { initialMs: 100, maxMs: 400 }, getToken: () => staffToken({ sub: 301 }) });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');

    const published = [];
    let stop = false;
    const publisher = (async () => {
      for (let i = 0; i < 400 && !stop; i++) {
        const ids = await publish(b, 'channel:branch:5:waiters', { type: 'ROUND_SUBMITTED', tenant_id: 1, branch_id: 5, entity: { n: i } });
        published.push(ids[0]);
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    try {
      await waitFor(() => rec.event.length >= 10, 'events before the restart');
      await a.stop(); // SIGTERM: every client gets 1012
      await waitFor(() => rec.close.length >= 1, 'the close');
      assert.equal(rec.close[0].code, 1012);
      const before = published.length;
      // Events published while the node is down are kept in Redis.
      await waitFor(() => published.length >= before + 10 && rec.reconnect.length >= 2, 'events and retries while down');
      a = await startGateway({ port, env });
      await waitFor(() => rec.connected.length >= 2, `reconnected (${states(rec)})`, 20_000);
      assert.equal(rec.connected[1].recovered, true);
      const atResume = rec.event.length;
      await waitFor(() => rec.event.length >= atResume + 10, 'events after the restart');
    } finally {
      stop = true;
      await publisher;
    }
    await waitFor(() => rec.event.length >= published.length, `all ${published.length} events (got ${rec.event.length})`);
    const got = rec.event.map((e) => e.event_id);
    assert.deepEqual(got, published, 'every event, once, in publish order');
    assert.deepEqual(rec.event.map((e) => e.entity.n), published.map((_, i) => i));
    assert.ok(rec.close.slice(1).every((c) => c.code === 1006), 'refused while down: 1006');
    assert.equal(rec.client.lastEventId, published.at(-1));
    rec.client.close();
  } finally {
    await a.stop();
    await b.stop();
  }
});

test('a repeated event_id is delivered once, though the gateway sends it again after its window', async () => {
  // The gateway publishes a repeated caller id again only once its
  // history has forgotten the first (WSGATEWAY_HISTORY_TTL_S), and sends it
  // again only past its de-duplication window.
  const gw = await startGateway({ env: { WSGATEWAY_DEDUP_WINDOW_S: '0.2', WSGATEWAY_HISTORY_TTL_S: '1' } });
  try {
    const rec = recordedClient({ url: gw.ws, endpoint: 'kitchen', getToken: () => staffToken({ sub: 302, roles: ['KITCHEN'] }) });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');
    const event = { type: 'ROUND_IN_KITCHEN', tenant_id: 1, branch_id: 5, event_id: 'round-77-kitchen' };
    const frames = () => rec.message.filter((m) => m.event_id === event.event_id).length;
    await publish(gw, 'channel:branch:5:kitchen', event);
    await waitFor(() => frames() === 1, 'the first copy');
    // Publish again until the gateway, past its window, sends a second copy.
    await waitFor(async () => {
      if (frames() >= 2) return true;
      await publish(gw, 'channel:branch:5:kitchen', event);
      await new Promise((r) => setTimeout(r, 100));
      return frames() >= 2;
    }, 'a second copy from the gateway');
    await publish(gw, 'channel:branch:5:kitchen', { type: 'ROUND_READY', tenant_id: 1, branch_id: 5, event_id: 'round-77-ready' });
    await waitFor(() => rec.event.some((e) => e.event_id === 'round-77-ready'), 'the next event');
    assert.deepEqual(rec.event.map((e) => e.event_id), ['round-77-kitchen', 'round-77-ready']);
    rec.client.close();
  } finally {
    await gw.stop();
  }
});

test('resync: the gateway lost its subscription after plain PUBLISHes; the client surfaces the notice', async () => {
  const own = await startRedis();
  let r = own;
  const gw = await startGateway({ env: { REDIS_URL: own.url, WSGATEWAY_REDIS_RETRY_MAX_S: '0.5' } });
  try {
    const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', getToken: () => staffToken({ sub: 303 }) });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');
    // A plain PUBLISH (no history): after a gap, the node cannot know what it missed.
    await waitFor(async () => {
      await own.command('PUBLISH', 'channel:branch:5:waiters', JSON.stringify({ type: 'ROUND_READY', tenant_id: 1, branch_id: 5 }));
      return rec.event.length > 0;
    }, 'the plain PUBLISH delivered');
    await own.stop();
    r = await startRedis(own.port);
    await waitFor(() => rec.resync.length > 0, 'resync', 20_000);
    assert.equal(typeof rec.resync[0].reason, 'string');
    assert.equal(rec.client.state, 'open', 'the connection itself stays');
    assert.equal(rec.event.filter((e) => e.type === 'resync').length, 0, 'resync is not an event');
    rec.client.close();
  } finally {
    await gw.stop();
    await r.stop();
  }
});
