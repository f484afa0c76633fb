// Acknowledgements, redelivery, escalation and presence against a real
// gateway (embedded broker), with the client's auto-ack.
//
// Needs the gateway's acknowledgements and presence (issue #33); against a
// gateway without them, these tests fail.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { metric, publish, recordedClient, startGateway, staffToken, waitFor } from './helpers.js';

let gw;
before(async () => {
  gw = await startGateway({ env: { WSGATEWAY_NODE_NAME: 'ts-acks-node' } });
});
after(async () => {
  await gw?.stop();
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A tenant of the test's own, so that tests on the one gateway do not see each other's events. */
let nextTenant = 1000 + Math.floor(Math.random() * 1_000_000);
const tenantOfItsOwn = () => nextTenant++;

/** Listeners' errors, as the client reports them (reportError), for the test's length. */
function captureReports(t) {
  const reported = [];
  const had = Object.getOwnPropertyDescriptor(globalThis, 'reportError');
  globalThis.reportError = (e) => reported.push(e);
  t.after(() => {
    if (had) Object.defineProperty(globalThis, 'reportError', had);
    else delete globalThis.reportError;
  });
  return reported;
}

/**
 * An admin of the branch that never acknowledges (manual mode, no ack()
 * call): admins also receive the kitchen's events, and an auto-acking
 * admin would acknowledge them itself.
 */
async function watchingAdmin(tenant, branches = [5]) {
  const admin = recordedClient({ url: gw.http, endpoint: 'admin', ack: 'manual', getToken: () => staffToken({ sub: 1, tenant, branches, roles: ['ADMIN'] }) });
  admin.client.connect();
  await waitFor(() => admin.client.state === 'open', 'the admin open');
  return admin;
}

async function kitchen(tenant, onEvent, opts = {}) {
  const rec = recordedClient({ url: gw.http, endpoint: 'kitchen', getToken: () => staffToken({ sub: 9, tenant, roles: ['KITCHEN'] }), ...opts });
  if (onEvent) rec.client.on('event', onEvent);
  rec.client.connect();
  await waitFor(() => rec.client.state === 'open', 'the kitchen open');
  return rec;
}

const escalationsOf = (rec, id) => rec.event.filter((e) => e.type === 'EVENT_UNACKNOWLEDGED' && e.event_id === id);

test('an event with ack is acknowledged automatically once the handler returns: counted, never redelivered nor escalated', async () => {
  const tenant = tenantOfItsOwn();
  const admin = await watchingAdmin(tenant);
  const handled = [];
  const k = await kitchen(tenant, (e) => {
    handled.push(e);
  });
  const before = await metric(gw, 'wsgateway_acks_total', { outcome: 'acknowledged' });
  const withinS = 1;
  const [id] = await publish(gw, 'channel:branch:5:kitchen', { type: 'ROUND_SUBMITTED', tenant_id: tenant, branch_id: 5, entity: { round_id: 1 } }, { ack: { within_s: withinS } });
  await waitFor(() => handled.length === 1, 'the kitchen handler');
  assert.equal(handled[0].event_id, id);
  assert.deepEqual(handled[0].ack, { within_s: withinS }, 'the event carries its ack request');
  await waitFor(() => k.ack.length === 1, 'the ack sent');
  assert.deepEqual(k.ack, [[id]]);
  await waitFor(async () => (await metric(gw, 'wsgateway_acks_total', { outcome: 'acknowledged' })) >= before + 1, 'the ack counted as acknowledged');
  // Past both deadlines (redelivery at within_s, escalation at 2 × within_s), with slack.
  await sleep(2 * withinS * 1000 + 1500);
  assert.equal(handled.length, 1, 'handled once');
  assert.equal(k.message.filter((m) => m.event_id === id).length, 1, 'no redelivery reached the kitchen');
  assert.equal(admin.event.filter((e) => e.event_id === id && e.type === 'ROUND_SUBMITTED').length, 1, 'the admin saw the event');
  assert.deepEqual(escalationsOf(admin, id), [], 'no escalation');
  assert.deepEqual(k.error, []);
});

test('a handler that throws: no ack; the one redelivery is handed to it again; it throws again; the admin gets EVENT_UNACKNOWLEDGED', async (t) => {
  const reported = captureReports(t);
  const tenant = tenantOfItsOwn();
  const admin = await watchingAdmin(tenant);
  const calls = [];
  const k = await kitchen(tenant, (e) => {
    calls.push({ id: e.event_id, redelivered: e.redelivered === true });
    throw new Error('the printer is out of paper');
  });
  const redeliveredBefore = await metric(gw, 'wsgateway_events_redelivered_total');
  const [id] = await publish(gw, 'channel:branch:5:kitchen', { type: 'ROUND_SUBMITTED', tenant_id: tenant, branch_id: 5 }, { ack: { within_s: 1 } });
  await waitFor(() => admin.event.some((e) => e.event_id === id), 'the admin sees the kitchen event');
  // An admin-channel event after it: the admin's cursor, which the escalation must not move.
  const [later] = await publish(gw, 'channel:branch:5:admin', { type: 'ENTITY_UPDATED', tenant_id: tenant, branch_id: 5 });
  const [escalation] = await waitFor(() => escalationsOf(admin, id).length && escalationsOf(admin, id), 'the escalation at the admin', 15_000);
  assert.deepEqual(calls, [{ id, redelivered: false }, { id, redelivered: true }], 'the original, then the one redelivery, each handed once');
  assert.equal(reported.length, 2);
  assert.match(reported[0].message, /out of paper/);
  assert.deepEqual(k.ack, [], 'never acknowledged');
  const frames = k.message.filter((m) => m.event_id === id);
  assert.equal(frames.length, 2);
  assert.equal(frames[1].redelivered, true);
  assert.equal(Object.keys(frames[1])[0], 'redelivered', 'its first field');
  assert.ok((await metric(gw, 'wsgateway_events_redelivered_total')) >= redeliveredBefore + 1);

  assert.equal(escalation.type, 'EVENT_UNACKNOWLEDGED');
  assert.equal(escalation.tenant_id, tenant);
  assert.equal(escalation.branch_id, 5);
  assert.equal(escalation.event_type, 'ROUND_SUBMITTED');
  assert.equal(escalation.channel, 'channel:branch:5:kitchen');
  assert.equal(escalation.reason, 'no_ack');
  // The admin received it too, but only oversees the kitchen's events: the kitchen is the audience.
  assert.equal(escalation.audience, 1, `the kitchen received it (audience ${escalation.audience})`);
  assert.ok(typeof escalation.ts === 'number' && escalation.ts > 1e12, 'Unix ms');
  // The admin received the event and then its escalation, with the same id: both delivered.
  assert.deepEqual(admin.event.filter((e) => e.event_id === id).map((e) => e.type), ['ROUND_SUBMITTED', 'EVENT_UNACKNOWLEDGED']);
  assert.equal(admin.client.lastEventId, later, "the escalation's id is not the cursor");
  await sleep(1500);
  assert.equal(calls.length, 2, 'no third delivery');
  assert.equal(escalationsOf(admin, id).length, 1);
});

test('a handler that fails first and succeeds on the redelivery: acknowledged then, no escalation', async (t) => {
  captureReports(t);
  const tenant = tenantOfItsOwn();
  const admin = await watchingAdmin(tenant);
  let n = 0;
  const k = await kitchen(tenant, async () => {
    n++;
    await sleep(10);
    if (n === 1) throw new Error('first try fails');
  });
  const [id] = await publish(gw, 'channel:branch:5:kitchen', { type: 'ROUND_SUBMITTED', tenant_id: tenant, branch_id: 5 }, { ack: { within_s: 1 } });
  await waitFor(() => k.ack.length === 1, 'the ack after the redelivery', 10_000);
  assert.deepEqual(k.ack, [[id]]);
  assert.equal(n, 2);
  await sleep(2500); // the escalation would have come one within_s after the redelivery
  assert.deepEqual(escalationsOf(admin, id), []);
});

test('an event nobody receives escalates at the first deadline with reason no_audience', async () => {
  const tenant = tenantOfItsOwn();
  const admin = await watchingAdmin(tenant);
  // A table session no diner is connected to (admins never receive session events).
  const [id] = await publish(gw, 'channel:session:424242', { type: 'PAYMENT_APPROVED', tenant_id: tenant, branch_id: 5, session_id: 424242 }, { ack: { within_s: 1 } });
  const [escalation] = await waitFor(() => escalationsOf(admin, id).length && escalationsOf(admin, id), 'the escalation', 10_000);
  assert.equal(escalation.reason, 'no_audience');
  assert.equal(escalation.audience, 0);
  assert.equal(escalation.channel, 'channel:session:424242');
  assert.equal(escalation.event_type, 'PAYMENT_APPROVED');
});

test('presence from an admin: every branch of its token, or one; others refused', async () => {
  const tenant = tenantOfItsOwn();
  const admin = await watchingAdmin(tenant, [5, 6]);
  const k = await kitchen(tenant);
  const all = await admin.client.presence();
  assert.equal(all.length, 2, 'one reply per branch of the token');
  assert.deepEqual(all.map((p) => [p.type, p.tenant_id, p.branch_id]), [['presence', tenant, 5], ['presence', tenant, 6]]);
  const five = all[0].connections;
  assert.deepEqual(five.map((c) => [c.endpoint, c.user_id]), [['admin', 1], ['kitchen', 9]], 'ordered by connected_at');
  for (const c of five) {
    assert.equal(c.node, 'ts-acks-node');
    assert.equal(c.sector_ids, null);
    assert.ok(typeof c.id === 'string' && c.id.length > 0);
    assert.ok(c.connected_at > 1e12);
  }
  assert.deepEqual(all[1].connections.map((c) => c.endpoint), ['admin'], 'branch 6: the admin only');
  const one = await admin.client.presence(5);
  assert.equal(one.branch_id, 5);
  assert.deepEqual(one.connections.map((c) => c.id), five.map((c) => c.id));
  // Several at once: answered in order.
  const [a, b] = await Promise.all([admin.client.presence(6), admin.client.presence(5)]);
  assert.deepEqual([a.branch_id, b.branch_id], [6, 5]);
  await assert.rejects(admin.client.presence(7), (e) => e.code === 'forbidden_branch');
  await assert.rejects(k.client.presence(), (e) => e.code === 'unknown_message_type');
  // The kitchen leaves: the list says so at once.
  k.client.close();
  await waitFor(async () => (await admin.client.presence(5)).connections.length === 1, 'the kitchen gone from the list');
  assert.equal(admin.presence.length >= 6, true, "every reply also reached the 'presence' listeners");
});
