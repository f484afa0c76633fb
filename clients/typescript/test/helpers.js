// Test support: real gateway and Redis processes, started and killed by pid,
// tokens signed here with node:crypto, and condition waits with deadlines.
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import net from 'node:net';
import { afterEach } from 'node:test';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { WsGatewayClient } from '../dist/index.js';

const here = path.dirname(fileURLToPath(import.meta.url));

export const JWT_SECRET = 'client-test-jwt-secret';
export const TABLE_SECRET = 'client-test-table-secret';
export const API_KEY = 'client-test-api-key';

/** The gateway binary: WSGATEWAY_BIN, or the debug build of the workspace. Never built here. */
export function gatewayBin() {
  const bin = process.env.WSGATEWAY_BIN ?? path.resolve(here, '../../../target/debug/wsgateway');
  if (!existsSync(bin)) {
    throw new Error(
      `wsgateway binary not found at ${bin}: build it first (cargo build --bin wsgateway) or set WSGATEWAY_BIN`,
    );
  }
  return bin;
}

/** Every process started by these tests, so that a failed test still kills its own. */
const started = new Set();
function killStarted() {
  for (const p of started) {
    try {
      process.kill(p.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}
process.on('exit', killStarted);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    killStarted();
    process.exit(1);
  });
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Polls `cond` every 20 ms until it is truthy; throws after `timeoutMs`. */
export async function waitFor(cond, what, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64url');
}

export function signHs256(claims, secret) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest();
  return `${head}.${body}.${b64url(sig)}`;
}

const now = () => Math.floor(Date.now() / 1000);

export function staffToken({ sub = 7, tenant = 1, branches = [5], roles = ['WAITER'], ttlS = 3600, secret = JWT_SECRET } = {}) {
  return signHs256(
    { sub, tenant_id: tenant, branch_ids: branches, roles, exp: now() + ttlS, iat: now(), jti: randomBytes(8).toString('hex') },
    secret,
  );
}

export function tableToken({ tenant = 1, branch = 5, table = 12, session = 77, ttlS = 3600, secret = TABLE_SECRET } = {}) {
  return signHs256({ tenant_id: tenant, branch_id: branch, table_id: table, session_id: session, exp: now() + ttlS }, secret);
}

/** A redis-server of our own on a free port (or `port`), without persistence. */
export async function startRedis(port) {
  port ??= await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: 'ignore',
  });
  started.add(proc);
  const exited = new Promise((r) => proc.once('exit', r));
  await waitFor(async () => (await redisPing(port)) || proc.exitCode !== null, `redis-server on port ${port}`);
  if (proc.exitCode !== null) throw new Error('redis-server exited at start');
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    /** Sends one command; resolves to the first line of the reply. */
    command: (...args) => redisCommand(port, args),
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
      started.delete(proc);
    },
  };
}

function redisCommand(port, args) {
  const body = `*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join('');
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => s.write(body));
    s.setTimeout(2000, () => {
      s.destroy();
      reject(new Error('redis command timed out'));
    });
    s.once('data', (d) => {
      resolve(d.toString().split('\r\n')[0]);
      s.destroy();
    });
    s.on('error', reject);
  });
}

function redisPing(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.setTimeout(500);
    s.on('connect', () => s.write('PING\r\n'));
    s.on('data', (d) => {
      resolve(d.toString().startsWith('+PONG'));
      s.destroy();
    });
    s.on('error', () => resolve(false));
    s.on('timeout', () => {
      resolve(false);
      s.destroy();
    });
  });
}

/**
 * `wsgateway serve` on 127.0.0.1 (port 0 unless given), JSON logs, the
 * test secrets and API key; `env` adds or overrides settings. `command`
 * `dev` runs `wsgateway dev` instead (its own secrets, whatever `env` says).
 */
export async function startGateway({ port = 0, env = {}, command = 'serve' } = {}) {
  const proc = spawn(gatewayBin(), [command], {
    env: {
      PATH: process.env.PATH,
      RUST_LOG: 'info',
      WSGATEWAY_LOG_FORMAT: 'json',
      WSGATEWAY_LISTEN: `127.0.0.1:${port}`,
      JWT_SECRET,
      TABLE_TOKEN_SECRET: TABLE_SECRET,
      WSGATEWAY_API_KEY: API_KEY,
      WSGATEWAY_SHUTDOWN_GRACE_S: '3',
      // Stopping closes every client at once (1012), unless a test drains.
      WSGATEWAY_DRAIN_S: '0',
      WSGATEWAY_CLOSE_TIMEOUT_S: '2',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  started.add(proc);
  const exited = new Promise((r) => proc.once('exit', r));
  const logs = [];
  let addr;
  const onData = (chunk) => {
    for (const line of chunk.toString().split('\n')) {
      if (!line) continue;
      logs.push(line);
      if (logs.length > 2000) logs.shift();
      const m = /"addr":"([^"]+)"/.exec(line) ?? /addr=(\S+)/.exec(line) ?? /listening on http:\/\/(\S+)/.exec(line);
      if (!addr && m && line.includes('listening')) addr = m[1];
    }
  };
  proc.stdout.on('data', onData);
  proc.stderr.on('data', onData);
  await waitFor(() => addr || proc.exitCode !== null, 'the gateway to listen', 20_000);
  if (!addr) throw new Error(`wsgateway exited at start (${proc.exitCode}):\n${logs.join('\n')}`);
  const gw = {
    proc,
    pid: proc.pid,
    logs,
    port: Number(addr.split(':').pop()),
    http: `http://${addr}`,
    ws: `ws://${addr}`,
    /** SIGTERM (graceful: 1012 to every client, at once unless the test set WSGATEWAY_DRAIN_S), then SIGKILL if it has not exited within `graceMs`. */
    async stop(graceMs = 8_000) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        started.delete(proc);
        return;
      }
      try {
        process.kill(proc.pid, 'SIGCONT'); // a test may have stopped it
      } catch {
        // gone
      }
      proc.kill('SIGTERM');
      const t = setTimeout(() => proc.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(t);
      started.delete(proc);
    },
    signal(sig) {
      process.kill(proc.pid, sig);
    },
  };
  return gw;
}

/** POST /api/publish; returns the event ids. `item` adds fields to the item (`ack: {within_s}`). */
export async function publish(gw, channel, event, item = {}) {
  const res = await fetch(`${gw.http}/api/publish`, {
    method: 'POST',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ channel, event, ...item }),
  });
  const body = await res.text();
  if (res.status !== 202) throw new Error(`publish: ${res.status} ${body}`);
  return JSON.parse(body).event_ids;
}

/** Every client made by recordedClient, closed after each test, so that a failed test leaves no retry loop behind. */
const clients = new Set();
afterEach(() => {
  for (const c of clients) c.close();
  clients.clear();
});

/** A client on `gw` with the `ws` package, recording every event it emits. */
export function recordedClient(opts) {
  const rec = { calls: 0, all: [] };
  const getToken = opts.getToken;
  const client = new WsGatewayClient({
    WebSocket,
    ...opts,
    getToken: () => {
      rec.calls++;
      return getToken(rec.calls);
    },
  });
  rec.client = client;
  clients.add(client);
  for (const name of ['event', 'state', 'connected', 'close', 'error', 'resync', 'reconnect', 'message', 'sectors_updated', 'token_refreshed', 'presence', 'ack']) {
    rec[name] = [];
    client.on(name, (arg) => {
      rec[name].push(arg);
      rec.all.push([name, arg]);
    });
  }
  return rec;
}

/** One sample of the gateway's /ws/metrics (0 when absent), e.g. metric(gw, 'wsgateway_acks_total', { outcome: 'acknowledged' }). */
export async function metric(gw, name, labels = {}) {
  const text = await (await fetch(`${gw.http}/ws/metrics`)).text();
  const want = `${name}${Object.keys(labels).length ? `{${Object.entries(labels).map(([k, v]) => `${k}="${v}"`).join(',')}}` : ''}`;
  for (const line of text.split('\n')) {
    if (line.startsWith(`${want} `)) return Number(line.slice(want.length + 1).trim());
  }
  return 0;
}

/** The client's state changes so far, for assertion messages. */
export function states(rec) {
  return rec.state.join(' -> ');
}
