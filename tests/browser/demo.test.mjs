// The demo page in headless Chromium, against real gateway processes.
//
// `serve` (Redis broker, WSGATEWAY_DEMO_PAGE=true): paste a printed URL,
// stay open on heartbeats, receive an event published through the API,
// survive a gateway restart (SIGKILL of the pid started here, then a new
// process on the same port), and resume with `recovered: true`: the event
// published through Redis while no gateway ran is replayed, then live
// events follow. `dev`: the page explains a 4001 (a bad token), picks a
// bare token's endpoint by its roles, offers its tokens, and the copyable
// curl command works; after a restart the embedded history is gone, and
// the page says `recovered: false`. Both: no console errors, no failed
// request (the favicon included), no horizontal overflow at 390 px nor at
// 1280 px. And hostile values: a pasted URL, a `connected` frame (from a
// stand-in gateway), an API key, each full of ;, $( ), backticks, quotes
// and newlines: each command as the Copy button copies it, run by sh with
// stubs for curl and wsgateway (shell_stub.mjs), runs exactly one command
// with exactly the intended arguments.
//
// Needs the built gateway (WSGATEWAY_BIN, default target/debug/wsgateway),
// Chromium (CHROMIUM_BIN, default /usr/bin/chromium), curl, redis-cli and a
// Redis at REDIS_URL (default redis://127.0.0.1:6379). Every wait is a
// condition with a deadline.
//
// Acknowledgements (serve): a kitchen page acknowledges an event that asks
// for it (a line in its log), and, set to acknowledge by hand and not doing
// it, shows the redelivery while the admin's page shows the escalation
// (EVENT_UNACKNOWLEDGED, above its log); the admin's page lists who is
// connected (the gateway's presence answer).

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { createHash, randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { promisify } from 'node:util';
import puppeteer from 'puppeteer-core';
import { HOSTILE, shellStubs } from './shell_stub.mjs';

const run = promisify(execFile);
const ROOT = new URL('../../', import.meta.url).pathname;
const BIN = process.env.WSGATEWAY_BIN ?? `${ROOT}target/debug/wsgateway`;
const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const JWT_SECRET = 'browser-test-jwt-secret';
const TABLE_SECRET = 'browser-test-table-secret';
const API_KEY = 'browser-test-api-key';
// A deployment of its own on the shared Redis: another suite's gateways
// there under the same prefix, with another TABLE_TOKEN_SECRET, would load
// the function library with their signing key, and this test's gateways
// would drop every message signed with it (and theirs this test's).
const PREFIX = `browser_${process.pid}`;
const FCALL_PUBLISH = `${PREFIX}_wsgateway_publish`;
after(() => run('redis-cli', ['-u', REDIS_URL, 'FUNCTION', 'DELETE', `${PREFIX}_wsgateway`]).catch(() => {}));
// Deadlines, generous for a loaded 2-core machine; none is waited in full
// when things work.
const START_MS = 30_000;
const STEP_MS = 20_000;
// A reconnect after a restart: the backoff's delays grow to 30 s.
const RECONNECT_MS = 60_000;

for (const [what, path] of [['the gateway (WSGATEWAY_BIN)', BIN], ['Chromium (CHROMIUM_BIN)', CHROMIUM]]) {
  if (!existsSync(path)) throw new Error(`${what} not found at ${path}`);
}

async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Polls `check` until it returns a truthy value, or fails naming `what`. */
async function waitFor(what, check, timeoutMs = STEP_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    try {
      const value = await check();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
}

/** A gateway process; its output is kept for the failure message and the token check. */
class GatewayProcess {
  constructor(mode, port, env) {
    this.port = port;
    this.output = '';
    this.child = spawn(BIN, [mode], {
      env: { ...process.env, RUST_LOG: 'info', WSGATEWAY_LISTEN: `127.0.0.1:${port}`, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.exited = new Promise((resolve) => this.child.on('exit', (code, signal) => resolve({ code, signal })));
    for (const stream of [this.child.stdout, this.child.stderr]) stream.on('data', (d) => { this.output += d; });
  }

  async ready() {
    await waitFor(`the gateway on port ${this.port} to answer /ws/health`, async () => {
      if (this.child.exitCode !== null) throw new Error(`gateway exited: ${this.output}`);
      const res = await fetch(`http://127.0.0.1:${this.port}/ws/health`);
      return res.ok;
    }, START_MS);
    return this;
  }

  /** Sends `signal` to the process started here, by its pid. */
  signal(signal) {
    process.kill(this.child.pid, signal);
  }

  /** Kills the process started here, by its pid, and waits for it to be gone. */
  async kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) process.kill(this.child.pid, 'SIGKILL');
    await this.exited;
  }
}

async function publish(port, key, channel, event) {
  const res = await fetch(`http://127.0.0.1:${port}/api/publish`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ channel, event }),
  });
  const text = await res.text();
  assert.equal(res.status, 202, `publish answered ${res.status}: ${text}`);
  return JSON.parse(text).event_ids[0];
}

async function launch() {
  const args = ['--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'];
  if (process.getuid?.() === 0) args.push('--no-sandbox');
  return puppeteer.launch({ executablePath: CHROMIUM, args, headless: true });
}

/**
 * Opens a page that records what went wrong: console errors, uncaught
 * errors and failed requests. `allowWebSocketFailures` is set while the
 * gateway is down, when Chromium itself reports the refused reconnects.
 */
async function openPage(browser) {
  const page = await browser.newPage();
  const problems = [];
  const state = { allowWebSocketFailures: false, webSocketFailures: 0 };
  page.on('console', (msg) => {
    if (msg.type() !== 'error' && msg.type() !== 'assert') return;
    const text = msg.text();
    if (state.allowWebSocketFailures && /^WebSocket connection to 'ws:\/\/127\.0\.0\.1:\d+\/ws\//.test(text)) {
      state.webSocketFailures += 1;
      return;
    }
    problems.push(`console ${msg.type()}: ${text}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('requestfailed', (req) => {
    if (!(state.allowWebSocketFailures && req.resourceType() === 'websocket')) {
      problems.push(`request failed: ${req.url()} ${req.failure()?.errorText}`);
    }
  });
  page.on('response', (res) => {
    if (res.status() >= 400) problems.push(`HTTP ${res.status()} for ${res.url()}`);
  });
  return { page, problems, state };
}

const until = (page, what, fn, ...args) => untilWithin(STEP_MS, page, what, fn, ...args);

function untilWithin(timeout, page, what, fn, ...args) {
  return page.waitForFunction(fn, { timeout, polling: 50 }, ...args).catch((e) => {
    throw new Error(`timed out waiting for ${what}: ${e.message}`);
  });
}

const waitState = (page, state) =>
  until(page, `the state badge to say ${state}`, (s) => document.getElementById('state').dataset.state === s, state);

const waitEvent = (page, id) =>
  until(page, `event ${id} in the log`, (i) => !!document.querySelector(`.entry[data-event-id="${CSS.escape(i)}"]`), id);

/** `waiting`, or its failure with what each page's log and the gateway's
 * output say, to tell a lost event from a slow page. */
async function explained(waiting, pages, gateway) {
  try {
    return await waiting;
  } catch (e) {
    const logs = [];
    for (const [name, page] of Object.entries(pages)) {
      const list = await entries(page).catch((err) => [{ type: `unreadable: ${err.message}` }]);
      logs.push(`${name}'s log: ${list.map((x) => `${x.type}${x.eventId ? ` ${x.eventId}` : ''}`).join(', ')}`);
    }
    const tail = gateway.output.split('\n').slice(-40).join('\n');
    throw new Error(`${e.message}\n${logs.join('\n')}\ngateway's output (last lines):\n${tail}`);
  }
}

/** The log's entries, in order, as plain data. */
const entries = (page) =>
  page.$$eval('#log .entry', (list) =>
    list.map((e) => ({ ...e.dataset, type: e.querySelector('.type').textContent, body: e.querySelector('pre')?.textContent ?? '' })));

/** Nothing wider than the viewport: the document does not scroll sideways, and no visible element sticks out. */
async function assertNoHorizontalOverflow(page, width) {
  const report = await page.evaluate(() => {
    const vw = document.documentElement.clientWidth;
    const out = [];
    for (const e of document.querySelectorAll('body *')) {
      const r = e.getBoundingClientRect();
      if (r.width > 0 && (r.right > vw + 0.5 || r.left < -0.5)) out.push(`${e.tagName.toLowerCase()}#${e.id}.${e.className} [${Math.round(r.left)}, ${Math.round(r.right)}]`);
    }
    return { vw, innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth, out: out.slice(0, 5),
      fontPx: parseFloat(getComputedStyle(document.body).fontSize) };
  });
  // With isMobile, a page without a viewport meta is laid out 980 px wide.
  assert.equal(report.innerWidth, width, `layout viewport is ${report.innerWidth} px, not ${width} (viewport meta?)`);
  assert.ok(report.scrollWidth <= report.vw, `the page scrolls sideways at ${width} px: ${report.scrollWidth} > ${report.vw}`);
  assert.deepEqual(report.out, [], `elements stick out at ${width} px`);
  assert.ok(report.fontPx >= 14, `body text is ${report.fontPx} px at ${width} px`);
}

/**
 * The layout with the log filled, close codes open. A phone-emulated page
 * (isMobile, where a page without a viewport meta is 980 px wide) is
 * checked as it is: changing isMobile would reload it and empty the log.
 */
async function checkLayouts(page, { mobile }) {
  await page.$eval('#codes', (d) => { d.open = true; });
  const logged = (await entries(page)).length;
  assert.ok(logged > 3, `the log holds ${logged} entries`);
  if (mobile) {
    await assertNoHorizontalOverflow(page, 390);
    return;
  }
  await assertNoHorizontalOverflow(page, 1280);
  // Wide: the log sits beside the controls.
  const [controls, log] = await Promise.all(['#connect-section', '#log-section'].map((s) => page.$eval(s, (e) => e.getBoundingClientRect().toJSON())));
  assert.ok(log.left >= controls.right, `at 1280 px the log (left ${log.left}) is not beside the controls (right ${controls.right})`);
  // Wide, scrolled to the close codes: every cell of the table is on top,
  // none under the sticky log.
  await page.$eval('#codes-section', (e) => e.scrollIntoView({ block: 'end' }));
  const covered = await page.$$eval('#codes-body td', (cells) => {
    const seen = cells.filter((td) => {
      const r = td.getBoundingClientRect();
      return r.top >= 0 && r.bottom <= window.innerHeight;
    });
    const under = seen.filter((td) => {
      const r = td.getBoundingClientRect();
      return !td.contains(document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2));
    });
    return { seen: seen.length, under: under.map((td) => td.textContent) };
  });
  assert.ok(covered.seen >= 3, `at 1280 px only ${covered.seen} close-code cells are in view`);
  assert.deepEqual(covered.under, [], 'at 1280 px close-code cells are covered (by the sticky log?)');
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.setViewport({ width: 390, height: 844 });
  await until(page, 'the 390 px layout', () => window.innerWidth === 390);
  await assertNoHorizontalOverflow(page, 390);
  await until(page, 'the log to show its latest line after the resize', () => {
    const log = document.getElementById('log');
    return log.scrollHeight > log.clientHeight && log.scrollTop + log.clientHeight >= log.scrollHeight - 2;
  });
  // (Heartbeats may add entries meanwhile; a reload would have emptied it.)
  assert.ok((await entries(page)).length >= logged, 'the log survived the resize');
}

test('serve with Redis: paste a URL, receive, survive a restart, resume with recovered: true', async (t) => {
  const port = await freePort();
  // A tenant of its own: other tests may publish on the same Redis.
  const tenant = randomInt(100_000, 2_000_000_000);
  const branch = randomInt(1, 1_000_000);
  const channel = `channel:branch:${branch}:waiters`;
  const env = {
    REDIS_URL, WSGATEWAY_REDIS_PREFIX: PREFIX, JWT_SECRET, TABLE_TOKEN_SECRET: TABLE_SECRET, WSGATEWAY_API_KEY: API_KEY, WSGATEWAY_DEMO_PAGE: 'true',
    // Heartbeats every second; a page silent for 4 s would be closed (1001).
    WSGATEWAY_HEARTBEAT_INTERVAL_S: '1', WSGATEWAY_HEARTBEAT_TIMEOUT_S: '4', WSGATEWAY_CLEANUP_INTERVAL_S: '1',
  };
  const firstGateway = await new GatewayProcess('serve', port, env).ready();
  let gateway = firstGateway;
  t.after(() => gateway.kill());
  const { stdout } = await run(BIN, ['token', 'staff', '--secret', JWT_SECRET, '--sub', '7', '--tenant', String(tenant),
    '--branches', String(branch), '--roles', 'WAITER']);
  const token = stdout.trim();
  const browser = await launch();
  t.after(() => browser.close());
  const { page, problems, state } = await openPage(browser);
  await page.setViewport({ width: 1280, height: 800 });
  await page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: STEP_MS });
  await until(page, 'the publish commands', () => document.querySelectorAll('#publish-commands pre').length === 2);
  assert.equal(await page.$eval('#dev-tokens', (e) => e.hidden), true, 'serve offers no development tokens');

  // Paste the printed URL: endpoint and token come from it.
  await page.$eval('#endpoint', (e) => { e.value = 'kitchen'; });
  await page.type('#input', `ws://127.0.0.1:${port}/ws/waiter?token=${token}`);
  const parsed = await page.$eval('#parsed', (e) => e.textContent);
  assert.match(parsed, /endpoint waiter/);
  assert.ok(!parsed.includes(token), 'the page does not echo the token');
  assert.equal(await page.$eval('#endpoint', (e) => e.value), 'waiter');
  await page.click('#connect');
  await waitState(page, 'open');
  await until(page, 'connected', () => !!document.querySelector('.entry[data-type="connected"]'));

  // The client's heartbeat keeps an idle page open past the silence limit.
  await until(page, 'six heartbeats answered', () => document.querySelectorAll('.entry[data-type="pong"]').length >= 6);
  assert.equal(await page.$$eval('.entry[data-close-code]', (l) => l.length), 0, 'closed while idle');
  assert.match(await page.$eval('#fact-heartbeat', (e) => e.textContent), /^pong/);

  // A live event, pretty-printed, its type highlighted.
  const first = await publish(port, API_KEY, channel, { type: 'ROUND_READY', tenant_id: tenant, branch_id: branch, event_id: `demo-${tenant}-live` });
  await waitEvent(page, first);
  const [live] = (await entries(page)).filter((e) => e.eventId === first);
  assert.equal(live.type, 'ROUND_READY');
  assert.match(live.body, new RegExp(`\\n  "tenant_id": ${tenant},\\n`));
  assert.equal(await page.$eval('#fact-last-id', (e) => e.textContent), first);
  // The publish command shown is filled from `connected`.
  const curl = await page.$eval('#publish-commands pre', (e) => e.textContent);
  assert.ok(curl.includes(`http://127.0.0.1:${port}/api/publish`) && curl.includes(channel) && curl.includes(`"tenant_id":${tenant}`), curl);

  // The gateway dies; an event is published through Redis meanwhile.
  state.allowWebSocketFailures = true;
  await gateway.kill();
  await until(page, 'the page to notice the lost connection', () => ['reconnecting', 'connecting'].includes(document.getElementById('state').dataset.state));
  await until(page, 'a reconnect attempt in the log', () => !!document.querySelector('.entry[data-type="reconnecting"]'));
  const missed = `demo-${tenant}-missed`;
  const fcall = await run('redis-cli', ['-u', REDIS_URL, 'FCALL', FCALL_PUBLISH, '0', channel,
    JSON.stringify({ type: 'ROUND_SERVED', tenant_id: tenant, branch_id: branch, event_id: missed })]);
  assert.deepEqual(fcall.stdout.trim().split('\n'), [missed, 'published'], `FCALL answered ${fcall.stdout}`);

  // A new process on the same port: the page reconnects and resumes.
  gateway = await new GatewayProcess('serve', port, env).ready();
  // The client's backoff (full jitter, up to 30 s) decides when it retries.
  await untilWithin(RECONNECT_MS, page, 'connected with recovered: true', () => !!document.querySelector('.entry[data-type="connected"][data-recovered="true"]'));
  await waitEvent(page, missed);
  await waitState(page, 'open');
  state.allowWebSocketFailures = false;
  const after = await publish(port, API_KEY, channel, { type: 'ROUND_IN_KITCHEN', tenant_id: tenant, branch_id: branch, event_id: `demo-${tenant}-after` });
  await waitEvent(page, after);

  // Each once, in publish order; `connected` (recovered) before the replay.
  const order = (await entries(page)).filter((e) => e.eventId || e.recovered).map((e) => e.eventId ?? `connected:${e.recovered}`);
  assert.deepEqual(order, [first, 'connected:true', missed, after]);

  // The curl command shown runs as is, with the gateway's key in the environment.
  const shown = await run('sh', ['-c', curl], { env: { ...process.env, WSGATEWAY_API_KEY: API_KEY } });
  await waitEvent(page, JSON.parse(shown.stdout).event_ids[0]);

  // The heartbeat is the client's; a ping sent by hand is answered too.
  await page.$eval('#show-heartbeats', (e) => e.click());
  await page.click('#send-ping');
  await until(page, 'a visible pong', () => [...document.querySelectorAll('.entry[data-type="pong"]')].some((e) => !e.hidden));

  await checkLayouts(page, { mobile: false });
  assert.deepEqual(problems, []);
  for (const g of [firstGateway, gateway]) assert.ok(!g.output.includes(token), 'the gateway never logs the token');
});

/** POST /api/publish of one item with `ack: {within_s}`; returns the event id. */
async function publishWithAck(port, channel, event, withinS) {
  const res = await fetch(`http://127.0.0.1:${port}/api/publish`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ channel, event, ack: { within_s: withinS } }),
  });
  const text = await res.text();
  assert.equal(res.status, 202, `publish answered ${res.status}: ${text}`);
  return JSON.parse(text).event_ids[0];
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

test('serve: a kitchen page acknowledges, a redelivery and an escalation are shown, an admin page lists who is connected', async (t) => {
  const port = await freePort();
  const tenant = randomInt(100_000, 2_000_000_000);
  const branch = randomInt(1, 1_000_000);
  const channel = `channel:branch:${branch}:kitchen`;
  const env = { REDIS_URL, WSGATEWAY_REDIS_PREFIX: PREFIX, JWT_SECRET, TABLE_TOKEN_SECRET: TABLE_SECRET, WSGATEWAY_API_KEY: API_KEY, WSGATEWAY_DEMO_PAGE: 'true',
    WSGATEWAY_NODE_NAME: 'browser-test-node' };
  const gateway = await new GatewayProcess('serve', port, env).ready();
  t.after(() => gateway.kill());
  const token = async (sub, roles) => (await run(BIN, ['token', 'staff', '--secret', JWT_SECRET, '--sub', String(sub), '--tenant', String(tenant),
    '--branches', String(branch), '--roles', roles])).stdout.trim();
  const kitchenUrl = `ws://127.0.0.1:${port}/ws/kitchen?token=${await token(21, 'KITCHEN')}`;
  const adminUrl = `ws://127.0.0.1:${port}/ws/admin?token=${await token(22, 'ADMIN')}`;
  // A browser each, as two people would have: a page in a background tab is
  // throttled, even frozen, by Chromium.
  const [adminBrowser, kitchenBrowser] = await Promise.all([launch(), launch()]);
  t.after(() => Promise.all([adminBrowser.close(), kitchenBrowser.close()]));

  // The admin's page: it acknowledges by hand by default (it receives the kitchen's events too).
  const admin = await openPage(adminBrowser);
  await admin.page.setViewport({ width: 1280, height: 800 });
  await admin.page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: STEP_MS });
  await pasteAndConnect(admin.page, adminUrl);
  await waitState(admin.page, 'open');
  assert.equal(await admin.page.$eval('#ack-mode', (e) => e.value), 'manual', "an admin's page acknowledges by hand");
  assert.equal(await admin.page.$eval('#presence-section', (e) => e.hidden), false, 'the admin sees who is connected');

  // The kitchen's page: automatic acknowledgements.
  const kitchen = await openPage(kitchenBrowser);
  await kitchen.page.setViewport({ width: 390, height: 844 });
  await kitchen.page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: STEP_MS });
  await pasteAndConnect(kitchen.page, kitchenUrl);
  await waitState(kitchen.page, 'open');
  assert.equal(await kitchen.page.$eval('#ack-mode', (e) => e.value), 'auto');
  assert.equal(await kitchen.page.$eval('#presence-section', (e) => e.hidden), true, 'presence is for admins');

  // An event asking for an ack within 1 s: the kitchen's page acknowledges it: a line in its log; no redelivery, no escalation.
  const acked = await publishWithAck(port, channel, { type: 'ROUND_SUBMITTED', tenant_id: tenant, branch_id: branch, event_id: `ack-${tenant}-1` }, 1);
  await until(kitchen.page, 'the ack line', (id) => !!document.querySelector(`.entry[data-type="ack"][data-acked-id="${CSS.escape(id)}"]`), acked);
  assert.match(await kitchen.page.$eval(`.entry[data-acked-id="${acked}"] .note`, (e) => e.textContent), /acknowledged/);
  await waitEvent(admin.page, acked);
  assert.equal(await admin.page.$$eval('.entry[data-type="ack"]', (l) => l.length), 0, 'the admin acknowledged nothing');
  await sleep(2 * 1000 + 1500);
  assert.equal(await kitchen.page.$$eval('.entry[data-redelivered]', (l) => l.length), 0, 'acknowledged: no redelivery');
  assert.equal(await admin.page.$$eval('.entry[data-type="EVENT_UNACKNOWLEDGED"]', (l) => l.length), 0, 'acknowledged: no escalation');
  assert.equal(await admin.page.$eval('#escalations', (e) => e.hidden), true);

  // The kitchen's page now acknowledges by hand, and does not: the event is redelivered, then escalated to the admin.
  await kitchen.page.select('#ack-mode', 'manual');
  // (Counted from now: the first connection may have reconnected by itself.)
  const connectedSoFar = await kitchen.page.$$eval('.entry[data-type="connected"]', (l) => l.length);
  await kitchen.page.click('#connect');
  await until(kitchen.page, 'the new connection\'s connected', (n) => document.querySelectorAll('.entry[data-type="connected"]').length > n, connectedSoFar);
  await waitState(kitchen.page, 'open');
  const ignored = await publishWithAck(port, channel, { type: 'ROUND_SUBMITTED', tenant_id: tenant, branch_id: branch, event_id: `ack-${tenant}-2` }, 1);
  await explained(waitEvent(kitchen.page, ignored), { kitchen: kitchen.page, admin: admin.page }, gateway);
  assert.equal(await kitchen.page.$$eval(`button[data-ack="${ignored}"]`, (l) => l.length), 1, 'an Ack button on the event');
  await until(kitchen.page, 'the redelivery', (id) => !!document.querySelector(`.entry.redelivered[data-event-id="${CSS.escape(id)}"][data-redelivered="true"]`), ignored);
  assert.match(await kitchen.page.$eval('.entry.redelivered .flag', (e) => e.textContent), /redelivered/);
  await until(admin.page, 'the escalation', (id) => !!document.querySelector(`.entry.escalation[data-type="EVENT_UNACKNOWLEDGED"][data-event-id="${CSS.escape(id)}"]`), ignored);
  const note = await admin.page.$eval('.entry.escalation .note', (e) => e.textContent);
  assert.match(note, new RegExp(`ROUND_SUBMITTED ${ignored} was not acknowledged: received by \\d+, acknowledged by none \\(no_ack\\)`));
  assert.equal(await admin.page.$eval('#escalations', (e) => e.hidden), false, 'shown above the log');
  assert.match(await admin.page.$eval('#escalations', (e) => e.textContent), new RegExp(`1 event not acknowledged.*${ignored}`, 's'));
  // The admin had the event itself (and its redelivery), with the same id: all are in its log.
  assert.deepEqual((await entries(admin.page)).filter((e) => e.eventId === ignored).map((e) => `${e.type}${e.redelivered ? ' (redelivered)' : ''}`),
    ['ROUND_SUBMITTED', 'ROUND_SUBMITTED (redelivered)', 'EVENT_UNACKNOWLEDGED']);

  // Acknowledged by hand in time: the Ack button, an ack line, no redelivery.
  const byHand = await publishWithAck(port, channel, { type: 'ROUND_SUBMITTED', tenant_id: tenant, branch_id: branch, event_id: `ack-${tenant}-3` }, 2);
  await waitEvent(kitchen.page, byHand);
  await kitchen.page.click(`button[data-ack="${byHand}"]`);
  await until(kitchen.page, 'the ack line', (id) => !!document.querySelector(`.entry[data-acked-id="${CSS.escape(id)}"]`), byHand);
  assert.equal(await kitchen.page.$eval(`button[data-ack="${byHand}"]`, (b) => b.disabled), true);
  await sleep(2 * 2000 + 1500);
  assert.equal(await kitchen.page.$$eval(`.entry[data-redelivered][data-event-id="${byHand}"]`, (l) => l.length), 0);
  assert.equal(await admin.page.$$eval('.entry[data-type="EVENT_UNACKNOWLEDGED"]', (l) => l.length), 1, 'one escalation only');

  // Who is connected: the admin and the kitchen, from the gateway's presence answer.
  // (An automatic refresh may be on its way too: wait for the answer to
  // this click, which is newer than anything rendered before it.)
  const before = await admin.page.$eval('#presence-section', (e) => Number(e.dataset.updated ?? 0));
  await admin.page.click('#presence-refresh');
  await until(admin.page, 'an answer to the refresh', (b) => {
    const s = document.querySelector('#presence-section');
    return Number(s.dataset.updated ?? 0) > b && document.querySelector('#presence-status').textContent.startsWith('as of ');
  }, before);
  const rows = await until(admin.page, 'the kitchen in the presence list', (b) => {
    const block = document.querySelector(`#presence-list [data-branch="${b}"]`);
    const list = block ? [...block.querySelectorAll('tr[data-endpoint]')].map((r) => [r.dataset.endpoint, r.textContent]) : [];
    return list.some(([e]) => e === 'kitchen') && list;
  }, String(branch)).then((h) => h.jsonValue());
  assert.deepEqual(rows.map(([e]) => e), ['admin', 'kitchen'], 'ordered by connected_at');
  assert.match(rows[1][1], /user 21.*browser-test-node/);

  await assertNoHorizontalOverflow(kitchen.page, 390);
  await assertNoHorizontalOverflow(admin.page, 1280);
  assert.deepEqual(admin.problems, []);
  assert.deepEqual(kitchen.problems, []);
});

test('serve drains on SIGTERM: the page shows the 1012, counts down the spread reconnect, and shows the resume', async (t) => {
  const port = await freePort();
  const tenant = randomInt(100_000, 2_000_000_000);
  const branch = randomInt(1, 1_000_000);
  const channel = `channel:branch:${branch}:waiters`;
  const env = { REDIS_URL, WSGATEWAY_REDIS_PREFIX: PREFIX, JWT_SECRET, TABLE_TOKEN_SECRET: TABLE_SECRET, WSGATEWAY_API_KEY: API_KEY, WSGATEWAY_DEMO_PAGE: 'true' };
  // A drain window: the page's one connection is the first closed, at once; the node exits when the window ends.
  let gateway = await new GatewayProcess('serve', port, { ...env, WSGATEWAY_DRAIN_S: '2' }).ready();
  t.after(() => gateway.kill());
  const { stdout } = await run(BIN, ['token', 'staff', '--secret', JWT_SECRET, '--sub', '8', '--tenant', String(tenant),
    '--branches', String(branch), '--roles', 'WAITER']);
  const token = stdout.trim();
  const browser = await launch();
  t.after(() => browser.close());
  const { page, problems, state } = await openPage(browser);
  await page.setViewport({ width: 1280, height: 800 });
  await page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: STEP_MS });
  await pasteAndConnect(page, `ws://127.0.0.1:${port}/ws/waiter?token=${token}`);
  await waitState(page, 'open');
  assert.equal(await page.$eval('#restart', (e) => e.hidden), true, 'no restart notice while connected');
  const first = await publish(port, API_KEY, channel, { type: 'ROUND_READY', tenant_id: tenant, branch_id: branch, event_id: `drain-${tenant}-live` });
  await waitEvent(page, first);

  // SIGTERM: readiness goes 503, the page's connection is closed with 1012.
  // A retry that reaches the draining node is refused (503, a failed WebSocket).
  state.allowWebSocketFailures = true;
  gateway.signal('SIGTERM');
  await until(page, 'the 1012 in the log', () => !!document.querySelector('.entry[data-close-code="1012"]'));
  const closed = await page.$eval('.entry[data-close-code="1012"] .note', (e) => e.textContent);
  assert.match(closed, /service restart.*draining/);
  // The notice says why, and counts the spread delay down (or, when the
  // delay drawn was short, says the reconnect is under way).
  const notice = await until(page, 'the drain notice', () => {
    const n = document.getElementById('restart');
    return !n.hidden && ['waiting', 'connecting'].includes(n.dataset.phase) && n.textContent;
  }).then((h) => h.jsonValue());
  assert.match(notice, /^node draining \(1012 service restart\)(; attempt \d+ failed \(1006\))?: reconnecting (in \d+\.\d s|now)$/);
  const reconnect = await page.$eval('.entry[data-type="reconnecting"] .note', (e) => e.textContent);
  const delay = Number(/^attempt 1 in (\d+) ms \(after 1012\)/.exec(reconnect)?.[1]);
  assert.ok(delay >= 0 && delay <= 5_000, `the first delay after a 1012 is spread over restartSpreadMs (5 s): ${reconnect}`);
  const exit = await gateway.exited;
  assert.deepEqual(exit, { code: 0, signal: null }, 'the drained node exits 0');

  // While no node runs, an event is published through Redis; then a new node on the same port.
  const missed = `drain-${tenant}-missed`;
  const fcall = await run('redis-cli', ['-u', REDIS_URL, 'FCALL', FCALL_PUBLISH, '0', channel,
    JSON.stringify({ type: 'ROUND_SERVED', tenant_id: tenant, branch_id: branch, event_id: missed })]);
  assert.deepEqual(fcall.stdout.trim().split('\n'), [missed, 'published'], `FCALL answered ${fcall.stdout}`);
  gateway = await new GatewayProcess('serve', port, env).ready();
  await untilWithin(RECONNECT_MS, page, 'the resume in the notice', () => document.getElementById('restart').dataset.phase === 'resumed');
  await waitEvent(page, missed);
  // The replay ends with the answer to the ping the page sends on `connected`.
  await until(page, 'the replay counted', () => document.getElementById('restart').dataset.replay === 'done');
  assert.equal(await page.$eval('#restart', (e) => e.textContent), 'resumed: recovered true, 1 event replayed');
  await waitState(page, 'open');
  state.allowWebSocketFailures = false;
  const after = await publish(port, API_KEY, channel, { type: 'ROUND_IN_KITCHEN', tenant_id: tenant, branch_id: branch, event_id: `drain-${tenant}-after` });
  await waitEvent(page, after);
  const order = (await entries(page)).filter((e) => e.eventId || e.recovered).map((e) => e.eventId ?? `connected:${e.recovered}`);
  assert.deepEqual(order, [first, 'connected:true', missed, after]);
  assert.equal(await page.$eval('#restart', (e) => e.textContent), 'resumed: recovered true, 1 event replayed', 'a live event is not counted as replayed');
  assert.deepEqual(problems, []);
});

test('dev: development tokens, the printed curl command, and recovered: false after a restart', async (t) => {
  const port = await freePort();
  let gateway = await new GatewayProcess('dev', port, {}).ready();
  t.after(() => gateway.kill());
  const browser = await launch();
  t.after(() => browser.close());
  const { page, problems, state } = await openPage(browser);
  await page.setViewport({ width: 390, height: 844, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
  await page.goto(`http://127.0.0.1:${port}/`, { waitUntil: 'load', timeout: STEP_MS });
  await until(page, 'the development tokens', () => document.querySelectorAll('#dev-token-buttons button').length === 4);

  // A URL with a bad token: 4001, said with a hint, and the client stops
  // (after its one retry with a token asked again).
  await page.type('#input', `ws://127.0.0.1:${port}/ws/kitchen?token=not-a-token`);
  await page.click('#connect');
  await until(page, 'the client to give up on 4001', () => document.getElementById('state').dataset.state === 'closed'
    && document.querySelectorAll('.entry[data-close-code="4001"]').length === 2);
  const refused = await page.$eval('.entry[data-close-code="4001"] .note', (e) => e.textContent);
  assert.match(refused, /unauthorized.*token missing, invalid, expired or revoked.*Paste the whole printed URL/);

  // A bare token: the endpoint its roles allow is picked (KITCHEN: kitchen).
  const session = await (await fetch(`http://127.0.0.1:${port}/demo/session.json`)).json();
  const kitchen = session.tokens.find((x) => x.endpoint === 'kitchen').token;
  await page.$eval('#input', (e) => { e.value = ''; });
  await page.type('#input', kitchen);
  assert.equal(await page.$eval('#endpoint', (e) => e.value), 'kitchen');
  await page.click('#connect');
  await until(page, 'connected on kitchen', () => [...document.querySelectorAll('.entry[data-type="connected"] pre')]
    .some((e) => e.textContent.includes('"endpoint": "kitchen"')));

  await page.click('#dev-token-buttons button[data-endpoint="waiter"]');
  await waitState(page, 'open');
  await until(page, 'connected on waiter', () => [...document.querySelectorAll('.entry[data-type="connected"] pre')]
    .some((e) => e.textContent.includes('"endpoint": "waiter"')));

  // The curl command shown is runnable as is: it carries dev's key.
  const curl = await page.$eval('#publish-commands pre', (e) => e.textContent);
  assert.match(curl, /^curl .*Bearer wsgateway-dev-api-key.*channel:branch:5:waiters/);
  // Copy copies, or (no clipboard permission) selects the command: no error either way.
  await page.click('#publish-commands button[data-command="curl"]');
  await until(page, 'the copy button to answer', () =>
    ['Copied', 'Ctrl+C'].includes(document.querySelector('#publish-commands button[data-command="curl"]').textContent));
  const { stdout } = await run('sh', ['-c', curl]);
  const [published] = JSON.parse(stdout).event_ids;
  await waitEvent(page, published);

  // The embedded broker's history lives in the process: a restart loses it.
  state.allowWebSocketFailures = true;
  await gateway.kill();
  await until(page, 'the page to notice the lost connection', () => document.getElementById('state').dataset.state !== 'open');
  gateway = await new GatewayProcess('dev', port, {}).ready();
  await untilWithin(RECONNECT_MS, page, 'connected with recovered: false', () => !!document.querySelector('.entry[data-type="connected"][data-recovered="false"]'));
  await waitState(page, 'open');
  state.allowWebSocketFailures = false;
  const note = await page.$eval('.entry[data-recovered="false"] .note', (e) => e.textContent);
  assert.match(note, /recovered: false/);

  await checkLayouts(page, { mobile: true });
  assert.deepEqual(problems, []);
});

/**
 * A stand-in for the gateway a pasted URL names: it accepts a WebSocket on
 * any path and sends `fake.frame` as its `connected`, then says nothing
 * more (the client's heartbeat is 30 s away).
 */
async function fakeGateway() {
  const sockets = new Set();
  const server = http.createServer((_req, res) => res.writeHead(404).end());
  const fake = { frame: null, port: 0 };
  server.on('upgrade', (req, socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
    socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
    const payload = Buffer.from(JSON.stringify(fake.frame));
    assert.ok(payload.length < 65536);
    // One unmasked text frame, FIN set.
    const head = payload.length < 126 ? Buffer.from([0x81, payload.length]) : Buffer.from([0x81, 126, payload.length >> 8, payload.length & 255]);
    socket.write(Buffer.concat([head, payload]));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  fake.port = server.address().port;
  fake.close = () => {
    for (const s of sockets) s.destroy();
    return new Promise((resolve) => server.close(resolve));
  };
  return fake;
}

/** The example the page offers for an audience, as the arguments it should come to. */
function example({ endpoint, tenant_id, branch_id, session_id }) {
  const base = { tenant_id, branch_id };
  switch (endpoint) {
    case 'kitchen': return { channel: `channel:branch:${branch_id}:kitchen`, event: { type: 'ROUND_SUBMITTED', ...base, entity: { round_id: 1 }, ack: { within_s: 10 } } };
    case 'diner': return { channel: `channel:session:${session_id}`, event: { type: 'PAYMENT_APPROVED', ...base, session_id } };
    default: return { channel: `channel:branch:${branch_id}:waiters`, event: { type: 'ROUND_READY', ...base, table_id: 12 } };
  }
}

const isJson = (want) => (arg) => assert.deepEqual(JSON.parse(arg), want, `JSON argument ${arg}`);

/** What the Copy button of a command puts on the clipboard; it is also the text shown. */
async function copied(page, name) {
  await page.browserContext().overridePermissions(new URL(page.url()).origin, ['clipboard-read', 'clipboard-write', 'clipboard-sanitized-write']);
  const button = `#publish-commands button[data-command="${name}"]`;
  await page.click(button);
  await until(page, `the ${name} command on the clipboard`, (b) => document.querySelector(b).textContent === 'Copied', button);
  const text = await page.evaluate(() => navigator.clipboard.readText());
  assert.equal(text, await page.$eval(button, (b) => b.parentElement.querySelector('pre').textContent), `the ${name} command copied is the one shown`);
  return text;
}

/**
 * Copies the page's two commands, runs each with sh (stubs for curl and
 * wsgateway) and checks it runs exactly its command with exactly these
 * arguments. `key` undefined: the commands name $WSGATEWAY_API_KEY, set
 * here to a hostile value.
 */
async function assertCommands(page, stubs, { base, key, audience }) {
  assert.equal(await page.$$eval('#publish-commands pre', (l) => l.length), 2, 'the page shows two commands');
  const curl = await copied(page, 'curl');
  const cli = await copied(page, 'cli');
  const { channel, event } = example(audience);
  const env = key === undefined ? { WSGATEWAY_API_KEY: HOSTILE.join('') } : {};
  const apiKey = key ?? env.WSGATEWAY_API_KEY;
  await stubs.assertRuns(curl, 'curl', ['-sS', '-g', '-X', 'POST', `${base}/api/publish`, '-H', `Authorization: Bearer ${apiKey}`,
    '-H', 'Content-Type: application/json', '-d', isJson({ channel, event })], env);
  await stubs.assertRuns(cli, 'wsgateway', ['publish', '--url', base, '--api-key', apiKey, '--channel', channel, '--event', isJson(event)], env);
}

/** Puts `url` in the input as a paste would, and connects. */
async function pasteAndConnect(page, url) {
  await page.$eval('#input', (e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }, url);
  await page.click('#connect');
}

/** What the browser makes of a URL: the page reads it so. */
const parsedUrl = (page, url) => page.evaluate((u) => { const x = new URL(u); return { host: x.host, pathname: x.pathname }; }, url);

test('hostile values: each copyable command runs exactly curl or wsgateway, with exactly the values', async (t) => {
  const port = await freePort();
  const gateway = await new GatewayProcess('dev', port, {}).ready();
  t.after(() => gateway.kill());
  const fake = await fakeGateway();
  t.after(() => fake.close());
  const stubs = await shellStubs();
  t.after(() => stubs.close());
  const browser = await launch();
  t.after(() => browser.close());
  const pageUrl = `http://127.0.0.1:${port}/`;

  // A pasted URL naming a gateway (the stand-in) under a hostile path, whose
  // `connected` holds hostile ids. The page builds its commands from both.
  {
    const { page, problems } = await openPage(browser);
    await page.goto(pageUrl, { waitUntil: 'load', timeout: STEP_MS });
    await until(page, 'the development tokens', () => document.querySelectorAll('#dev-token-buttons button').length === 4);
    const prefix = `/p;touch$IFS$MARK;x'$(touch$IFS$MARK)'\`touch$IFS$MARK\`"[1-2]&a=b`;
    for (const [endpoint, param] of [['waiter', 'token'], ['diner', 'table_token']]) {
      const audience = { endpoint, tenant_id: `1'; touch $MARK; '$(touch$IFS$MARK)`, branch_id: HOSTILE.join(' '), session_id: HOSTILE.slice().reverse().join('\n') };
      fake.frame = endpoint === 'diner'
        ? { type: 'connected', endpoint, tenant_id: audience.tenant_id, branch_id: audience.branch_id, session_id: audience.session_id, table_id: 12, heartbeat_interval_s: 30 }
        : { type: 'connected', endpoint, user_id: 7, tenant_id: audience.tenant_id, branch_ids: [audience.branch_id], sector_ids: null, heartbeat_interval_s: 30 };
      const pasted = `ws://127.0.0.1:${fake.port}${prefix}/ws/${endpoint}?${param}=t${endpoint}`;
      const { pathname } = await parsedUrl(page, pasted);
      const base = `http://127.0.0.1:${fake.port}${pathname.slice(0, -`/ws/${endpoint}`.length)}`;
      assert.ok(base.includes(';touch$IFS$MARK;') && base.includes("'$(touch$IFS$MARK)'"), `the browser kept the path's ; ' $( ): ${base}`);
      await pasteAndConnect(page, pasted);
      await until(page, `connected on ${endpoint}`, (n) => document.querySelectorAll('.entry[data-type="connected"]').length === n, endpoint === 'diner' ? 2 : 1);
      await assertCommands(page, stubs, { base, key: 'wsgateway-dev-api-key', audience });
    }

    // An id with a control character (a Tab completes, in a terminal): no command.
    fake.frame = { type: 'connected', endpoint: 'waiter', user_id: 7, tenant_id: 1, branch_ids: ['5\t;touch $MARK'], sector_ids: null, heartbeat_interval_s: 30 };
    await pasteAndConnect(page, `ws://127.0.0.1:${fake.port}/ws/waiter?token=t`);
    await until(page, 'the third connected', () => document.querySelectorAll('.entry[data-type="connected"]').length === 3);
    assert.equal(await page.$$eval('#publish-commands pre', (l) => l.length), 0, 'a command with a Tab in it is shown');
    assert.match(await page.$eval('#publish-hint', (e) => e.textContent), /no command to copy, a value holds a control or invisible character/);
    assert.deepEqual(problems, []);
  }

  // A pasted URL whose host is hostile (nothing answers there): the commands are built at once.
  {
    const { page } = await openPage(browser);
    await page.goto(pageUrl, { waitUntil: 'load', timeout: STEP_MS });
    await until(page, 'the development tokens', () => document.querySelectorAll('#dev-token-buttons button').length === 4);
    const pasted = "ws://a;touch$IFS$MARK;b$(touch$IFS$MARK)`touch$IFS$MARK`'q'&c{x,y}/ws/kitchen?token=t";
    const { host } = await parsedUrl(page, pasted);
    assert.ok(host.includes(';') && host.includes('$(') && host.includes('`'), `the browser kept the host's ; $( \`: ${host}`);
    await pasteAndConnect(page, pasted);
    await until(page, 'the kitchen endpoint', () => document.getElementById('fact-endpoint').textContent === 'kitchen');
    await assertCommands(page, stubs, { base: `http://${host}`, key: 'wsgateway-dev-api-key', audience: { endpoint: 'kitchen', tenant_id: 1, branch_id: 5 } });
  }

  // The API key of session.json (here a hostile one), and none: "$WSGATEWAY_API_KEY".
  for (const key of [HOSTILE.join(''), undefined]) {
    const { page, problems } = await openPage(browser);
    await page.setRequestInterception(true);
    page.on('request', (req) => {
      if (!req.url().endsWith('/demo/session.json')) return req.continue();
      return req.respond({ status: 200, contentType: 'application/json', body: JSON.stringify({ dev: key !== undefined, api_key: key ?? null, tokens: [] }) });
    });
    await page.goto(pageUrl, { waitUntil: 'load', timeout: STEP_MS });
    const said = key === undefined ? "the gateway's WSGATEWAY_API_KEY" : 'the development API key';
    await until(page, `commands with ${said}`, (s) => document.getElementById('publish-hint').textContent.endsWith(`with ${s}:`), said);
    await assertCommands(page, stubs, { base: `http://127.0.0.1:${port}`, key, audience: { endpoint: 'waiter', tenant_id: 1, branch_id: 5 } });
    assert.deepEqual(problems, []);
  }
});
