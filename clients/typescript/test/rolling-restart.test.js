// A rolling restart (issue #31): three gateway nodes on one Redis behind a
// TCP load balancer with readiness checks, 45 clients spread over them,
// a publisher running throughout. Each node in turn is drained (SIGTERM:
// its clients are closed with 1012 over WSGATEWAY_DRAIN_S) and started
// again on the same port. Every client must end up holding every event of
// its audience once, in publish order, each resume recovered.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { API_KEY, recordedClient, startGateway, staffToken, tableToken, waitFor } from './helpers.js';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const DRAIN_S = 2;
const BRANCHES = [5, 6, 7];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const run = promisify(execFile);

/**
 * A loopback TCP load balancer: each new connection goes, round-robin, to
 * a backend whose GET /ws/health answered 200 at the last check (every
 * `checkMs`), and bytes are piped both ways. A connection with no ready
 * backend, or whose backend refuses, is dropped. It records every
 * WebSocket connection: the client (from the token in the request line),
 * the backend, when it opened and closed.
 */
async function startBalancer(ports, checkMs = 150) {
  const ready = new Map(ports.map((p) => [p, false]));
  const conns = []; // { key, port, openedAt, closedAt }
  const sockets = new Set();
  let rr = 0;
  let checking = true;
  const checkOnce = () =>
    Promise.all(
      ports.map(async (p) => {
        try {
          const res = await fetch(`http://127.0.0.1:${p}/ws/health`, { signal: AbortSignal.timeout(1000) });
          await res.arrayBuffer();
          ready.set(p, res.status === 200);
        } catch {
          ready.set(p, false);
        }
      }),
    );
  const checker = (async () => {
    while (checking) {
      await checkOnce();
      await sleep(checkMs);
    }
  })();
  const server = net.createServer((client) => {
    const up = ports.filter((p) => ready.get(p));
    if (up.length === 0) {
      client.destroy();
      return;
    }
    const port = up[rr++ % up.length];
    const backend = net.connect(port, '127.0.0.1');
    sockets.add(client);
    sockets.add(backend);
    let conn;
    client.once('data', (d) => {
      const line = d.toString('latin1').split('\r\n')[0];
      const m = /^GET \/ws\/(\w+)\?\S*?\b(?:token|table_token)=([^&\s]+)/.exec(line);
      if (!m) return;
      const claims = JSON.parse(Buffer.from(decodeURIComponent(m[2]).split('.')[1], 'base64url').toString());
      conn = { key: clientKey(m[1], claims), port, openedAt: Date.now(), closedAt: undefined };
      conns.push(conn);
    });
    client.pipe(backend);
    backend.pipe(client);
    const end = () => {
      client.destroy();
      backend.destroy();
      sockets.delete(client);
      sockets.delete(backend);
      if (conn && conn.closedAt === undefined) conn.closedAt = Date.now();
    };
    for (const s of [client, backend]) {
      s.on('error', end);
      s.on('close', end);
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  return {
    url: `ws://127.0.0.1:${port}`,
    http: `http://127.0.0.1:${port}`,
    ready,
    conns,
    checkOnce,
    /** Open WebSocket connections per backend port. */
    openPerBackend() {
      const n = new Map(ports.map((p) => [p, 0]));
      for (const c of conns) if (c.closedAt === undefined) n.set(c.port, n.get(c.port) + 1);
      return n;
    },
    async stop() {
      checking = false;
      await checker;
      for (const s of sockets) s.destroy();
      await new Promise((r) => server.close(r));
    },
  };
}

/**
 * A free port below the kernel's ephemeral range: while a node restarts,
 * its port is free, and an outgoing connection of this or any process
 * must not take it (which a port from `freePort`, in that range, allows).
 */
async function stablePort() {
  let low = 32768;
  try {
    low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || low;
  } catch {
    // not Linux: keep the usual bound
  }
  for (;;) {
    const port = randomInt(Math.max(1024, low - 12_000), low);
    const free = await new Promise((resolve) => {
      const srv = net.createServer();
      srv.once('error', () => resolve(false));
      srv.listen(port, '127.0.0.1', () => srv.close(() => resolve(true)));
    });
    if (free) return port;
  }
}

/** The gateway on `port`; tried again while that fails (the port still held by something for a moment). */
async function startOn(port, env) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startGateway({ port, env });
    } catch (e) {
      if (attempt >= 5) throw e;
      await sleep(500);
    }
  }
}

/** The balancer's name for a client, from its token: staff by `sub`, diners by session. */
function clientKey(endpoint, claims) {
  return endpoint === 'diner' ? `session-${claims.session_id}` : `user-${claims.sub}`;
}

/** The clients: per branch 10 waiters, a kitchen, an admin and 2 diners; and 3 waiters of branches 5 and 6. */
function clientSpecs() {
  const specs = [];
  let sub = 5000;
  let session = 9000;
  for (const b of BRANCHES) {
    for (let i = 0; i < 10; i++) specs.push({ endpoint: 'waiter', sub: ++sub, branches: [b], roles: ['WAITER'] });
    specs.push({ endpoint: 'kitchen', sub: ++sub, branches: [b], roles: ['KITCHEN'] });
    specs.push({ endpoint: 'admin', sub: ++sub, branches: [b], roles: ['ADMIN'] });
    for (let i = 0; i < 2; i++) specs.push({ endpoint: 'diner', branch: b, session: ++session, table: session - 8900 });
  }
  for (let i = 0; i < 3; i++) specs.push({ endpoint: 'waiter', sub: ++sub, branches: [5, 6], roles: ['WAITER'] });
  for (const s of specs) {
    s.key = s.endpoint === 'diner' ? `session-${s.session}` : `user-${s.sub}`;
    s.name = s.endpoint === 'diner' ? `diner(session ${s.session}, branch ${s.branch})` : `${s.endpoint} ${s.sub} (branches ${s.branches})`;
  }
  return specs;
}

/** Whether a client of `spec` is in the audience of an event on `channel` (PROTOCOL.md, the channel table). */
function hears(spec, channel) {
  if (spec.endpoint === 'diner') return channel === `channel:session:${spec.session}`;
  if (channel === 'channel:tenant:staff') return true;
  const m = /^channel:branch:(\d+):(\w+)$/.exec(channel);
  if (!m || !spec.branches.includes(Number(m[1]))) return false;
  const kind = m[2];
  if (spec.endpoint === 'admin') return true;
  return kind === (spec.endpoint === 'waiter' ? 'waiters' : 'kitchen');
}

/** Every channel published on, and the event for it. */
function channelsAndEvents(specs) {
  const list = [];
  for (const b of BRANCHES) {
    for (const kind of ['waiters', 'kitchen', 'admin']) list.push({ channel: `channel:branch:${b}:${kind}`, base: { type: 'ROUND_READY', tenant_id: 1, branch_id: b } });
  }
  for (const s of specs.filter((s) => s.endpoint === 'diner')) {
    list.push({ channel: `channel:session:${s.session}`, base: { type: 'ROUND_SERVED', tenant_id: 1, branch_id: s.branch, session_id: s.session } });
  }
  list.push({ channel: 'channel:tenant:staff', base: { type: 'ENTITY_UPDATED', tenant_id: 1, branch_id: 5 } });
  return list;
}

/** How `got` (event ids) differs from `want`: missing, repeated, extra, first place out of order. */
function diff(want, got) {
  const wantSet = new Set(want);
  const seen = new Map();
  for (const id of got) seen.set(id, (seen.get(id) ?? 0) + 1);
  const missing = want.filter((id) => !seen.has(id));
  const repeated = [...seen].filter(([, n]) => n > 1).map(([id, n]) => `${id}×${n}`);
  const extra = got.filter((id) => !wantSet.has(id));
  const once = got.filter((id, i) => got.indexOf(id) === i && wantSet.has(id));
  const expectedOrder = want.filter((id) => seen.has(id));
  const k = once.findIndex((id, i) => id !== expectedOrder[i]);
  const order = k < 0 ? 'in order' : `out of order at ${k}: got ${once.slice(Math.max(0, k - 2), k + 3)} where ${expectedOrder.slice(Math.max(0, k - 2), k + 3)} was due`;
  return { missing, repeated, extra, order };
}

async function deletePrefix(prefix) {
  const base = ['-u', REDIS_URL];
  const { stdout } = await run('redis-cli', [...base, '--scan', '--pattern', `${prefix}:*`]);
  const keys = stdout.split('\n').filter(Boolean);
  for (let i = 0; i < keys.length; i += 500) await run('redis-cli', [...base, 'DEL', ...keys.slice(i, i + 500)]);
  await run('redis-cli', [...base, 'FUNCTION', 'DELETE', `${prefix}_wsgateway`]).catch(() => {});
  return keys.length;
}

test('rolling restart of three nodes: every client holds every event once, in order, each resume recovered', { timeout: 100_000 }, async (t) => {
  const t0 = Date.now();
  const log = (msg) => t.diagnostic(`${((Date.now() - t0) / 1000).toFixed(1)}s ${msg}`);
  /** Every process started, old and new, for the logs. */
  const incarnations = [];
  const prefix = `tsroll_${randomBytes(6).toString('hex')}`;
  const env = {
    REDIS_URL,
    WSGATEWAY_REDIS_PREFIX: prefix,
    WSGATEWAY_HISTORY_SIZE: '10000',
    WSGATEWAY_DRAIN_S: String(DRAIN_S),
    WSGATEWAY_SHUTDOWN_GRACE_S: '3',
  };
  const ports = [];
  while (ports.length < 3) {
    const p = await stablePort();
    if (!ports.includes(p)) ports.push(p);
  }
  const nodes = await Promise.all(ports.map((port) => startOn(port, env)));
  nodes.forEach((gw, i) => incarnations.push({ name: `node ${i} (first)`, gw }));
  let lb;
  const recs = [];
  let stopPublishing = false;
  let publisher;
  try {
    lb = await startBalancer(ports);
    await waitFor(() => ports.every((p) => lb.ready.get(p)), 'the three nodes ready at the balancer');

    const specs = clientSpecs();
    const backoff = { initialMs: 100, maxMs: 1000, restartSpreadMs: 1000 };
    for (const spec of specs) {
      const getToken =
        spec.endpoint === 'diner'
          ? () => tableToken({ tenant: 1, branch: spec.branch, table: spec.table, session: spec.session })
          : () => staffToken({ sub: spec.sub, tenant: 1, branches: spec.branches, roles: spec.roles });
      const rec = recordedClient({ url: lb.url, endpoint: spec.endpoint, backoff, getToken });
      rec.spec = spec;
      rec.timeline = [];
      rec.client.on('close', (c) => rec.timeline.push(`${Date.now() - t0}ms close ${c.code}`));
      rec.client.on('connected', (f) => rec.timeline.push(`${Date.now() - t0}ms connected recovered=${f.recovered} after ${rec.event.at(-1)?.event_id}`));
      recs.push(rec);
      rec.client.connect();
    }
    await waitFor(() => recs.every((r) => r.client.state === 'open'), 'every client open', 30_000);
    const initial = lb.openPerBackend();
    log(`${recs.length} clients open, per node ${[...initial.values()]}`);

    // The publisher: one event at a time, round the channels, each with its
    // own event_id and sequence number, retried with the same id until 202.
    const targets = channelsAndEvents(specs);
    const published = []; // { id, seq, channel }, in publish order
    let retries = 0;
    let duplicates = 0;
    publisher = (async () => {
      for (let seq = 0; !stopPublishing; seq++) {
        const { channel, base } = targets[seq % targets.length];
        const id = `roll-${seq}`;
        const body = JSON.stringify({ channel, event: { ...base, event_id: id, entity: { seq } } });
        for (;;) {
          try {
            const res = await fetch(`${lb.http}/api/publish`, {
              method: 'POST',
              headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
              body,
              signal: AbortSignal.timeout(5000),
            });
            const text = await res.text();
            if (res.status === 202) {
              const answer = JSON.parse(text);
              assert.equal(answer.event_ids[0], id);
              if (answer.duplicates[0]) duplicates++;
              break;
            }
            if (res.status !== 503 && res.status !== 504) throw new Error(`publish: ${res.status} ${text}`);
          } catch (e) {
            if (e instanceof assert.AssertionError || /^publish: /.test(e.message)) throw e;
          }
          retries++;
          await sleep(50);
        }
        published.push({ id, seq, channel });
        await sleep(25);
      }
    })();
    const publisherFailed = publisher.then(
      () => new Promise(() => {}),
      (e) => e,
    );
    const orFail = async (p) => {
      const r = await Promise.race([p, publisherFailed.then((e) => ({ publisherError: e }))]);
      if (r && r.publisherError) throw r.publisherError;
      return r;
    };

    // Every client holds a cursor before the first restart, so that every later connection resumes.
    await orFail(waitFor(() => recs.every((r) => r.event.length > 0), 'an event at every client', 20_000));
    log(`every client has an event; ${published.length} published`);

    const atSigterm = [];
    for (let i = 0; i < nodes.length; i++) {
      const open = lb.openPerBackend().get(ports[i]);
      atSigterm.push(open);
      log(`SIGTERM node ${i} (port ${ports[i]}, ${open} clients; published ${published.length})`);
      const old = nodes[i];
      await orFail(old.stop(DRAIN_S * 1000 + 10_000));
      assert.equal(old.proc.signalCode, null, `node ${i} was killed: the drain did not end in time\n${old.logs.slice(-30).join('\n')}`);
      assert.equal(old.proc.exitCode, 0, `node ${i} exit code\n${old.logs.slice(-30).join('\n')}`);
      log(`node ${i} exited 0; starting it again`);
      nodes[i] = await orFail(startOn(ports[i], env));
      incarnations.push({ name: `node ${i} (restarted)`, gw: nodes[i] });
      await orFail(waitFor(() => lb.ready.get(ports[i]), `node ${i} ready again at the balancer`, 20_000));
      log(`node ${i} ready again; per node ${[...lb.openPerBackend().values()]}`);
    }

    // Some events after the last restart too, then the publisher stops.
    const afterLast = published.length;
    await orFail(waitFor(() => published.length >= afterLast + 30 && recs.every((r) => r.client.state === 'open'), 'events after the last restart, every client open', 30_000));
    stopPublishing = true;
    await publisher;
    log(`published ${published.length} events (${retries} retries, ${duplicates} answered as duplicates)`);

    const want = new Map(recs.map((r) => [r, published.filter((p) => hears(r.spec, p.channel)).map((p) => p.id)]));
    const held = (r) => {
      const ids = new Set(r.event.map((e) => e.event_id));
      return want.get(r).filter((id) => ids.has(id)).length;
    };
    await waitFor(() => recs.every((r) => held(r) === want.get(r).length), 'every client holding every event of its audience', 30_000).catch((e) => {
      log(`${e.message}: ${recs.filter((r) => held(r) < want.get(r).length).map((r) => `${r.spec.name} ${held(r)}/${want.get(r).length}`).join('; ')}`);
    });
    log(`done; per node at the end ${[...lb.openPerBackend().values()]}`);

    // Every client: exactly its audience's events, each once, in publish order.
    const bad = [];
    for (const r of recs) {
      const got = r.event.map((e) => e.event_id);
      const w = want.get(r);
      if (got.length === w.length && got.every((id, k) => id === w[k])) continue;
      const d = diff(w, got);
      const conns = lb.conns.filter((c) => c.key === r.spec.key).map((c) => `${c.openedAt - t0}ms→node ${ports.indexOf(c.port)}`);
      bad.push(
        `${r.spec.name}: ${got.length} events, ${w.length} due; missing ${d.missing.length} [${d.missing.slice(0, 10)}], ` +
          `repeated [${d.repeated.slice(0, 10)}], extra [${d.extra.slice(0, 10)}], ${d.order}\n` +
          `    timeline: ${r.timeline.join(', ')}\n    connections: ${conns.join(', ')}`,
      );
    }
    // Frames as the gateway sent them, before the client drops repeats: none repeated either.
    const rawRepeats = [];
    for (const r of recs) {
      const ids = r.message.filter((m) => typeof m.event_id === 'string').map((m) => m.event_id);
      const rep = ids.filter((id, k) => ids.indexOf(id) !== k);
      if (rep.length) rawRepeats.push(`${r.spec.name}: [${rep.slice(0, 10)}]; timeline: ${r.timeline.join(', ')}`);
    }
    if (bad.length || rawRepeats.length) {
      // The nodes' logs: all in a file, and here the lines of the first failing clients and every warning.
      const file = path.join(os.tmpdir(), `${prefix}-gateway-logs.txt`);
      writeFileSync(file, incarnations.map(({ name, gw }) => `== ${name}, port ${gw.port}, pid ${gw.pid}\n${gw.logs.join('\n')}\n`).join(''));
      log(`the nodes' logs: ${file}`);
      const failing = recs.filter((r) => [...bad, ...rawRepeats].some((b) => b.startsWith(`${r.spec.name}:`))).slice(0, 3);
      const marks = failing.map((r) => (r.spec.endpoint === 'diner' ? `"session":${r.spec.session},` : `"user":${r.spec.sub},`));
      for (const { name, gw } of incarnations) {
        for (const line of gw.logs) {
          if (/"level":"(WARN|ERROR)"/.test(line) || marks.some((m) => line.includes(m))) log(`${name}: ${line}`);
        }
      }
    }
    assert.deepEqual(bad, [], `${bad.length} of ${recs.length} clients do not hold their events once, in order`);
    assert.deepEqual(rawRepeats, [], 'the gateway sent an event twice to a client');

    for (const r of recs) {
      const msg = `${r.spec.name}: ${r.timeline.join(', ')}`;
      assert.ok(r.close.some((c) => c.code === 1012), `no 1012 close: ${msg}`);
      assert.equal(r.connected[0].recovered, undefined, msg);
      assert.ok(r.connected.length >= 2, `never reconnected: ${msg}`);
      assert.ok(r.connected.slice(1).every((f) => f.recovered === true), `a resume not recovered: ${msg}`);
    }
    // Each drain had clients to move, and they ended on more than one node.
    assert.ok(atSigterm.every((n) => n > 0), `open connections per node at its SIGTERM: ${atSigterm}`);
    const end = [...lb.openPerBackend().values()];
    assert.equal(end.reduce((a, b) => a + b, 0), recs.length, `open connections at the end: ${end}`);
    assert.ok(end.filter((n) => n > 0).length >= 2, `open connections per node at the end: ${end}`);
  } finally {
    stopPublishing = true;
    await publisher?.catch(() => {});
    for (const r of recs) r.client.close();
    await lb?.stop();
    await Promise.all(nodes.map((gw) => gw.stop()));
    await deletePrefix(prefix).catch((e) => t.diagnostic(`could not delete the Redis keys under ${prefix}: ${e.message}`));
  }
});
