// A node drains (SIGTERM with WSGATEWAY_DRAIN_S): its clients get 1012 a
// few at a time, come back spread over restartSpreadMs through a load
// balancer to the node that stays (both share Redis), and resume: every
// event published during the drain arrives once, in order.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, test } from 'node:test';
import { publish, recordedClient, startGateway, startRedis, staffToken, states, waitFor } from './helpers.js';

let redis;
before(async () => {
  redis = await startRedis();
});
after(async () => {
  await redis?.stop();
});

/**
 * A loopback TCP load balancer: each new connection goes to the next of
 * `targets` (ports) in turn. It does not look at readiness, so a client
 * may land on the draining node and be refused (503, seen as 1006).
 */
async function startBalancer(targets) {
  const sockets = new Set();
  let next = 0;
  const server = net.createServer((down) => {
    const up = net.connect(lb.targets[next++ % lb.targets.length], '127.0.0.1');
    for (const s of [down, up]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    }
    // An end is passed on by pipe (the close frame before it is delivered);
    // an error (a refused connection) drops the other side.
    down.pipe(up);
    up.pipe(down);
    up.on('error', () => down.destroy());
    down.on('error', () => up.destroy());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const lb = {
    targets,
    ws: `ws://127.0.0.1:${server.address().port}`,
    async stop() {
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
  return lb;
}

const CLIENTS = 20;
const SPREAD_MS = 3_000;

test('a drained node: 1012 over the window, reconnects spread over restartSpreadMs, every client resumes, no event lost or repeated', async () => {
  const env = { REDIS_URL: redis.url };
  const a = await startGateway({ env: { ...env, WSGATEWAY_DRAIN_S: '2' } });
  const b = await startGateway({ env });
  const lb = await startBalancer([a.port]);
  let stop = false;
  let publisher;
  try {
    const recs = [];
    for (let i = 0; i < CLIENTS; i++) {
      const rec = recordedClient({
        url: lb.ws,
        endpoint: 'waiter',
        backoff: { initialMs: 100, maxMs: 5_000, restartSpreadMs: SPREAD_MS },
        getToken: () => staffToken({ sub: 700 + i }),
      });
      rec.client.connect();
      recs.push(rec);
    }
    await waitFor(() => recs.every((r) => r.client.state === 'open'), 'every client open on the first node');
    lb.targets = [a.port, b.port];

    // The publisher's node is the one that stays.
    const published = [];
    publisher = (async () => {
      for (let i = 0; i < 2_000 && !stop; i++) {
        const ids = await publish(b, 'channel:branch:5:waiters', { type: 'ROUND_SUBMITTED', tenant_id: 1, branch_id: 5, entity: { n: i } });
        published.push(ids[0]);
        await new Promise((r) => setTimeout(r, 15));
      }
    })();
    await waitFor(() => recs.every((r) => r.event.length >= 5), 'events before the drain');

    const aExited = new Promise((r) => a.proc.once('exit', (code, signal) => r({ code, signal })));
    a.signal('SIGTERM');
    // Once the node is gone, the balancer stops sending to it.
    void aExited.then(() => {
      lb.targets = [b.port];
    });
    await waitFor(() => recs.every((r) => r.close.length >= 1), 'every client closed by the drain');
    for (const r of recs) assert.equal(r.close[0].code, 1012, `the drain closes with 1012 (${states(r)})`);

    await waitFor(
      () => recs.every((r) => r.connected.length >= 2),
      'every client back',
      30_000,
    );
    assert.deepEqual(await aExited, { code: 0, signal: null }, 'the drained node exits 0');
    // Some more events after the last client is back, then the publisher stops.
    const atBack = published.length;
    await waitFor(() => published.length >= atBack + 10, 'events after the drain');
    stop = true;
    await publisher;

    for (const [i, r] of recs.entries()) {
      await waitFor(() => r.event.length >= published.length, `client ${i}: all ${published.length} events (got ${r.event.length})`);
      assert.deepEqual(r.event.map((e) => e.event_id), published, `client ${i}: every event, once, in publish order`);
      assert.ok(r.connected.slice(1).every((c) => c.recovered === true), `client ${i}: every reconnection recovered`);
      // A retry that landed on the draining node was refused (503), or on its closed port: 1006.
      assert.ok(r.close.slice(1).every((c) => c.code === 1006), `client ${i}: later closes ${r.close.map((c) => c.code)}`);
      assert.equal(r.reconnect[0].code, 1012);
      assert.equal(r.reconnect[0].attempt, 1);
      for (const [k, x] of r.reconnect.slice(1).entries()) {
        assert.ok(x.code === 1006 && x.attempt === k + 2 && x.delayMs <= 100 * 2 ** (k + 1), `client ${i}: a failed restart attempt goes on with the normal backoff: ${JSON.stringify(x)}`);
      }
    }
    const delays = recs.map((r) => r.reconnect[0].delayMs);
    for (const d of delays) assert.ok(Number.isInteger(d) && d >= 0 && d <= SPREAD_MS, `a first delay ${d} outside [0, ${SPREAD_MS}]`);
    assert.ok(new Set(delays).size > 1, `the delays differ: ${delays}`);
    // Uniform over [0, 3000]: all 20 under the normal 500 ms ceiling has a chance of (1/6)^20, about 3e-16.
    assert.ok(delays.some((d) => d > 500), `spread beyond the normal first retry: ${delays}`);
  } finally {
    stop = true;
    await publisher;
    await lb.stop();
    await a.stop();
    await b.stop();
  }
});
