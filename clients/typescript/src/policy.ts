/**
 * What the client does after a close code, and how long it waits.
 * The table in README.md ("Close-code policy") is this function in words.
 */

/** `retry`: reconnect after a backoff delay. `reauth`: ask `getToken` again and retry once; a second 4001 in a row stops. `stop`: stay closed. `rate_limited`: retry after a longer delay. */
export type CloseAction = 'retry' | 'reauth' | 'stop' | 'rate_limited';

export function closeAction(code: number): CloseAction {
  switch (code) {
    case 4001: // token missing, invalid, expired or revoked
      return 'reauth';
    case 4003: // role or origin not allowed: a new attempt gets the same answer
    case 4008: // too many connections of this user or table session: retrying would take another's place or loop
      return 'stop';
    case 4029: // rate limited
      return 'rate_limited';
    default:
      // 1000, 1001 (shutdown, heartbeat), 1002, 1003, 1005, 1006, 1007,
      // 1008 (slow consumer), 1009, 1011, 1012, 1013 (capacity), 1014,
      // 1015 and any other code: the next connection may well work, and the
      // frame that caused a 1003/1007/1009 is not sent again.
      return 'retry';
  }
}

export interface BackoffOptions {
  /** Ceiling of the first retry's delay, in ms. Default 500. */
  initialMs?: number;
  /** Largest ceiling of any delay, in ms. Default 30 000. */
  maxMs?: number;
}

export const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30_000 } as const;

/** Rate-limited (4029) delays use a ceiling this many doublings higher, and never less than half of it. */
const RATE_LIMIT_DOUBLINGS = 3;

/**
 * Full jitter: a uniform delay in [0, min(maxMs, initialMs * 2^(attempt-1))].
 * After a 4029: "equal jitter" on a ceiling 8 times higher,
 * uniform in [c/2, c] with c = min(maxMs, initialMs * 2^(attempt+2)).
 */
export function backoffDelay(attempt: number, rateLimited: boolean, opts: Required<BackoffOptions>, random: () => number = Math.random): number {
  const n = Math.max(1, attempt) - 1 + (rateLimited ? RATE_LIMIT_DOUBLINGS : 0);
  const ceiling = Math.min(opts.maxMs, opts.initialMs * 2 ** Math.min(n, 52));
  if (rateLimited) return Math.round(ceiling / 2 + random() * (ceiling / 2));
  return Math.round(random() * ceiling);
}
