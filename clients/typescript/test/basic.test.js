// One gateway (embedded broker): connecting, events, heartbeat, protocol
// replies, raw frames, close().
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { publish, recordedClient, startGateway, staffToken, states, tableToken, waitFor } from './helpers.js';

let gw;
before(async () => {
  gw = await startGateway({ env: { WSGATEWAY_HEARTBEAT_INTERVAL_S: '1' } });
});
after(async () => {
  await gw?.stop();
});

test('a waiter connects, receives events, heartbeats, refreshes sectors, sends raw frames, closes', async () => {
  const rec = recordedClient({ url: gw.http, endpoint: 'waiter', getToken: () => staffToken({ sub: 101 }) });
  const c = rec.client;
  assert.equal(c.state, 'closed');
  c.connect();
  assert.equal(c.state, 'connecting');
  await waitFor(() => c.state === 'open', 'open');
  assert.deepEqual(rec.state, ['connecting', 'open']);
  const connected = rec.connected[0];
  assert.equal(connected.endpoint, 'waiter');
  assert.equal(connected.user_id, 101);
  assert.equal(connected.heartbeat_interval_s, 1);
  assert.equal('recovered' in connected, false, 'no cursor on the first connection');
  assert.equal(rec.calls, 1);

  const [id] = await publish(gw, 'channel:branch:5:waiters', { type: 'ROUND_READY', tenant_id: 1, branch_id: 5, entity: { round: 3 } });
  await publish(gw, 'channel:branch:5:waiters', { type: 'TABLE_MERGED', tenant_id: 1, branch_id: 5 });
  await waitFor(() => rec.event.length === 2, 'two events');
  assert.equal(rec.event[0].event_id, id);
  assert.equal(rec.event[0].type, 'ROUND_READY');
  assert.deepEqual(rec.event[0].entity, { round: 3 });
  assert.equal(rec.event[1].type, 'TABLE_MERGED', 'an unknown type is an event all the same');
  assert.equal(c.lastEventId, rec.event[1].event_id);
  assert.equal(rec.message.filter((m) => m.type === 'connected').length, 1, 'message sees every frame');

  // Heartbeat: a ping every heartbeat_interval_s, answered by pong.
  await waitFor(() => rec.message.filter((m) => m.type === 'pong').length >= 2, 'two pongs');

  c.refreshSectors();
  await waitFor(() => rec.sectors_updated.length === 1, 'sectors_updated');
  assert.equal(rec.sectors_updated[0].sector_ids, null, 'no database: unknown');

  c.send('not json');
  c.send('{"type":"dance"}');
  await waitFor(() => rec.error.length === 2, 'two error frames');
  assert.deepEqual(rec.error.map((e) => e.code), ['invalid_json', 'unknown_message_type']);
  assert.equal(rec.event.length, 2, 'replies are not events');
  assert.equal(rec.reconnect.length, 0);

  c.close();
  assert.equal(c.state, 'closed');
  await waitFor(() => rec.close.length === 1, 'close event');
  assert.equal(rec.close[0].code, 1000);
  assert.throws(() => c.send('{"type":"ping"}'), /not connected/);
  assert.deepEqual(rec.state, ['connecting', 'open', 'closed'], states(rec));
});

test('the lastEventId option resumes the first connection: recovered, and the missed events replayed', async () => {
  const ids = [];
  for (const n of [1, 2, 3]) ids.push(...(await publish(gw, 'channel:branch:6:kitchen', { type: 'ROUND_IN_KITCHEN', tenant_id: 1, branch_id: 6, entity: { n } })));
  const rec = recordedClient({ url: gw.ws, endpoint: 'kitchen', lastEventId: ids[0], getToken: () => staffToken({ sub: 104, branches: [6], roles: ['KITCHEN'] }) });
  assert.equal(rec.client.lastEventId, ids[0]);
  rec.client.connect();
  await waitFor(() => rec.event.length === 2, 'the two events after the cursor');
  assert.equal(rec.connected[0].recovered, true);
  assert.deepEqual(rec.event.map((e) => e.event_id), ids.slice(1));
  assert.equal(rec.client.lastEventId, ids[2]);
  rec.client.close();
});

test('a diner connects with table_token and gets its session events', async () => {
  const rec = recordedClient({ url: gw.ws, endpoint: 'diner', getToken: async () => tableToken({ session: 78 }) });
  rec.client.connect();
  await waitFor(() => rec.client.state === 'open', 'open');
  assert.equal(rec.connected[0].endpoint, 'diner');
  assert.equal(rec.connected[0].session_id, 78);
  await publish(gw, 'channel:session:78', { type: 'PAYMENT_APPROVED', tenant_id: 1, branch_id: 5, session_id: 78 });
  await waitFor(() => rec.event.length === 1, 'the session event');
  assert.equal(rec.event[0].type, 'PAYMENT_APPROVED');
  rec.client.close();
});

test('a getToken that fails is retried with backoff, without a socket', async () => {
  const rec = recordedClient({
    url: gw.ws,
    endpoint: 'kitchen',
    backoff: { initialMs: 20, maxMs: 50 },
    getToken: (n) => {
      if (n < 3) throw new Error('auth server down');
      return staffToken({ sub: 102, roles: ['KITCHEN'] });
    },
  });
  rec.client.connect();
  await waitFor(() => rec.client.state === 'open', 'open');
  assert.equal(rec.calls, 3);
  assert.deepEqual(rec.error.map((e) => e.message), ['auth server down', 'auth server down']);
  assert.deepEqual(rec.reconnect.map((r) => r.attempt), [1, 2]);
  assert.equal(rec.close.length, 0, 'no socket was opened for the failed tries');
  rec.client.close();
});

test('the browser bundle is the same client: it connects and receives an event', async () => {
  const bundle = await import('../dist/browser/wsgateway-client.js');
  const { default: WebSocket } = await import('ws');
  const c = new bundle.WsGatewayClient({ url: gw.http, endpoint: 'admin', WebSocket, getToken: () => staffToken({ sub: 103, roles: ['ADMIN'] }) });
  const events = [];
  c.on('event', (e) => events.push(e));
  c.connect();
  try {
    await waitFor(() => c.state === 'open', 'open');
    await publish(gw, 'channel:branch:5:admin', { type: 'ENTITY_UPDATED', tenant_id: 1, branch_id: 5 });
    await waitFor(() => events.length === 1, 'the event');
  } finally {
    c.close();
  }
  assert.equal(c.state, 'closed');
});
