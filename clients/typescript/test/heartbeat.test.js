// A frozen gateway (SIGSTOP): the heartbeat deadline finds the dead
// connection, the connect deadline the unanswered handshakes, and the client
// is back once the gateway runs again (SIGCONT).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { publish, recordedClient, startGateway, staffToken, states, waitFor } from './helpers.js';

test('no answer to a ping within the deadline: closed as 1006 and reconnected', async () => {
  const gw = await startGateway({ env: { WSGATEWAY_HEARTBEAT_INTERVAL_S: '1' } });
  try {
    const rec = recordedClient({
      url: gw.ws,
      endpoint: 'waiter',
      heartbeatTimeoutMs: 1500,
      connectTimeoutMs: 1500,
      backoff: { initialMs: 50, maxMs: 200 },
      getToken: () => staffToken({ sub: 401 }),
    });
    rec.client.connect();
    await waitFor(() => rec.client.state === 'open', 'open');
    await publish(gw, 'channel:branch:5:waiters', { type: 'ROUND_READY', tenant_id: 1, branch_id: 5 });
    await waitFor(() => rec.event.length === 1, 'an event');
    gw.signal('SIGSTOP');
    try {
      await waitFor(() => rec.close.length >= 1, 'the heartbeat deadline', 10_000);
      assert.deepEqual(rec.close[0], { code: 1006, reason: 'heartbeat timeout' });
      assert.equal(rec.reconnect[0].code, 1006);
      // The kernel still accepts TCP connections; nobody answers the upgrade.
      await waitFor(() => rec.close.some((c) => c.reason === 'connect timeout'), 'a connect timeout', 10_000);
      assert.equal(rec.client.state, 'reconnecting');
    } finally {
      gw.signal('SIGCONT');
    }
    await waitFor(() => rec.connected.length === 2, `back (${states(rec)})`, 15_000);
    assert.equal(rec.connected[1].recovered, true);
    rec.client.close();
  } finally {
    await gw.stop();
  }
});
