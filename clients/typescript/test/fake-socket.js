// A stand-in WebSocket that unit tests drive: they open it with a frame,
// deliver frames, drop it with a close code, and read what the client sent.
export function fakeWebSocket() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      this.sent = [];
      sockets.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error('not open');
      this.sent.push(data);
    }
    close() {
      this.readyState = 3;
    }
    open(frame) {
      this.readyState = 1;
      this.onopen?.({});
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    deliver(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    drop(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    /** The ack messages sent so far, as arrays of ids. */
    acks() {
      return this.sent.map((s) => JSON.parse(s)).filter((m) => m.type === 'ack').map((m) => m.event_ids);
    }
    /** Every other message sent (not acks, not pings). */
    others() {
      return this.sent.map((s) => JSON.parse(s)).filter((m) => m.type !== 'ack' && m.type !== 'ping');
    }
  }
  return { FakeWebSocket, sockets };
}
