/** Wire types of the wsgateway protocol (docs/PROTOCOL.md). */

export type Endpoint = 'waiter' | 'kitchen' | 'admin' | 'diner';

/**
 * `connecting`: the first connection after `connect()`, until `connected`.
 * `open`: the gateway sent `connected`. `reconnecting`: the connection was
 * lost and another is scheduled or under way. `closed`: not connected and
 * not trying (before `connect()`, after `close()`, or after a stop rule).
 */
export type State = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** The event types the gateway knows (PROTOCOL.md §5 "Types"). */
export const KNOWN_EVENT_TYPES = [
  'ROUND_SUBMITTED',
  'ROUND_IN_KITCHEN',
  'ROUND_READY',
  'ROUND_SERVED',
  'SERVICE_CALL_CREATED',
  'SERVICE_CALL_ACKED',
  'SERVICE_CALL_CLOSED',
  'PAYMENT_APPROVED',
  'PAYMENT_REJECTED',
  'PAYMENT_FAILED',
  'TABLE_SESSION_STARTED',
  'TABLE_CLEARED',
  'ENTITY_CREATED',
  'ENTITY_UPDATED',
  'ENTITY_DELETED',
  'SECTOR_ASSIGNMENT_CHANGED',
  'EVENT_UNACKNOWLEDGED',
] as const;

export type KnownEventType = (typeof KNOWN_EVENT_TYPES)[number];

/** Fields every event has or may have (PROTOCOL.md §5 "Validation"). */
export interface EventFields {
  type: string;
  tenant_id: number;
  branch_id: number;
  /** Present on events published through the gateway; the resume cursor. */
  event_id?: string;
  sector_id?: number;
  session_id?: number;
  table_id?: number;
  entity?: Record<string, unknown>;
  /** Publish time, Unix seconds or milliseconds (told apart by magnitude). */
  ts?: number;
  /** The publisher asks for an acknowledgement within `within_s` seconds (the client sends it, see `ack` option). */
  ack?: AckRequest;
  /** `true` on the gateway's one redelivery of an event that was not acknowledged in time (same `event_id`). */
  redelivered?: boolean;
  /** The publisher's own fields are forwarded as they are. */
  [field: string]: unknown;
}

/** An event of a known type: `type` is the discriminant. */
export interface KnownEvent<T extends KnownEventType = KnownEventType> extends EventFields {
  type: T;
}

/** `SECTOR_ASSIGNMENT_CHANGED`: `entity.waiter_id`, when an integer, names the waiter. */
export interface SectorAssignmentChangedEvent extends KnownEvent<'SECTOR_ASSIGNMENT_CHANGED'> {
  entity?: { waiter_id?: number; [field: string]: unknown };
}

/** An event's request for an acknowledgement. */
export interface AckRequest {
  /** 1..300 seconds: no ack by then, and the gateway redelivers it once, then escalates. */
  within_s: number;
}

/**
 * The gateway's escalation, on `channel:branch:{id}:admin`: an event that
 * asked for an ack got none (`no_ack`), or reached nobody (`no_audience`).
 * Its `event_id` is the reported event's own id.
 */
export interface EventUnacknowledgedEvent extends KnownEvent<'EVENT_UNACKNOWLEDGED'> {
  event_id: string;
  /** The unacknowledged event's `type`. */
  event_type: string;
  /** The channel it was published on. */
  channel: string;
  reason: 'no_ack' | 'no_audience';
  /** How many connections (all nodes) received the event. */
  audience: number;
  /** Unix milliseconds. */
  ts: number;
}

/** An event of a type this SDK does not know: delivered all the same. */
export interface UnknownEvent extends EventFields {
  type: string;
}

type KnownEventUnion = {
  [K in KnownEventType]: K extends 'SECTOR_ASSIGNMENT_CHANGED'
    ? SectorAssignmentChangedEvent
    : K extends 'EVENT_UNACKNOWLEDGED'
      ? EventUnacknowledgedEvent
      : KnownEvent<K>;
}[KnownEventType];

/**
 * What the `event` listener receives. Narrow it with `isKnownEvent(e, 'ROUND_READY')`
 * (a `switch` on `type` narrows the known members, but `UnknownEvent` stays
 * possible since its `type` is any string).
 */
export type GatewayEvent = KnownEventUnion | UnknownEvent;

/** The event of type `T`, or `UnknownEvent` for a type that is not known. */
export type EventOfType<T extends string> = T extends KnownEventType ? Extract<KnownEventUnion, { type: T }> : UnknownEvent;

/** Whether `e` is a known event, optionally of the given type; a type guard. */
export function isKnownEvent<T extends KnownEventType>(e: GatewayEvent, type?: T): e is EventOfType<T> {
  if (type !== undefined) return e.type === type;
  return (KNOWN_EVENT_TYPES as readonly string[]).includes(e.type);
}

/** `connected` on a staff endpoint (PROTOCOL.md §4). */
export interface StaffConnectedFrame {
  type: 'connected';
  endpoint: 'waiter' | 'kitchen' | 'admin';
  user_id: number;
  tenant_id: number;
  branch_ids: number[];
  /** The waiter's sectors today, `[]` for none, `null` when unknown or not filtered. */
  sector_ids: number[] | null;
  heartbeat_interval_s: number;
  /** Present when the connection resumed with `last_event_id`. */
  recovered?: boolean;
}

/** `connected` on `/ws/diner`. */
export interface DinerConnectedFrame {
  type: 'connected';
  endpoint: 'diner';
  tenant_id: number;
  branch_id: number;
  session_id: number;
  table_id: number;
  heartbeat_interval_s: number;
  recovered?: boolean;
}

export type ConnectedFrame = StaffConnectedFrame | DinerConnectedFrame;

export interface PongFrame {
  type: 'pong';
}

export interface SectorsUpdatedFrame {
  type: 'sectors_updated';
  sector_ids: number[] | null;
}

export interface TokenRefreshedFrame {
  type: 'token_refreshed';
  /** The new token's expiry, Unix seconds. */
  expires_at: number;
}

/** `unknown_message_type`, `invalid_message`, `invalid_json`, `token_rejected`, `refresh_in_progress`, `forbidden_branch`, `presence_unavailable`, or another code. */
export interface ErrorFrame {
  type: 'error';
  code: string;
  [field: string]: unknown;
}

/** "Reload your state": history could not give back everything (PROTOCOL.md §11). */
export interface ResyncFrame {
  type: 'resync';
  reason: 'history_trimmed' | 'history_expired' | 'history_unavailable' | 'unnumbered_events' | string;
}

/** One connection in a presence list (an admin's `presence` reply, or `GET /api/presence`). */
export interface PresenceConnection {
  /** `<node>/<n>`. */
  id: string;
  endpoint: Endpoint;
  /** Staff (`waiter`, `kitchen`, `admin`) only. */
  user_id?: number;
  /** Diners only. */
  session_id?: number;
  /** Diners only. */
  table_id?: number;
  /** A waiter's sectors, or `null` (not filtered, or another endpoint). */
  sector_ids: number[] | null;
  /** Unix milliseconds. */
  connected_at: number;
  /** The gateway node's name (`WSGATEWAY_NODE_NAME`). */
  node: string;
}

/** The answer to `{"type":"presence"}`: one per branch, ordered by `connected_at`, then `id`. */
export interface PresenceFrame {
  type: 'presence';
  tenant_id: number;
  branch_id: number;
  connections: PresenceConnection[];
}

export type ProtocolFrame = ConnectedFrame | PongFrame | SectorsUpdatedFrame | TokenRefreshedFrame | ErrorFrame | ResyncFrame | PresenceFrame;

/** Any frame the gateway sends: a protocol frame or an event. */
export type ServerFrame = ProtocolFrame | GatewayEvent;

/** The `type`s of protocol frames: every other frame with a string `type` is an event. */
export const PROTOCOL_FRAME_TYPES: ReadonlySet<string> = new Set([
  'connected',
  'pong',
  'sectors_updated',
  'token_refreshed',
  'error',
  'resync',
  'presence',
]);

export interface CloseInfo {
  /** The close code (1006 when the connection ended without one, see the README). */
  code: number;
  reason: string;
}

export interface ReconnectInfo {
  /** 1 for the first retry after a working connection; reset by each `connected`. */
  attempt: number;
  delayMs: number;
  /** The close code that led to the retry. */
  code: number;
}

/** Listener argument of every event name. */
export interface ClientEventMap {
  event: GatewayEvent;
  state: State;
  connected: ConnectedFrame;
  close: CloseInfo;
  error: Error | ErrorFrame;
  resync: ResyncFrame;
  reconnect: ReconnectInfo;
  message: ServerFrame;
  sectors_updated: SectorsUpdatedFrame;
  token_refreshed: TokenRefreshedFrame;
  presence: PresenceFrame;
  /** An ack message was sent: the ids it carried. */
  ack: string[];
}

export type ClientEventName = keyof ClientEventMap;
