// online/offline and page visibility, with the browser's globals given to
// Node: an EventTarget as window, navigator.onLine, a document.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { recordedClient, startGateway, staffToken, states, waitFor } from './helpers.js';

const win = new EventTarget();
const doc = Object.assign(new EventTarget(), { visibilityState: 'visible' });
let onLine = false;
globalThis.addEventListener = win.addEventListener.bind(win);
globalThis.removeEventListener = win.removeEventListener.bind(win);
Object.defineProperty(globalThis, 'navigator', { value: { get onLine() { return onLine; } }, configurable: true });
Object.defineProperty(globalThis, 'document', { value: doc, configurable: true });

test('offline: no attempt until online; back online or visible: at once, not after the backoff', async () => {
  let gw = await startGateway();
  const port = gw.port;
  try {
    const rec = recordedClient({ url: gw.ws, endpoint: 'waiter', backoff: { initialMs: 60_000, maxMs: 60_000 }, getToken: () => staffToken({ sub: 601 }) });
    rec.client.connect();
    assert.equal(rec.client.state, 'connecting');
    // A round trip with the gateway, to give a wrong attempt every chance to show.
    await fetch(`${gw.http}/ws/health`);
    assert.equal(rec.calls, 0, 'no attempt while offline');
    onLine = true;
    win.dispatchEvent(new Event('online'));
    await waitFor(() => rec.client.state === 'open', 'open once online');

    // The gateway goes; retries are 0-60 s apart: back online skips the wait.
    await gw.stop();
    gw = null;
    await waitFor(() => rec.reconnect.length >= 1, 'a retry scheduled');
    gw = await startGateway({ port });
    onLine = false;
    win.dispatchEvent(new Event('offline'));
    onLine = true;
    win.dispatchEvent(new Event('online'));
    await waitFor(() => rec.connected.length === 2, `open again at once (${states(rec)})`, 10_000);

    // Visible again: a retry waiting on its timer is made at once.
    await gw.stop();
    gw = null;
    await waitFor(() => rec.reconnect.length >= 2 && rec.client.state === 'reconnecting', 'another retry scheduled');
    gw = await startGateway({ port });
    doc.visibilityState = 'hidden';
    doc.dispatchEvent(new Event('visibilitychange'));
    doc.visibilityState = 'visible';
    doc.dispatchEvent(new Event('visibilitychange'));
    await waitFor(() => rec.connected.length === 3, `open again on visibility (${states(rec)})`, 10_000);
    // Open and visible again: a ping checks the connection at once.
    const pongs = rec.message.filter((m) => m.type === 'pong').length;
    doc.dispatchEvent(new Event('visibilitychange'));
    await waitFor(() => rec.message.filter((m) => m.type === 'pong').length > pongs, 'a pong');
    rec.client.close();
  } finally {
    await gw?.stop();
  }
});
