import { backoffDelay, closeAction, DEFAULT_BACKOFF, type BackoffOptions, type CloseAction } from './policy.js';
import { refreshLeadMs, tokenExpiry } from './token.js';
import {
  PROTOCOL_FRAME_TYPES,
  type ClientEventMap,
  type ClientEventName,
  type ConnectedFrame,
  type Endpoint,
  type ErrorFrame,
  type GatewayEvent,
  type PresenceFrame,
  type ResyncFrame,
  type SectorsUpdatedFrame,
  type ServerFrame,
  type State,
  type TokenRefreshedFrame,
} from './types.js';

/** A handler property, checked bivariantly so that the DOM's and the `ws` package's event types both fit. */
type Handler<E> = { bivarianceHack(ev: E): void }['bivarianceHack'] | null;

/** The part of the WebSocket API the client uses: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: Handler<unknown>;
  onmessage: Handler<{ data: unknown }>;
  onclose: Handler<{ code: number; reason: string }>;
  onerror: Handler<unknown>;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface WsGatewayClientOptions {
  /** Gateway base URL, `ws://`, `wss://`, `http://` or `https://`; `/ws/{endpoint}` is appended to its path. */
  url: string;
  endpoint: Endpoint;
  /** Called for every connection and before the token expires (in-band refresh). */
  getToken: () => string | Promise<string>;
  /** A WebSocket implementation where there is no global one (Node 20: the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** Initial resume cursor: the `event_id` of the last event processed. */
  lastEventId?: string;
  backoff?: BackoffOptions;
  /** No frame within this long after a ping: the connection is taken as dead. Default 10 000. */
  heartbeatTimeoutMs?: number;
  /** No `connected` within this long after the socket was created: retry. Default 20 000. */
  connectTimeoutMs?: number;
  /**
   * Acknowledgements of events that ask for one (`ack: {within_s}`).
   * `'auto'` (default): sent once every `event` listener has returned (or
   * the Promise it returned has resolved) without an error. `'manual'`:
   * sent when the application calls `client.ack(eventId)`.
   */
  ack?: 'auto' | 'manual';
  /** A `presence()` request with no answer within this long is rejected. Default 10 000. */
  presenceTimeoutMs?: number;
}

/** Where an event that asks for an ack stands, on this client. */
type AckStatus =
  /** Handed to the listeners, which have not finished (or, manual mode: returned, not acked yet). */
  | 'running'
  /** A listener threw or rejected: not acked; a repeat of it is handed to the listeners again. */
  | 'failed'
  /** Processed (auto) or `ack()`ed (manual): an ack is due on whichever connection shows the event. */
  | 'done';

interface AckEntry {
  status: AckStatus;
  /** The connection that last received the event (original, redelivery or replay): only it may ack. */
  conn: number;
}

interface PresenceRequest {
  branchId: number | undefined;
  /** How many reply frames complete it. */
  expected: number;
  replies: PresenceFrame[];
  resolve: (r: PresenceFrame[]) => void;
  reject: (e: Error) => void;
  timer?: ReturnType<typeof setTimeout>;
}

/** How many recent `event_id`s are remembered to drop repeats. */
export const DEDUP_IDS = 1000;
/** Acks due within this long are sent together, in one message. */
export const ACK_FLUSH_MS = 20;
/** The most ids one ack message carries (the gateway's limit); this many pending are sent at once. */
export const ACK_BATCH_MAX = 100;
/** The error codes that answer a `presence` request. */
const PRESENCE_ERRORS: ReadonlySet<string> = new Set(['forbidden_branch', 'presence_unavailable', 'unknown_message_type']);
/** The close code reported when a connection ended without a close frame (also heartbeat and connect timeouts). */
export const ABNORMAL_CLOSURE = 1006;
const OPEN = 1;
const CONNECTING = 0;
/** setTimeout's largest delay. */
const MAX_TIMER_MS = 2_147_483_647;

/** `event` listeners may return a Promise: in the auto ack mode, the ack waits for it. */
type Listener<K extends ClientEventName> = (arg: ClientEventMap[K]) => void | PromiseLike<unknown>;
type AnyListener = (arg: never) => void;

/**
 * A connection to one wsgateway endpoint that stays up: it reconnects by
 * the close-code policy with full-jitter backoff (spread over
 * `restartSpreadMs` after a 1001 or 1012), resumes with
 * `last_event_id`, drops repeated events, sends heartbeats and refreshes
 * its token in-band before it expires.
 */
export class WsGatewayClient {
  private readonly opts: WsGatewayClientOptions;
  private readonly WS: WebSocketConstructor;
  private readonly backoff: Required<BackoffOptions>;
  private readonly heartbeatTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly listeners = new Map<ClientEventName, Set<AnyListener>>();

  private _state: State = 'closed';
  private _lastEventId: string | undefined;
  private wantOpen = false;
  /** Bumped by every new attempt and by close(): late async results of older ones are dropped. */
  private generation = 0;
  private ws: WebSocketLike | null = null;
  private everConnected = false;
  private attempt = 0;
  /** A 4001 retry was spent since the last `connected`. */
  private authRetried = false;
  private offline = false;
  private waitingForOnline = false;

  private token: string | undefined;
  private tokenExp: number | undefined;
  private pendingToken: string | undefined;

  /** Recent events delivered, keyed by `type` and `event_id`. */
  private readonly seenIds = new Set<string>();
  private readonly seenOrder: string[] = [];
  /** Events that ask for an ack, by `event_id` (the newest DEDUP_IDS). */
  private readonly acks = new Map<string, AckEntry>();
  /** Ids waiting for the next ack message of the current connection. */
  private ackQueue: string[] = [];
  private ackTimer: ReturnType<typeof setTimeout> | undefined;
  /** Bumped for each socket: acks are per connection. */
  private connId = 0;
  private readonly ackMode: 'auto' | 'manual';
  private readonly presenceTimeoutMs: number;
  /** The branches of the admitted token (`connected.branch_ids`), for `presence()` without a branch. */
  private branchIds: number[] | undefined;
  private readonly presenceQueue: PresenceRequest[] = [];
  /** Replies still to come for requests that timed out: dropped when they arrive. */
  private presenceOrphans = 0;

  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private connectTimer: ReturnType<typeof setTimeout> | undefined;
  private pingTimer: ReturnType<typeof setInterval> | undefined;
  private pongTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private globalsAttached = false;

  constructor(opts: WsGatewayClientOptions) {
    if (!['waiter', 'kitchen', 'admin', 'diner'].includes(opts.endpoint)) {
      throw new TypeError(`unknown endpoint ${String(opts.endpoint)}`);
    }
    if (typeof opts.getToken !== 'function') throw new TypeError('getToken must be a function');
    buildUrl(opts.url, opts.endpoint, '', undefined); // throws on a bad URL now, not at connect
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError('no global WebSocket: pass one as the WebSocket option (Node 20: the ws package)');
    this.opts = opts;
    this.WS = WS;
    this.backoff = {
      initialMs: opts.backoff?.initialMs ?? DEFAULT_BACKOFF.initialMs,
      maxMs: opts.backoff?.maxMs ?? DEFAULT_BACKOFF.maxMs,
      restartSpreadMs: opts.backoff?.restartSpreadMs ?? DEFAULT_BACKOFF.restartSpreadMs,
    };
    this.heartbeatTimeoutMs = opts.heartbeatTimeoutMs ?? 10_000;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 20_000;
    this.presenceTimeoutMs = opts.presenceTimeoutMs ?? 10_000;
    if (opts.ack !== undefined && opts.ack !== 'auto' && opts.ack !== 'manual') throw new TypeError(`ack must be 'auto' or 'manual', not ${String(opts.ack)}`);
    this.ackMode = opts.ack ?? 'auto';
    for (const [name, v] of Object.entries({
      ...this.backoff,
      heartbeatTimeoutMs: this.heartbeatTimeoutMs,
      connectTimeoutMs: this.connectTimeoutMs,
      presenceTimeoutMs: this.presenceTimeoutMs,
    })) {
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw new TypeError(`${name} must be a finite number >= 0`);
    }
    this._lastEventId = opts.lastEventId;
  }

  get state(): State {
    return this._state;
  }

  /** The newest `event_id` received: the cursor the next connection resumes from. */
  get lastEventId(): string | undefined {
    return this._lastEventId;
  }

  set lastEventId(id: string | undefined) {
    this._lastEventId = id;
  }

  /** Starts connecting; does nothing while already connecting, open or reconnecting. */
  connect(): void {
    if (this.wantOpen) return;
    this.wantOpen = true;
    this.attempt = 0;
    this.authRetried = false;
    this.attachGlobals();
    this.setState('connecting');
    void this.openSocket();
  }

  /** Closes with 1000 and stops: no reconnection; state `closed`. */
  close(): void {
    this.wantOpen = false;
    this.generation++;
    this.clearTimers();
    this.endConnection(new Error('closed'));
    this.detachGlobals();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onerror = () => {};
      ws.onclose = (ev) => this.emit('close', { code: ev.code, reason: ev.reason });
      try {
        if (ws.readyState === OPEN) ws.close(1000, 'client closed');
        else ws.close();
      } catch {
        // already closing
      }
    }
    this.setState('closed');
  }

  /** Asks the gateway to read this waiter's sectors again; `sectors_updated` answers. */
  refreshSectors(): void {
    this.send('{"type":"refresh_sectors"}');
  }

  /**
   * Acknowledges events by `event_id` (the `ack: 'manual'` mode's way; in
   * the auto mode the client does it). Sent with the other acks due within
   * ACK_FLUSH_MS, on the connection that received the event; an event
   * received on a connection that has ended is acked when the gateway shows
   * it again (a redelivery, a replay), since the gateway takes an ack only
   * from a connection that received the event. Acking twice is harmless.
   */
  ack(eventIds: string | string[]): void {
    for (const id of typeof eventIds === 'string' ? [eventIds] : eventIds) {
      if (typeof id !== 'string' || id === '') throw new TypeError('an event id is a non-empty string');
      const entry = this.acks.get(id);
      if (entry) {
        entry.status = 'done';
        if (entry.conn === this.connId) this.queueAck(id);
      } else {
        // Not an event of this client's memory: sent as asked, on the current connection.
        this.queueAck(id);
      }
    }
  }

  /**
   * Asks the gateway who is connected (admin endpoint): with `branchId`, one
   * branch's `presence` frame; without, one frame per branch of the admin's
   * token, in its order. Rejects on an error answer (`forbidden_branch`,
   * `presence_unavailable`, `unknown_message_type` on another endpoint), when
   * no answer comes within `presenceTimeoutMs`, or when the connection ends
   * first. Requests are answered in order, one at a time (the answers carry
   * no request id): later calls wait for the earlier ones.
   */
  presence(branchId: number): Promise<PresenceFrame>;
  presence(): Promise<PresenceFrame[]>;
  presence(branchId?: number): Promise<PresenceFrame | PresenceFrame[]> {
    if (branchId !== undefined && !Number.isSafeInteger(branchId)) return Promise.reject(new TypeError('branchId must be an integer'));
    if (!this.ws || this.ws.readyState !== OPEN || this._state !== 'open') return Promise.reject(new Error('not connected'));
    const expected = branchId !== undefined ? 1 : (this.branchIds?.length ?? 1);
    if (expected === 0) return Promise.resolve([]);
    return new Promise<PresenceFrame[]>((resolve, reject) => {
      this.presenceQueue.push({ branchId, expected, replies: [], resolve, reject });
      if (this.presenceQueue.length === 1) this.sendPresence();
    }).then((r) => (branchId !== undefined ? r[0]! : r));
  }

  /** Sends one text frame as it is. Throws when no connection is open. */
  send(text: string): void {
    if (!this.ws || this.ws.readyState !== OPEN) throw new Error('not connected');
    this.ws.send(text);
  }

  on<K extends ClientEventName>(name: K, listener: Listener<K>): () => void {
    let set = this.listeners.get(name);
    if (!set) this.listeners.set(name, (set = new Set()));
    set.add(listener as AnyListener);
    return () => this.off(name, listener);
  }

  off<K extends ClientEventName>(name: K, listener: Listener<K>): void {
    this.listeners.get(name)?.delete(listener as AnyListener);
  }

  private emit<K extends ClientEventName>(name: K, arg: ClientEventMap[K]): void {
    const set = this.listeners.get(name);
    if (!set) return;
    for (const l of [...set]) {
      try {
        (l as Listener<K>)(arg);
      } catch (e) {
        reportError(e);
      }
    }
  }

  private setState(s: State): void {
    if (this._state === s) return;
    this._state = s;
    this.emit('state', s);
  }

  private async openSocket(): Promise<void> {
    const gen = ++this.generation;
    if (this.offline) {
      this.waitingForOnline = true;
      return;
    }
    let token: string;
    try {
      token = await this.opts.getToken();
      if (typeof token !== 'string') throw new TypeError('getToken did not return a string');
    } catch (e) {
      if (gen !== this.generation || !this.wantOpen) return;
      this.emit('error', asError(e, 'getToken failed'));
      this.scheduleReconnect(ABNORMAL_CLOSURE);
      return;
    }
    if (gen !== this.generation || !this.wantOpen) return;
    // A reconnection without any cursor still asks for one, empty, so that
    // `connected.recovered === false` tells the application it may have missed events.
    const cursor = this._lastEventId ?? (this.everConnected ? '' : undefined);
    let ws: WebSocketLike;
    try {
      ws = new this.WS(buildUrl(this.opts.url, this.opts.endpoint, token, cursor));
    } catch (e) {
      this.emit('error', asError(e, 'cannot create the WebSocket'));
      this.scheduleReconnect(ABNORMAL_CLOSURE);
      return;
    }
    this.ws = ws;
    this.connId++;
    this.token = token;
    this.tokenExp = tokenExpiry(token);
    this.pendingToken = undefined;
    ws.onmessage = (ev) => {
      if (this.ws === ws) this.onFrame(ev.data);
    };
    ws.onerror = () => {
      if (this.ws === ws) this.emit('error', new Error('WebSocket error'));
    };
    ws.onclose = (ev) => {
      if (this.ws === ws) this.onClosed(ev.code, ev.reason ?? '');
    };
    this.connectTimer = setTimeout(() => this.abandon(ws, 'connect timeout'), this.connectTimeoutMs);
  }

  /** Gives up on a socket that is not answering: it is not waited for (a dead network may never close it). */
  private abandon(ws: WebSocketLike, reason: string): void {
    if (this.ws !== ws) return;
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = () => {};
    try {
      if (ws.readyState === OPEN) ws.close(4000, reason);
      else if (ws.readyState === CONNECTING) ws.close();
    } catch {
      // nothing to do
    }
    this.onClosed(ABNORMAL_CLOSURE, reason);
  }

  private onClosed(code: number, reason: string): void {
    this.ws = null;
    this.clearConnectionTimers();
    this.endConnection(new Error(`connection closed (${code})`));
    this.emit('close', { code, reason });
    if (!this.wantOpen) {
      this.setState('closed');
      return;
    }
    const action = closeAction(code);
    if (action === 'reauth' && this.authRetried) {
      // The usual cause: a getToken that returns a fixed token, which has expired.
      this.emit('error', new Error('closed for good: the gateway refused two tokens in a row (4001: missing, invalid, expired or revoked); getToken must return a fresh token'));
    }
    if (action === 'stop' || (action === 'reauth' && this.authRetried)) {
      this.wantOpen = false;
      this.detachGlobals();
      this.setState('closed');
      return;
    }
    if (action === 'reauth') this.authRetried = true;
    this.scheduleReconnect(code, action);
  }

  private scheduleReconnect(code: number, action: CloseAction = 'retry'): void {
    this.attempt++;
    this.setState('reconnecting');
    if (this.offline) {
      this.waitingForOnline = true;
      return;
    }
    const delayMs = backoffDelay(this.attempt, action, this.backoff);
    this.emit('reconnect', { attempt: this.attempt, delayMs, code });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.openSocket();
    }, delayMs);
  }

  /** Connects now instead of waiting for the backoff delay (back online, page visible again). */
  private reconnectNow(): void {
    if (!this.wantOpen || this.ws) return;
    if (this.reconnectTimer === undefined && !this.waitingForOnline) return; // an attempt is under way
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.waitingForOnline = false;
    void this.openSocket();
  }

  private onFrame(data: unknown): void {
    this.clearPongDeadline(); // any frame shows the connection is alive
    if (typeof data !== 'string') {
      this.emit('error', new Error('binary frame received; the gateway sends text only'));
      return;
    }
    let frame: unknown;
    try {
      frame = JSON.parse(data);
    } catch {
      this.emit('error', new Error('frame is not JSON'));
      return;
    }
    if (typeof frame !== 'object' || frame === null || typeof (frame as { type?: unknown }).type !== 'string') {
      this.emit('error', new Error('frame is not an object with a string type'));
      return;
    }
    const f = frame as ServerFrame;
    this.emit('message', f);
    if (!PROTOCOL_FRAME_TYPES.has(f.type)) {
      this.onEvent(f as GatewayEvent);
      return;
    }
    switch (f.type) {
      case 'connected':
        this.onConnected(f as ConnectedFrame);
        break;
      case 'pong':
        break;
      case 'sectors_updated':
        this.emit('sectors_updated', f as SectorsUpdatedFrame);
        break;
      case 'token_refreshed':
        this.onTokenRefreshed(f as TokenRefreshedFrame);
        break;
      case 'error':
        if ((f as ErrorFrame).code === 'token_rejected') this.pendingToken = undefined;
        this.emit('error', f as ErrorFrame);
        if (PRESENCE_ERRORS.has((f as ErrorFrame).code)) this.onPresenceError(f as ErrorFrame);
        break;
      case 'presence':
        this.emit('presence', f as PresenceFrame);
        this.onPresenceReply(f as PresenceFrame);
        break;
      case 'resync':
        this.emit('resync', f as ResyncFrame);
        break;
    }
  }

  private onConnected(f: ConnectedFrame): void {
    clearTimeout(this.connectTimer);
    this.connectTimer = undefined;
    this.everConnected = true;
    this.attempt = 0;
    this.authRetried = false;
    this.branchIds = 'branch_ids' in f && Array.isArray(f.branch_ids) ? f.branch_ids : 'branch_id' in f ? [f.branch_id] : undefined;
    const intervalMs = Math.max(1, Number(f.heartbeat_interval_s) || 30) * 1000;
    clearInterval(this.pingTimer);
    this.pingTimer = setInterval(() => this.ping(), intervalMs);
    this.scheduleRefresh();
    this.setState('open');
    this.emit('connected', f);
  }

  private onEvent(e: GatewayEvent): void {
    const id = e.event_id;
    if (typeof id !== 'string') {
      this.dispatch(e, undefined);
      return;
    }
    // By type and id: an EVENT_UNACKNOWLEDGED carries the id of the event it reports.
    const key = `${e.type}\n${id}`;
    const asksAck = typeof e.ack === 'object' && e.ack !== null;
    let entry = asksAck ? this.acks.get(id) : undefined;
    if (entry) entry.conn = this.connId; // this connection received it: its ack counts
    if (this.seenIds.has(key)) {
      // A repeat: a redelivery, or a replay after a resume.
      if (!entry) return;
      if (entry.status === 'done') this.queueAck(id); // the first ack may have been lost
      if (entry.status !== 'failed') return;
      // Its listeners failed: the application has not processed it; hand it again.
    } else {
      this.seenIds.add(key);
      this.seenOrder.push(key);
      if (this.seenOrder.length > DEDUP_IDS) this.seenIds.delete(this.seenOrder.shift()!);
      // The cursor is the newest position in the stream: not an escalation's
      // id (another event's), nor a redelivery's (an older event).
      if (e.type !== 'EVENT_UNACKNOWLEDGED' && e.redelivered !== true) this._lastEventId = id;
    }
    if (asksAck && !entry) {
      entry = { status: 'running', conn: this.connId };
      this.acks.set(id, entry);
      if (this.acks.size > DEDUP_IDS) this.acks.delete(this.acks.keys().next().value!);
    }
    this.dispatch(e, entry && id);
  }

  /**
   * Hands an event to the `event` listeners. With `ackId`, its ack entry is
   * settled once they have all returned, or the Promises they returned have
   * settled: `failed` if any threw or rejected (reported as the platform
   * reports errors, as for every listener), else acked (auto mode) or left
   * to `ack()` (manual mode).
   */
  private dispatch(e: GatewayEvent, ackId: string | undefined): void {
    const entry = ackId !== undefined ? this.acks.get(ackId) : undefined;
    if (entry) entry.status = 'running';
    const set = this.listeners.get('event');
    let failed = false;
    const pending: PromiseLike<unknown>[] = [];
    for (const l of set ? [...set] : []) {
      try {
        const r = (l as (arg: GatewayEvent) => unknown)(e);
        if (entry && r !== null && typeof r === 'object' && typeof (r as PromiseLike<unknown>).then === 'function') pending.push(r as PromiseLike<unknown>);
      } catch (err) {
        failed = true;
        reportError(err);
      }
    }
    if (!entry) return;
    const settle = (ok: boolean): void => {
      if (entry.status !== 'running' || this.acks.get(ackId!) !== entry) return;
      if (!ok) entry.status = 'failed';
      else if (this.ackMode === 'auto') {
        entry.status = 'done';
        if (entry.conn === this.connId) this.queueAck(ackId!);
      }
      // manual: stays 'running' until ack(); a repeat meanwhile is not handed again.
    };
    if (failed || pending.length === 0) {
      settle(!failed);
      return;
    }
    Promise.allSettled(pending).then((results) => {
      let ok = true;
      for (const r of results) {
        if (r.status === 'rejected') {
          ok = false;
          reportError(r.reason);
        }
      }
      settle(ok);
    });
  }

  private queueAck(id: string): void {
    if (!this.ws || this.ws.readyState !== OPEN) return; // acks are per connection: a later repeat brings it back
    if (utf8Length(id) > 128) return; // the gateway would refuse the whole message
    if (!this.ackQueue.includes(id)) this.ackQueue.push(id);
    if (this.ackQueue.length >= ACK_BATCH_MAX) this.flushAcks();
    else if (this.ackTimer === undefined) this.ackTimer = setTimeout(() => this.flushAcks(), ACK_FLUSH_MS);
  }

  private flushAcks(): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    const ids = this.ackQueue;
    this.ackQueue = [];
    if (!this.ws || this.ws.readyState !== OPEN) return;
    for (let i = 0; i < ids.length; i += ACK_BATCH_MAX) {
      const batch = ids.slice(i, i + ACK_BATCH_MAX);
      try {
        this.ws.send(JSON.stringify({ type: 'ack', event_ids: batch }));
      } catch (e) {
        this.emit('error', asError(e, 'cannot send ack'));
        return;
      }
      this.emit('ack', batch);
    }
  }

  private sendPresence(): void {
    const req = this.presenceQueue[0];
    if (!req) return;
    try {
      this.send(JSON.stringify(req.branchId !== undefined ? { type: 'presence', branch_id: req.branchId } : { type: 'presence' }));
    } catch (e) {
      this.presenceQueue.shift();
      req.reject(asError(e, 'cannot send presence'));
      this.sendPresence();
      return;
    }
    req.timer = setTimeout(() => {
      if (this.presenceQueue[0] !== req) return;
      this.presenceQueue.shift();
      // Its answers may still come: they must not be taken for the next request's.
      this.presenceOrphans += req.expected - req.replies.length;
      req.reject(new Error(`no presence answer within ${this.presenceTimeoutMs} ms`));
      this.sendPresence();
    }, this.presenceTimeoutMs);
  }

  private onPresenceReply(f: PresenceFrame): void {
    if (this.presenceOrphans > 0) {
      this.presenceOrphans--;
      return;
    }
    const req = this.presenceQueue[0];
    if (!req) return; // unasked (a send() by hand): the `presence` listeners have it
    req.replies.push(f);
    if (req.replies.length < req.expected) return;
    clearTimeout(req.timer);
    this.presenceQueue.shift();
    req.resolve(req.replies);
    this.sendPresence();
  }

  private onPresenceError(f: ErrorFrame): void {
    if (this.presenceOrphans > 0) {
      this.presenceOrphans--;
      return;
    }
    const req = this.presenceQueue[0];
    if (!req) return;
    clearTimeout(req.timer);
    this.presenceQueue.shift();
    const err = new Error(`presence refused: ${f.code}`) as Error & { code: string };
    err.code = f.code;
    req.reject(err);
    this.sendPresence();
  }

  /** A connection ended (or close()): its pending acks and presence requests go with it. */
  private endConnection(reason: Error): void {
    clearTimeout(this.ackTimer);
    this.ackTimer = undefined;
    this.ackQueue = [];
    this.presenceOrphans = 0;
    const reqs = this.presenceQueue.splice(0);
    for (const req of reqs) {
      clearTimeout(req.timer);
      req.reject(new Error(`presence: ${reason.message}`));
    }
  }

  private ping(): void {
    if (!this.ws || this.ws.readyState !== OPEN) return;
    try {
      this.ws.send('{"type":"ping"}');
    } catch {
      return;
    }
    if (this.pongTimer === undefined) {
      const ws = this.ws;
      this.pongTimer = setTimeout(() => {
        this.pongTimer = undefined;
        this.abandon(ws, 'heartbeat timeout');
      }, this.heartbeatTimeoutMs);
    }
  }

  private clearPongDeadline(): void {
    clearTimeout(this.pongTimer);
    this.pongTimer = undefined;
  }

  private scheduleRefresh(expSeconds = this.tokenExp): void {
    clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (expSeconds === undefined) return; // exp unreadable: no timed refresh
    const lifetimeMs = expSeconds * 1000 - Date.now();
    const inMs = Math.max(0, lifetimeMs - refreshLeadMs(lifetimeMs));
    const gen = this.generation;
    const arm = (remaining: number): void => {
      this.refreshTimer = setTimeout(() => {
        if (remaining > MAX_TIMER_MS) arm(remaining - MAX_TIMER_MS);
        else void this.refreshToken(gen);
      }, Math.min(remaining, MAX_TIMER_MS));
    };
    arm(inMs);
  }

  private async refreshToken(gen: number): Promise<void> {
    this.refreshTimer = undefined;
    let token: string;
    try {
      token = await this.opts.getToken();
      if (typeof token !== 'string') throw new TypeError('getToken did not return a string');
    } catch (e) {
      if (gen === this.generation) this.emit('error', asError(e, 'getToken failed (refresh)'));
      return;
    }
    if (gen !== this.generation || this._state !== 'open' || !this.ws) return;
    const exp = tokenExpiry(token);
    if (exp !== undefined && this.tokenExp !== undefined && exp <= this.tokenExp) {
      // Sending it would change nothing, and refreshing again at once would loop.
      this.emit('error', new Error('getToken returned a token that expires no later than the current one; not refreshed'));
      return;
    }
    this.pendingToken = token;
    try {
      this.ws.send(JSON.stringify({ type: 'refresh_token', token }));
    } catch (e) {
      this.emit('error', asError(e, 'cannot send refresh_token'));
    }
  }

  private onTokenRefreshed(f: TokenRefreshedFrame): void {
    if (this.pendingToken !== undefined) {
      this.token = this.pendingToken;
      this.pendingToken = undefined;
    }
    const exp = typeof f.expires_at === 'number' ? f.expires_at : this.token ? tokenExpiry(this.token) : undefined;
    this.tokenExp = exp;
    this.scheduleRefresh(exp);
    this.emit('token_refreshed', f);
  }

  private clearConnectionTimers(): void {
    clearTimeout(this.connectTimer);
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    clearTimeout(this.refreshTimer);
    this.connectTimer = this.pingTimer = this.pongTimer = this.refreshTimer = undefined;
  }

  private clearTimers(): void {
    this.clearConnectionTimers();
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    this.waitingForOnline = false;
  }

  // Browser hooks: `online`/`offline` on the global, `visibilitychange` on document. Absent in Node.
  private readonly onOnline = (): void => {
    this.offline = false;
    this.reconnectNow();
  };

  private readonly onOffline = (): void => {
    this.offline = true;
    if (this.reconnectTimer !== undefined) {
      clearTimeout(this.reconnectTimer);
      this.reconnectTimer = undefined;
      this.waitingForOnline = true;
    }
  };

  private readonly onVisibility = (): void => {
    const doc = (globalThis as { document?: { visibilityState?: string } }).document;
    if (doc?.visibilityState !== 'visible') return;
    if (this._state === 'open') this.ping(); // check at once that the connection survived the pause
    else this.reconnectNow();
  };

  private attachGlobals(): void {
    if (this.globalsAttached) return;
    this.globalsAttached = true;
    const g = globalThis as unknown as Partial<EventTarget> & { navigator?: { onLine?: unknown }; document?: Partial<EventTarget> };
    this.offline = typeof g.navigator?.onLine === 'boolean' ? !g.navigator.onLine : false;
    if (typeof g.addEventListener === 'function') {
      g.addEventListener('online', this.onOnline);
      g.addEventListener('offline', this.onOffline);
    }
    if (g.document && typeof g.document.addEventListener === 'function') {
      g.document.addEventListener('visibilitychange', this.onVisibility);
    }
  }

  private detachGlobals(): void {
    if (!this.globalsAttached) return;
    this.globalsAttached = false;
    const g = globalThis as unknown as Partial<EventTarget> & { document?: Partial<EventTarget> };
    if (typeof g.removeEventListener === 'function') {
      g.removeEventListener('online', this.onOnline);
      g.removeEventListener('offline', this.onOffline);
    }
    if (g.document && typeof g.document.removeEventListener === 'function') {
      g.document.removeEventListener('visibilitychange', this.onVisibility);
    }
  }
}

/** `{base}/ws/{endpoint}?token=…` (diners: `table_token`), `&last_event_id=…` when a cursor is given. */
export function buildUrl(base: string, endpoint: Endpoint, token: string, lastEventId: string | undefined): string {
  const u = new URL(base);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  else if (u.protocol !== 'ws:' && u.protocol !== 'wss:') throw new TypeError(`url must be ws:, wss:, http: or https:, not ${u.protocol}`);
  u.pathname = `${u.pathname.replace(/\/+$/, '')}/ws/${endpoint}`;
  u.searchParams.set(endpoint === 'diner' ? 'table_token' : 'token', token);
  if (lastEventId !== undefined) u.searchParams.set('last_event_id', lastEventId);
  u.hash = '';
  return u.toString();
}

/** A listener's exception must not break the connection's state: it is reported as the platform does. */
function reportError(e: unknown): void {
  const report = (globalThis as { reportError?: (e: unknown) => void }).reportError;
  if (report) report(e);
  else
    setTimeout(() => {
      throw e;
    });
}

function utf8Length(s: string): number {
  let n = 0;
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    n += c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
  }
  return n;
}

function asError(e: unknown, context: string): Error {
  return e instanceof Error ? e : new Error(`${context}: ${String(e)}`);
}
