// A connection that outlives its tokens. The gateway closes a connection
// whose token has expired with 4001 (at re-validation); the client asks
// getToken for a new token before that (in-band refresh) and, after a 4001,
// once more to reconnect. So a getToken that returns fresh tokens keeps
// the events coming; one that returns a fixed token (the README's old
// `() => process.env.TOKEN`) ends, and the client says why.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { publish, recordedClient, startGateway, staffToken, states, waitFor } from './helpers.js';

const env = { WSGATEWAY_JWT_LEEWAY_S: '0', WSGATEWAY_JWT_REVALIDATE_S: '0.3' };
const fast = { initialMs: 50, maxMs: 200 };
const event = (n) => ({ type: 'ROUND_READY', tenant_id: 1, branch_id: 5, entity: { n } });

test('fresh 3 s tokens: one connection lives past three expiries, with events after each', async () => {
  const gw = await startGateway({ env });
  try {
    const tokens = [];
    const mint = () => tokens[tokens.push(staffToken({ sub: 601, ttlS: 3 })) - 1];
    const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', getToken: mint });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');
    const firstExp = JSON.parse(Buffer.from(tokens[0].split('.')[1], 'base64url')).exp;
    for (let n = 1; n <= 3; n++) {
      await waitFor(() => rec.token_refreshed.length >= n, `refresh ${n}`, 10_000);
      await publish(gw, 'channel:branch:5:waiters', event(n));
      await waitFor(() => rec.event.length === n, `event ${n}`);
    }
    // Past the first token's expiry (and its re-validation), on the same connection.
    assert.ok(Date.now() / 1000 > firstExp + 1, 'past the first token');
    assert.deepEqual(rec.close, [], 'never closed');
    assert.equal(rec.connected.length, 1);
    assert.deepEqual(rec.event.map((e) => e.entity.n), [1, 2, 3]);
  } finally {
    await gw.stop();
  }
});

test('a fixed token: 4001 at expiry, getToken once more, 4001 again, closed with an error naming getToken', async () => {
  const gw = await startGateway({ env });
  try {
    const fixed = staffToken({ sub: 602, ttlS: 2 });
    const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', backoff: fast, getToken: () => fixed });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');
    await waitFor(() => rec.client.state === 'closed', `closed (${states(rec)})`, 10_000);
    assert.deepEqual(rec.close.map((c) => c.code), [4001, 4001]);
    // Once to connect, once for the refresh (not sent: it expires no later), once after the 4001.
    assert.equal(rec.calls, 3);
    const messages = rec.error.map((e) => e.message).join(' | ');
    assert.match(messages, /expires no later/);
    assert.match(messages, /closed for good: .*getToken must return a fresh token/);
  } finally {
    await gw.stop();
  }
});

test("dev: a getToken that fetches /demo/session.json (clients/typescript/README.md's example) connects and gets events", async () => {
  const gw = await startGateway({ command: 'dev' });
  try {
    // As the README shows it, with gw.http for the page's origin.
    const getToken = async () => {
      const session = await (await fetch(`${gw.http}/demo/session.json`)).json();
      return session.tokens.find((t) => t.endpoint === 'waiter').token;
    };
    const rec = recordedClient({ url: gw.http, endpoint: 'waiter', getToken });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');
    const session = await (await fetch(`${gw.http}/demo/session.json`)).json();
    const res = await fetch(`${gw.http}/api/publish`, {
      method: 'POST',
      headers: { authorization: `Bearer ${session.api_key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ channel: 'channel:branch:5:waiters', event: event(1) }),
    });
    assert.equal(res.status, 202);
    await waitFor(() => rec.event.length === 1, 'the event');
  } finally {
    await gw.stop();
  }
});
