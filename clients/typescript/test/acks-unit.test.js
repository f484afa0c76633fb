// Acknowledgements, redelivery de-duplication, escalations and presence,
// against a stand-in WebSocket the test drives (the wire contract:
// docs/PROTOCOL.md, acknowledgements and presence).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ACK_BATCH_MAX, ACK_FLUSH_MS, WsGatewayClient } from '../dist/index.js';
import { fakeWebSocket } from './fake-socket.js';


const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const settle = () => sleep(ACK_FLUSH_MS * 3);

async function socketN(sockets, n) {
  const deadline = Date.now() + 10_000;
  while (sockets.length < n) {
    if (Date.now() > deadline) throw new Error(`no socket ${n}`);
    await sleep(2);
  }
  return sockets[n - 1];
}

const STAFF_CONNECTED = { type: 'connected', endpoint: 'kitchen', user_id: 9, tenant_id: 1, branch_ids: [5], sector_ids: null, heartbeat_interval_s: 30 };
const ADMIN_CONNECTED = { ...STAFF_CONNECTED, endpoint: 'admin', branch_ids: [5, 6] };

const ev = (id, extra = {}) => ({ event_id: id, type: 'ROUND_SUBMITTED', tenant_id: 1, branch_id: 5, ack: { within_s: 30 }, ...extra });

/**
 * A client on a stand-in socket; `reported` collects what the client
 * reports as the platform would (reportError), so that a throwing
 * listener does not crash the test runner.
 */
async function setup(t, opts = {}, connected = STAFF_CONNECTED) {
  const { FakeWebSocket, sockets } = fakeWebSocket();
  const reported = [];
  const had = Object.getOwnPropertyDescriptor(globalThis, 'reportError');
  globalThis.reportError = (e) => reported.push(e);
  const client = new WsGatewayClient({
    url: 'ws://gw',
    endpoint: connected.endpoint,
    getToken: () => 't',
    WebSocket: FakeWebSocket,
    backoff: { initialMs: 1, maxMs: 2, restartSpreadMs: 0 },
    ...opts,
  });
  t.after(() => {
    client.close();
    if (had) Object.defineProperty(globalThis, 'reportError', had);
    else delete globalThis.reportError;
  });
  client.connect();
  const ws = await socketN(sockets, 1);
  ws.open(connected);
  assert.equal(client.state, 'open');
  return { client, sockets, ws, reported };
}

test('auto ack: sent once the listener has returned, the ids of one tick in one message; events without ack are not acked', async (t) => {
  const { client, ws } = await setup(t);
  const handled = [];
  client.on('event', (e) => handled.push(e.event_id));
  const sentAcks = [];
  client.on('ack', (ids) => sentAcks.push(ids));
  ws.deliver(ev('1'));
  ws.deliver(ev('2'));
  ws.deliver({ event_id: '3', type: 'ROUND_READY', tenant_id: 1, branch_id: 5 }); // no ack asked
  ws.deliver(ev('4'));
  assert.deepEqual(handled, ['1', '2', '3', '4']);
  assert.deepEqual(ws.acks(), [], 'batched: nothing sent in the same tick');
  await settle();
  assert.deepEqual(ws.acks(), [['1', '2', '4']]);
  assert.deepEqual(sentAcks, [['1', '2', '4']], "the 'ack' listeners see what was sent");
  await settle();
  assert.equal(ws.acks().length, 1, 'sent once');
});

test(`auto ack: ${ACK_BATCH_MAX} pending ids go at once, the rest after the flush delay`, async (t) => {
  const { ws } = await setup(t);
  const ids = Array.from({ length: ACK_BATCH_MAX + 30 }, (_, i) => `e${i}`);
  for (const id of ids) ws.deliver(ev(id));
  assert.deepEqual(ws.acks(), [ids.slice(0, ACK_BATCH_MAX)], 'a full message at once');
  await settle();
  assert.deepEqual(ws.acks(), [ids.slice(0, ACK_BATCH_MAX), ids.slice(ACK_BATCH_MAX)]);
});

test('auto ack waits for the Promise a listener returns; a rejection or a throw means no ack, reported as errors are', async (t) => {
  const { client, ws, reported } = await setup(t);
  const gates = new Map();
  client.on('event', (e) => {
    if (e.event_id === 'throws') throw new Error('boom');
    return new Promise((resolve, reject) => gates.set(e.event_id, { resolve, reject }));
  });
  ws.deliver(ev('slow'));
  ws.deliver(ev('rejects'));
  ws.deliver(ev('throws'));
  await settle();
  assert.deepEqual(ws.acks(), [], 'nothing acked while the handlers run (and never a throwing one)');
  assert.equal(reported.length, 1);
  assert.match(reported[0].message, /boom/);
  gates.get('rejects').reject(new Error('no kitchen printer'));
  gates.get('slow').resolve();
  await settle();
  assert.deepEqual(ws.acks(), [['slow']]);
  assert.equal(reported.length, 2);
  assert.match(reported[1].message, /no kitchen printer/);
});

test('auto ack waits for every listener', async (t) => {
  const { client, ws } = await setup(t);
  let release;
  client.on('event', () => undefined);
  client.on('event', () => new Promise((r) => (release = r)));
  ws.deliver(ev('a'));
  await settle();
  assert.deepEqual(ws.acks(), []);
  release();
  await settle();
  assert.deepEqual(ws.acks(), [['a']]);
});

test('a redelivery of a handled and acked event: not handed again, the ack sent again', async (t) => {
  const { client, ws } = await setup(t);
  const handled = [];
  client.on('event', (e) => handled.push(e.event_id));
  ws.deliver(ev('7'));
  await settle();
  assert.deepEqual(ws.acks(), [['7']]);
  ws.deliver({ redelivered: true, ...ev('7') });
  await settle();
  assert.deepEqual(handled, ['7'], 'not handed twice');
  assert.deepEqual(ws.acks(), [['7'], ['7']], 'the first ack may have been lost: sent again');
});

test('a redelivery while the handler still runs: nothing (not handed, not acked); the ack follows the handler', async (t) => {
  const { client, ws } = await setup(t);
  let release;
  const handled = [];
  client.on('event', (e) => {
    handled.push(e.event_id);
    return new Promise((r) => (release = r));
  });
  ws.deliver(ev('8'));
  ws.deliver({ redelivered: true, ...ev('8') });
  await settle();
  assert.deepEqual(handled, ['8']);
  assert.deepEqual(ws.acks(), []);
  release();
  await settle();
  assert.deepEqual(ws.acks(), [['8']]);
});

test('a redelivery after a failed handler is handed again (the application did not process it), and acked when it succeeds', async (t) => {
  const { client, ws, reported } = await setup(t);
  const calls = [];
  client.on('event', (e) => {
    calls.push({ id: e.event_id, redelivered: e.redelivered === true });
    if (calls.length === 1) throw new Error('first try fails');
  });
  ws.deliver(ev('9'));
  await settle();
  assert.deepEqual(ws.acks(), []);
  assert.equal(reported.length, 1);
  ws.deliver({ redelivered: true, ...ev('9') });
  await settle();
  assert.deepEqual(calls, [{ id: '9', redelivered: false }, { id: '9', redelivered: true }]);
  assert.deepEqual(ws.acks(), [['9']]);
  ws.deliver({ redelivered: true, ...ev('9') }); // never a third time from the gateway, but a repeat is a repeat
  assert.equal(calls.length, 2);
});

test('manual mode: no ack until client.ack(id); a redelivery before it is not handed again; after it, the ack is sent again', async (t) => {
  const { client, ws } = await setup(t, { ack: 'manual' });
  const handled = [];
  client.on('event', (e) => handled.push(e.event_id));
  ws.deliver(ev('m1'));
  ws.deliver(ev('m2'));
  await settle();
  assert.deepEqual(ws.acks(), [], 'manual: nothing by itself');
  ws.deliver({ redelivered: true, ...ev('m1') });
  await settle();
  assert.deepEqual(handled, ['m1', 'm2']);
  assert.deepEqual(ws.acks(), []);
  client.ack('m1');
  client.ack(['m2']);
  await settle();
  assert.deepEqual(ws.acks(), [['m1', 'm2']], 'batched like the auto ones');
  ws.deliver({ redelivered: true, ...ev('m2') });
  await settle();
  assert.deepEqual(ws.acks(), [['m1', 'm2'], ['m2']]);
  assert.deepEqual(handled, ['m1', 'm2']);
  assert.throws(() => client.ack(''), /non-empty/);
  assert.throws(() => new WsGatewayClient({ url: 'ws://h', endpoint: 'waiter', getToken: () => 't', WebSocket: class {}, ack: 'sometimes' }), /ack must be/);
});

test("acks are per connection: one not sent before the close is dropped, and sent on the new connection once it shows the event again", async (t) => {
  const { client, sockets, ws } = await setup(t);
  let release;
  const handled = [];
  client.on('event', (e) => {
    handled.push(e.event_id);
    if (e.event_id === 'p1') return new Promise((r) => (release = r));
  });
  ws.deliver(ev('p1'));
  ws.deliver(ev('p2')); // acked, but the socket closes within the flush delay
  ws.drop(1006);
  const ws2 = await socketN(sockets, 2);
  ws2.open({ ...STAFF_CONNECTED, recovered: true });
  release(); // p1's handler ends on the new connection, which never got p1
  await settle();
  assert.deepEqual(ws.acks(), [], 'the first socket closed before its flush');
  assert.deepEqual(ws2.acks(), [], 'the new connection did not receive p1 or p2: no ack the gateway would ignore');
  // The gateway redelivers both to the new connection: acked there, not handed again.
  ws2.deliver({ redelivered: true, ...ev('p1') });
  ws2.deliver({ redelivered: true, ...ev('p2') });
  await settle();
  assert.deepEqual(ws2.acks(), [['p1', 'p2']]);
  assert.deepEqual(handled, ['p1', 'p2']);
});

test('de-duplication is by (type, event_id): an EVENT_UNACKNOWLEDGED with a known id is delivered, once, and never becomes the cursor', async (t) => {
  const { client, ws } = await setup(t, {}, ADMIN_CONNECTED);
  const got = [];
  client.on('event', (e) => got.push(`${e.type}:${e.event_id}`));
  ws.deliver({ event_id: '100', type: 'ROUND_SUBMITTED', tenant_id: 1, branch_id: 5, ack: { within_s: 1 } });
  ws.deliver({ event_id: '101', type: 'ENTITY_UPDATED', tenant_id: 1, branch_id: 5 });
  assert.equal(client.lastEventId, '101');
  const escalation = {
    event_id: '100', type: 'EVENT_UNACKNOWLEDGED', tenant_id: 1, branch_id: 5, event_type: 'ROUND_SUBMITTED',
    channel: 'channel:branch:5:kitchen', reason: 'no_ack', audience: 2, ts: 1765090060123,
  };
  ws.deliver(escalation);
  assert.equal(client.lastEventId, '101', "an escalation's event_id is another event's: not the cursor");
  ws.deliver(escalation); // a replay after a resume
  ws.deliver({ event_id: '101', type: 'ENTITY_UPDATED', tenant_id: 1, branch_id: 5 });
  assert.deepEqual(got, ['ROUND_SUBMITTED:100', 'ENTITY_UPDATED:101', 'EVENT_UNACKNOWLEDGED:100']);
  // A redelivery of an event never seen is handed to the listeners, but moves no cursor either (it is an older event).
  ws.deliver({ redelivered: true, event_id: '99', type: 'ROUND_SUBMITTED', tenant_id: 1, branch_id: 5, ack: { within_s: 1 } });
  assert.equal(got.at(-1), 'ROUND_SUBMITTED:99');
  assert.equal(client.lastEventId, '101');
  await settle();
  assert.deepEqual(ws.acks(), [['100', '99']]);
});

test('presence: one request at a time, answered in order; all branches of the token, or one; errors and closes reject', async (t) => {
  const { client, sockets, ws } = await setup(t, { presenceTimeoutMs: 5_000 }, ADMIN_CONNECTED);
  const frames = [];
  client.on('presence', (f) => frames.push(f));
  const reply = (branch, connections = []) => ({ type: 'presence', tenant_id: 1, branch_id: branch, connections });
  const conn = { id: 'n/1', endpoint: 'kitchen', user_id: 9, sector_ids: null, connected_at: 1, node: 'n' };

  const all = client.presence();
  const one = client.presence(6);
  const refused = client.presence(7);
  assert.deepEqual(ws.others(), [{ type: 'presence' }], 'one in flight');
  ws.deliver(reply(5, [conn]));
  assert.deepEqual(ws.others(), [{ type: 'presence' }], 'the first waits for its second frame');
  ws.deliver(reply(6));
  assert.deepEqual(await all, [reply(5, [conn]), reply(6)]);
  assert.deepEqual(ws.others(), [{ type: 'presence' }, { type: 'presence', branch_id: 6 }]);
  ws.deliver(reply(6));
  assert.deepEqual(await one, reply(6));
  assert.deepEqual(ws.others().at(-1), { type: 'presence', branch_id: 7 });
  ws.deliver({ type: 'error', code: 'forbidden_branch' });
  await assert.rejects(refused, (e) => e.code === 'forbidden_branch');
  assert.equal(frames.length, 3, "every frame also reaches the 'presence' listeners");

  const unavailable = client.presence(5);
  ws.deliver({ type: 'error', code: 'presence_unavailable' });
  await assert.rejects(unavailable, /presence_unavailable/);

  // A close rejects the one in flight and the queued ones.
  const inFlight = client.presence(5);
  const queued = client.presence(6);
  ws.drop(1006);
  await assert.rejects(inFlight, /closed/);
  await assert.rejects(queued, /closed/);
  await assert.rejects(client.presence(5), /not connected/);
  const ws2 = await socketN(sockets, 2);
  ws2.open(ADMIN_CONNECTED);
  const again = client.presence(5);
  ws2.deliver(reply(5));
  assert.deepEqual(await again, reply(5));
  assert.equal(frames.length, 4);
});

test('presence: a timeout rejects, and its late answer is not taken for the next request', async (t) => {
  const { client, ws } = await setup(t, { presenceTimeoutMs: 50 }, ADMIN_CONNECTED);
  const first = client.presence(5);
  const second = client.presence(6);
  await assert.rejects(first, /no presence answer within 50 ms/);
  assert.deepEqual(ws.others(), [{ type: 'presence', branch_id: 5 }, { type: 'presence', branch_id: 6 }]);
  ws.deliver({ type: 'presence', tenant_id: 1, branch_id: 5, connections: [] }); // the late one
  ws.deliver({ type: 'presence', tenant_id: 1, branch_id: 6, connections: [] });
  assert.equal((await second).branch_id, 6);
});

test('presence on another endpoint: the gateway answers unknown_message_type, and the promise rejects', async (t) => {
  const { client, ws } = await setup(t);
  const p = client.presence();
  assert.deepEqual(ws.others(), [{ type: 'presence' }]);
  ws.deliver({ type: 'error', code: 'unknown_message_type' });
  await assert.rejects(p, (e) => e.code === 'unknown_message_type');
});
