/**
 * Reads `exp` from a JWT's payload, without verifying it: the client only
 * needs to know when to ask for a new token. Staff tokens and table tokens
 * are both HS256 JWTs with `exp` (Unix seconds). Anything else: undefined,
 * and then there is no timed refresh.
 */
export function tokenExpiry(token: string): number | undefined {
  const parts = token.split('.');
  if (parts.length !== 3) return undefined;
  try {
    const b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const payload: unknown = JSON.parse(new TextDecoder().decode(bytes));
    if (typeof payload !== 'object' || payload === null) return undefined;
    const exp = (payload as { exp?: unknown }).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * How long before expiry to refresh: a quarter of the token's remaining
 * lifetime when it was obtained, at least 1 s and at most 60 s.
 */
export function refreshLeadMs(lifetimeMs: number): number {
  return Math.min(60_000, Math.max(1_000, lifetimeMs / 4));
}
