// The close-code policy against a real gateway: each rule, from the code the
// gateway really sends.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { publish, recordedClient, startGateway, staffToken, states, waitFor } from './helpers.js';

const fast = { initialMs: 50, maxMs: 200 };

let gw;
before(async () => {
  gw = await startGateway({
    env: {
      WSGATEWAY_MAX_CONNECTIONS_PER_USER: '1',
      WSGATEWAY_RATE_LIMIT_PER_S: '3',
      WSGATEWAY_JWT_LEEWAY_S: '0',
      WSGATEWAY_JWT_REVALIDATE_S: '0.3',
    },
  });
});
after(async () => {
  await gw?.stop();
});

let probes = 0;

/** Resolves once `rec` is closed for good, and no reconnection followed within a few more round trips. */
async function closedForGood(rec) {
  await waitFor(() => rec.client.state === 'closed', `state closed (${states(rec)})`);
  // A ping frame answered on another connection shows the gateway processed everything sent before.
  const probe = recordedClient({ url: gw.ws, endpoint: 'admin', getToken: () => staffToken({ sub: 900 + ++probes, roles: ['ADMIN'] }) });
  probe.client.connect();
  await waitFor(() => probe.client.state === 'open', 'probe open');
  probe.client.close();
  assert.equal(rec.client.state, 'closed');
}

test('4001 (bad token): getToken is called once more, one retry, then closed', async () => {
  const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', backoff: fast, getToken: () => staffToken({ sub: 201, secret: 'wrong' }) });
  rec.client.connect();
  await closedForGood(rec);
  assert.deepEqual(rec.close.map((c) => c.code), [4001, 4001]);
  assert.equal(rec.calls, 2);
  assert.equal(rec.reconnect.length, 1);
  assert.equal(rec.reconnect[0].code, 4001);
  assert.deepEqual(rec.state, ['connecting', 'reconnecting', 'closed'], states(rec));
});

test('4001 then a good token: the retry connects, and the 4001 budget is renewed by connected', async () => {
  const rec = recordedClient({
    url: gw.ws,
    endpoint: 'waiter',
    backoff: fast,
    getToken: (n) => staffToken({ sub: 202, secret: n % 2 === 1 ? 'wrong' : undefined }),
  });
  rec.client.connect();
  await waitFor(() => rec.client.state === 'open', 'open after one 4001');
  assert.deepEqual(rec.close.map((c) => c.code), [4001]);
  rec.client.close();
});

test('4001 at re-validation (token expired, refresh not possible): a new token is fetched and the connection comes back', async () => {
  // Call 1: a 2 s token. Call 2 (the timed refresh, 1 s before expiry): the
  // same token again, which the client refuses to send. Call 3 (after 4001): a fresh one.
  let first;
  const rec = recordedClient({
    url: gw.ws,
    endpoint: 'waiter',
    backoff: fast,
    getToken: (n) => {
      if (n === 1) first = staffToken({ sub: 203, ttlS: 2 });
      return n <= 2 ? first : staffToken({ sub: 203 });
    },
  });
  rec.client.connect();
  await waitFor(() => rec.connected.length === 2, `second connected (${states(rec)})`, 20_000);
  assert.deepEqual(rec.close.map((c) => c.code), [4001]);
  assert.equal(rec.calls, 3);
  assert.match(rec.error.map((e) => e.message).join('|'), /expires no later/);
  assert.deepEqual(rec.state, ['connecting', 'open', 'reconnecting', 'open'], states(rec));
  rec.client.close();
});

test('4003 (role not allowed): closed at once, getToken called once', async () => {
  const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', backoff: fast, getToken: () => staffToken({ sub: 204, roles: ['KITCHEN'] }) });
  rec.client.connect();
  await closedForGood(rec);
  assert.deepEqual(rec.close.map((c) => c.code), [4003]);
  assert.equal(rec.calls, 1);
  assert.equal(rec.reconnect.length, 0);
});

test('4008 (per-user limit): the second connection stops; the first stays open', async () => {
  const a = recordedClient({ url: gw.ws, endpoint: 'waiter', backoff: fast, getToken: () => staffToken({ sub: 205 }) });
  a.client.connect();
  await waitFor(() => a.client.state === 'open', 'first open');
  const b = recordedClient({ url: gw.ws, endpoint: 'kitchen', backoff: fast, getToken: () => staffToken({ sub: 205, roles: ['KITCHEN', 'WAITER'] }) });
  b.client.connect();
  await closedForGood(b);
  assert.deepEqual(b.close.map((c) => c.code), [4008]);
  assert.equal(b.calls, 1);
  assert.equal(b.reconnect.length, 0);
  assert.equal(a.client.state, 'open');
  a.client.close();
});

test('4029 (rate limited): reconnects after a longer delay, resuming', async () => {
  const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', backoff: { initialMs: 100, maxMs: 10_000 }, getToken: () => staffToken({ sub: 206 }) });
  rec.client.connect();
  await waitFor(() => rec.client.state === 'open', 'open');
  const [id] = await publish(gw, 'channel:branch:5:waiters', { type: 'ROUND_READY', tenant_id: 1, branch_id: 5 });
  await waitFor(() => rec.event.length === 1, 'an event');
  for (let i = 0; i < 10; i++) {
    try {
      rec.client.send('{"type":"ping"}');
    } catch {
      break; // closed already
    }
  }
  await waitFor(() => rec.connected.length === 2, `reconnected (${states(rec)})`);
  assert.deepEqual(rec.close.map((c) => c.code), [4029]);
  assert.equal(rec.reconnect[0].code, 4029);
  assert.ok(rec.reconnect[0].delayMs >= 400, `4029 waits at least half of 8 x initialMs, got ${rec.reconnect[0].delayMs}`);
  assert.equal(rec.connected[1].recovered, true, `resumed from ${id}`);
  rec.client.close();
});

test('1013 (gateway at capacity): retried with backoff until a place is free', async () => {
  const small = await startGateway({ env: { WSGATEWAY_MAX_CONNECTIONS: '1' } });
  try {
    const a = recordedClient({ url: small.ws, endpoint: 'waiter', getToken: () => staffToken({ sub: 207 }) });
    a.client.connect();
    await waitFor(() => a.client.state === 'open', 'first open');
    const b = recordedClient({ url: small.ws, endpoint: 'waiter', backoff: fast, getToken: () => staffToken({ sub: 208 }) });
    b.client.connect();
    await waitFor(() => b.reconnect.length >= 2, 'two retries');
    assert.ok(b.close.every((c) => c.code === 1013), JSON.stringify(b.close));
    assert.ok(b.reconnect.every((r) => r.code === 1013 && r.delayMs <= 200));
    assert.equal(b.client.state, 'reconnecting');
    a.client.close();
    await waitFor(() => b.client.state === 'open', 'second open once the first left');
    b.client.close();
  } finally {
    await small.stop();
  }
});
