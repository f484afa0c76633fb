/**
 * What the client does after a close code, and how long it waits.
 * The table in README.md ("Close-code policy") is this function in words.
 */

/**
 * `retry`: reconnect after a backoff delay. `restart`: the node is going away
 * or restarting (1001, 1012): reconnect after a delay spread over
 * `restartSpreadMs`, so that the clients it closed together do not return
 * together. `reauth`: ask `getToken` again and retry once; a second 4001 in a
 * row stops. `stop`: stay closed. `rate_limited`: retry after a longer delay.
 */
export type CloseAction = 'retry' | 'restart' | 'reauth' | 'stop' | 'rate_limited';

export function closeAction(code: number): CloseAction {
  switch (code) {
    case 1001: // going away: the gateway's heartbeat timeout (or a proxy's shutdown)
    case 1012: // service restart: the node drains
      return 'restart';
    case 4001: // token missing, invalid, expired or revoked
      return 'reauth';
    case 4003: // role or origin not allowed: a new attempt gets the same answer
    case 4008: // too many connections of this user or table session: retrying would take another's place or loop
      return 'stop';
    case 4029: // rate limited
      return 'rate_limited';
    default:
      // 1000, 1002, 1003, 1005, 1006, 1007, 1008 (slow consumer), 1009,
      // 1011, 1013 (capacity), 1014, 1015 and any other code: the next
      // connection may well work, and the frame that caused a 1003/1007/1009
      // is not sent again.
      return 'retry';
  }
}

export interface BackoffOptions {
  /** Ceiling of the first retry's delay, in ms. Default 500. */
  initialMs?: number;
  /** Largest ceiling of any delay, in ms. Default 30 000. */
  maxMs?: number;
  /**
   * Ceiling of the delay of a retry after a 1001 or 1012 (the node is going
   * away or restarting), in ms; never above `maxMs`. Default 5 000. Retries
   * after that one, if it fails, wait the normal backoff.
   */
  restartSpreadMs?: number;
}

export const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30_000, restartSpreadMs: 5_000 } as const;

/** Rate-limited (4029) delays use a ceiling this many doublings higher, and never less than half of it. */
const RATE_LIMIT_DOUBLINGS = 3;

/**
 * Full jitter: a uniform delay in [0, c] with c = min(maxMs, initialMs * 2^(attempt-1)).
 * After a 1001 or 1012 (`'restart'`): full jitter on a ceiling of at least
 * `restartSpreadMs`: uniform in [0, min(maxMs, max(restartSpreadMs, c))].
 * After a 4029 (`'rate_limited'`, or `true`): "equal jitter" on a ceiling 8
 * times higher, uniform in [c/2, c] with c = min(maxMs, initialMs * 2^(attempt+2)).
 * Any other action (or `false`) is the plain full jitter.
 */
export function backoffDelay(
  attempt: number,
  action: CloseAction | boolean,
  opts: { initialMs: number; maxMs: number; restartSpreadMs?: number },
  random: () => number = Math.random,
): number {
  const rateLimited = action === true || action === 'rate_limited';
  const n = Math.max(1, attempt) - 1 + (rateLimited ? RATE_LIMIT_DOUBLINGS : 0);
  let ceiling = Math.min(opts.maxMs, opts.initialMs * 2 ** Math.min(n, 52));
  if (rateLimited) return Math.round(ceiling / 2 + random() * (ceiling / 2));
  if (action === 'restart') {
    const spread = opts.restartSpreadMs ?? DEFAULT_BACKOFF.restartSpreadMs;
    ceiling = Math.min(opts.maxMs, Math.max(spread, ceiling));
  }
  return Math.round(random() * ceiling);
}
