// The pure parts: close-code policy, backoff bounds, token expiry, URLs.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import WebSocket from 'ws';
import { backoffDelay, buildUrl, closeAction, isKnownEvent, tokenExpiry, refreshLeadMs, WsGatewayClient } from '../dist/index.js';
import { signHs256, staffToken, tableToken } from './helpers.js';

test('close-code policy: every code the gateway sends has its rule', () => {
  for (const code of [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 1014, 1015, 4000, 4999]) {
    assert.equal(closeAction(code), 'retry', `code ${code}`);
  }
  assert.equal(closeAction(4001), 'reauth');
  assert.equal(closeAction(4003), 'stop');
  assert.equal(closeAction(4008), 'stop');
  assert.equal(closeAction(4029), 'rate_limited');
});

test('backoff: full jitter under an exponential, capped ceiling; 4029 waits at least half of an 8x ceiling', () => {
  const o = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(1, false, o, () => 0), 0);
  assert.equal(backoffDelay(1, false, o, () => 1), 100);
  assert.equal(backoffDelay(3, false, o, () => 1), 400);
  assert.equal(backoffDelay(10, false, o, () => 1), 1000, 'capped at maxMs');
  assert.equal(backoffDelay(1000, false, o, () => 1), 1000, 'no overflow');
  assert.equal(backoffDelay(1, true, o, () => 0), 400);
  assert.equal(backoffDelay(1, true, o, () => 1), 800);
  assert.equal(backoffDelay(5, true, o, () => 0), 500, 'rate limited, capped');
  for (let i = 0; i < 1000; i++) {
    const d = backoffDelay(2, false, o);
    assert.ok(d >= 0 && d <= 200, `delay ${d}`);
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
