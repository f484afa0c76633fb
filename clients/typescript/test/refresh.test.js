// In-band token refresh: tokens of 3 s, refreshed before expiry, on one
// connection that is never closed with 4001. Needs the gateway side of
// refresh_token (PROTOCOL.md §7).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { publish, recordedClient, startGateway, staffToken, tableToken, waitFor } from './helpers.js';

const env = { WSGATEWAY_JWT_LEEWAY_S: '0', WSGATEWAY_JWT_REVALIDATE_S: '0.3' };

for (const [endpoint, mint] of [
  ['waiter', () => staffToken({ sub: 501, ttlS: 3 })],
  ['diner', () => tableToken({ session: 90, ttlS: 3 })],
]) {
  test(`${endpoint}: a token that expires during the test is refreshed in-band, no 4001`, async () => {
    const gw = await startGateway({ env });
    try {
      const rec = recordedClient({ url: gw.ws, endpoint, getToken: mint });
      rec.client.connect();
      await waitFor(() => rec.client.state === 'open', 'open');
      // Three refreshes take the connection past three expiries of 3 s tokens.
      await waitFor(() => rec.token_refreshed.length >= 3, 'three refreshes', 20_000);
      assert.deepEqual(rec.close, [], 'never closed');
      assert.equal(rec.connected.length, 1);
      // One call per connection and per refresh (the next refresh's may have started).
      const extra = rec.calls - 1 - rec.token_refreshed.length;
      assert.ok(extra === 0 || extra === 1, `getToken called ${rec.calls} times for ${rec.token_refreshed.length} refreshes`);
      for (const r of rec.token_refreshed) assert.ok(Number.isInteger(r.expires_at));
      const channel = endpoint === 'diner' ? 'channel:session:90' : 'channel:branch:5:waiters';
      await publish(gw, channel, { type: 'SERVICE_CALL_CREATED', tenant_id: 1, branch_id: 5, ...(endpoint === 'diner' ? { session_id: 90 } : {}) });
      await waitFor(() => rec.event.length === 1, 'an event on the refreshed connection');
      assert.equal(rec.client.state, 'open');
      rec.client.close();
    } finally {
      await gw.stop();
    }
  });
}

test('a rejected refresh is an error frame; the connection stays until its token expires, then 4001 rules', async () => {
  const gw = await startGateway({ env });
  try {
    // Call 2 (the refresh) is another user's token: rejected. Call 3 (after 4001) is good.
    const rec = recordedClient({
      url: gw.ws,
      endpoint: 'waiter',
      backoff: { initialMs: 50, maxMs: 200 },
      getToken: (n) => staffToken({ sub: n === 2 ? 503 : 502, ttlS: n === 1 ? 3 : 3600 }),
    });
    rec.client.connect();
    await waitFor(() => rec.error.some((e) => e.code === 'token_rejected'), 'token_rejected', 10_000);
    assert.equal(rec.client.state, 'open', 'a rejection keeps the connection');
    await waitFor(() => rec.connected.length === 2, 'reconnected after 4001', 15_000);
    assert.deepEqual(rec.close.map((c) => c.code), [4001]);
    assert.equal(rec.calls, 3);
    rec.client.close();
  } finally {
    await gw.stop();
  }
});
