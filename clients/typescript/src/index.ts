export { WsGatewayClient, buildUrl, DEDUP_IDS, ABNORMAL_CLOSURE, ACK_FLUSH_MS, ACK_BATCH_MAX } from './client.js';
export type { WsGatewayClientOptions, WebSocketLike, WebSocketConstructor } from './client.js';
export { closeAction, backoffDelay, DEFAULT_BACKOFF } from './policy.js';
export type { CloseAction, BackoffOptions } from './policy.js';
export { tokenExpiry, refreshLeadMs } from './token.js';
export * from './types.js';
