// The pure parts: close-code policy, backoff bounds, token expiry, URLs.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import WebSocket from 'ws';
import { backoffDelay, buildUrl, closeAction, isKnownEvent, tokenExpiry, refreshLeadMs, WsGatewayClient } from '../dist/index.js';
import { signHs256, staffToken, tableToken } from './helpers.js';
import { fakeWebSocket } from './fake-socket.js';

test('close-code policy: every code the gateway sends has its rule', () => {
  for (const code of [1000, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1013, 1014, 1015, 4000, 4999]) {
    assert.equal(closeAction(code), 'retry', `code ${code}`);
  }
  assert.equal(closeAction(1001), 'restart', 'going away: the heartbeat timeout');
  assert.equal(closeAction(1012), 'restart', 'service restart: the node drains');
  assert.equal(closeAction(4001), 'reauth');
  assert.equal(closeAction(4003), 'stop');
  assert.equal(closeAction(4008), 'stop');
  assert.equal(closeAction(4029), 'rate_limited');
});

test('backoff: full jitter under an exponential, capped ceiling; 4029 waits at least half of an 8x ceiling', () => {
  const o = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(1, false, o, () => 0), 0);
  assert.equal(backoffDelay(1, false, o, () => 1), 100);
  assert.equal(backoffDelay(1, 'retry', o, () => 1), 100);
  assert.equal(backoffDelay(3, false, o, () => 1), 400);
  assert.equal(backoffDelay(10, false, o, () => 1), 1000, 'capped at maxMs');
  assert.equal(backoffDelay(1000, false, o, () => 1), 1000, 'no overflow');
  assert.equal(backoffDelay(1, true, o, () => 0), 400);
  assert.equal(backoffDelay(1, true, o, () => 1), 800);
  assert.equal(backoffDelay(1, 'rate_limited', o, () => 1), 800);
  assert.equal(backoffDelay(5, true, o, () => 0), 500, 'rate limited, capped');
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(2, false, o);
    assert.ok(d >= 0 && d <= 200, `delay ${d}`);
  }
});

/** A seeded generator (mulberry32), so that a distribution check reads the same numbers every run. */
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test('backoff after 1001/1012 (restart): full jitter over restartSpreadMs, never above maxMs; later retries as usual', () => {
  const o = { initialMs: 500, maxMs: 30_000, restartSpreadMs: 5_000 };
  assert.equal(backoffDelay(1, 'restart', o, () => 0), 0);
  assert.equal(backoffDelay(1, 'restart', o, () => 1), 5_000);
  assert.equal(backoffDelay(1, 'restart', o, () => 0.5), 2_500);
  assert.equal(backoffDelay(1, 'restart', { initialMs: 500, maxMs: 30_000 }, () => 1), 5_000, 'default restartSpreadMs');
  assert.equal(backoffDelay(1, 'restart', { ...o, maxMs: 400 }, () => 1), 400, 'capped at maxMs');
  assert.equal(backoffDelay(1, 'restart', { ...o, restartSpreadMs: 0 }, () => 1), 500, 'a spread of 0: the normal first retry');
  assert.equal(backoffDelay(6, 'restart', o, () => 1), 16_000, 'a later normal ceiling above the spread wins');
  // The retry after a failed restart attempt (a draining node's 503 is a 1006) is a normal one.
  assert.equal(backoffDelay(2, closeAction(1006), o, () => 1), 1_000);

  // The distribution: 10 000 draws of a seeded generator fill [0, 5000] evenly.
  const random = seeded(31);
  const buckets = new Array(10).fill(0);
  let min = Infinity;
  let max = -Infinity;
  for (let i = 0; i < 10_000; i++) {
    const d = backoffDelay(1, 'restart', o, random);
    assert.ok(Number.isInteger(d) && d >= 0 && d <= 5_000, `delay ${d}`);
    min = Math.min(min, d);
    max = Math.max(max, d);
    buckets[Math.min(9, Math.floor(d / 500))]++;
  }
  assert.ok(min < 50 && max > 4_950, `spread over the whole window: ${min}..${max}`);
  for (const [i, n] of buckets.entries()) assert.ok(n > 850 && n < 1_150, `bucket ${i} holds ${n} of 10 000 (expected about 1 000)`);
  assert.ok(buckets.slice(1).reduce((a, b) => a + b) > 8_000, 'most delays are above the normal 500 ms first ceiling');
});

/** A WebSocket stand-in the test drives: it records the URLs and lets the test deliver frames and closes. */

test('the client after a 1012: one retry spread over restartSpreadMs, resuming; a failed one goes on with the normal backoff', async (t) => {
  const { FakeWebSocket, sockets } = fakeWebSocket();
  // Math.random at its top: each delay is its ceiling.
  t.mock.method(Math, 'random', () => 0.999_999);
  const client = new WsGatewayClient({
    url: 'ws://gw',
    endpoint: 'waiter',
    getToken: () => 't',
    WebSocket: FakeWebSocket,
    backoff: { initialMs: 20, maxMs: 1_000, restartSpreadMs: 150 },
  });
  const reconnects = [];
  const events = [];
  client.on('reconnect', (r) => reconnects.push(r));
  client.on('event', (e) => events.push(e.event_id));
  const socket = async (n) => {
    const deadline = Date.now() + 10_000;
    while (sockets.length < n) {
      if (Date.now() > deadline) throw new Error(`no socket ${n}`);
      await new Promise((r) => setTimeout(r, 5));
    }
    return sockets[n - 1];
  };
  try {
    client.connect();
    const connected = { type: 'connected', endpoint: 'waiter', user_id: 1, tenant_id: 1, branch_ids: [5], sector_ids: null, heartbeat_interval_s: 30 };
    (await socket(1)).open(connected);
    sockets[0].deliver({ type: 'ROUND_READY', tenant_id: 1, branch_id: 5, event_id: '1-0' });
    sockets[0].deliver({ type: 'ROUND_READY', tenant_id: 1, branch_id: 5, event_id: '2-0' });
    sockets[0].drop(1012, 'service restart');
    assert.deepEqual(reconnects, [{ attempt: 1, delayMs: 150, code: 1012 }]);
    assert.equal(client.state, 'reconnecting');
    // A draining node refuses the upgrade (503): the browser reports 1006.
    (await socket(2)).drop(1006);
    assert.deepEqual(reconnects[1], { attempt: 2, delayMs: 40, code: 1006 }, 'the normal second retry');
    assert.match(sockets[1].url, /last_event_id=2-0/);
    (await socket(3)).open({ ...connected, recovered: true });
    assert.match(sockets[2].url, /last_event_id=2-0/);
    sockets[2].deliver({ type: 'ROUND_READY', tenant_id: 1, branch_id: 5, event_id: '2-0' }); // a repeat
    sockets[2].deliver({ type: 'ROUND_READY', tenant_id: 1, branch_id: 5, event_id: '3-0' });
    assert.deepEqual(events, ['1-0', '2-0', '3-0']);
    // connected resets the count: the next 1001 is a first, spread retry again.
    sockets[2].drop(1001, 'going away');
    assert.deepEqual(reconnects[2], { attempt: 1, delayMs: 150, code: 1001 });
  } finally {
    client.close();
  }
});

test('token expiry is read from staff and table JWTs, unverified; anything else has none', () => {
  const exp = Math.floor(Date.now() / 1000) + 3600;
  const staff = staffToken();
  assert.ok(Math.abs(tokenExpiry(staff) - exp) <= 1);
  assert.ok(Math.abs(tokenExpiry(tableToken()) - exp) <= 1);
  // base64url with characters that differ from base64 ('-' and '_'), and UTF-8
  const t = signHs256({ exp: 42, name: 'Zoë ??>>' }, 'x');
  assert.equal(tokenExpiry(t), 42);
  assert.equal(tokenExpiry('opaque-token'), undefined);
  assert.equal(tokenExpiry('a.b.c'), undefined);
  assert.equal(tokenExpiry(signHs256({ sub: 1 }, 'x')), undefined);
  assert.equal(tokenExpiry(signHs256({ exp: '42' }, 'x')), undefined);
  assert.equal(refreshLeadMs(3000), 1000);
  assert.equal(refreshLeadMs(40_000), 10_000);
  assert.equal(refreshLeadMs(3_600_000), 60_000);
});

test('URLs: http(s) become ws(s), the endpoint path is appended, diners use table_token', () => {
  assert.equal(buildUrl('http://h:1', 'waiter', 't', undefined), 'ws://h:1/ws/waiter?token=t');
  assert.equal(buildUrl('https://h/gw/', 'kitchen', 'a+b', '12'), 'wss://h/gw/ws/kitchen?token=a%2Bb&last_event_id=12');
  assert.equal(buildUrl('ws://h', 'diner', 't', ''), 'ws://h/ws/diner?table_token=t&last_event_id=');
  assert.equal(buildUrl('wss://h', 'admin', 't', 'x y'), 'wss://h/ws/admin?token=t&last_event_id=x+y');
  assert.throws(() => buildUrl('ftp://h', 'admin', 't', undefined), /url must be/);
  assert.throws(() => new WsGatewayClient({ url: 'ws://h', endpoint: 'cook', getToken: () => 't', WebSocket }), /unknown endpoint/);
  assert.throws(() => new WsGatewayClient({ url: 'nope', endpoint: 'waiter', getToken: () => 't', WebSocket }));
  assert.throws(() => new WsGatewayClient({ url: 'ws://h', endpoint: 'waiter', getToken: () => 't', WebSocket, backoff: { maxMs: -1 } }), /maxMs/);
  assert.throws(() => new WsGatewayClient({ url: 'ws://h', endpoint: 'waiter', getToken: () => 't', WebSocket, backoff: { restartSpreadMs: NaN } }), /restartSpreadMs/);
});

test('known event types narrow; unknown ones are events all the same', () => {
  const e = { type: 'ROUND_READY', tenant_id: 1, branch_id: 5 };
  assert.equal(isKnownEvent(e), true);
  assert.equal(isKnownEvent(e, 'ROUND_READY'), true);
  assert.equal(isKnownEvent(e, 'ROUND_SERVED'), false);
  assert.equal(isKnownEvent({ type: 'TABLE_MERGED', tenant_id: 1, branch_id: 5 }), false);
});

test('a client with no WebSocket available says so', { skip: typeof globalThis.WebSocket !== 'undefined' }, () => {
  assert.throws(() => new WsGatewayClient({ url: 'ws://h', endpoint: 'waiter', getToken: () => 't' }), /no global WebSocket/);
});
