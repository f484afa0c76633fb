//! One WebSocket connection, from admission to close.
//!
//! [`serve`] reads top to bottom: admit (origin → token, revocation included
//! → role → sectors → capacity → per-user limit, PROTOCOL.md §2), queue
//! `connected` (or replay, on resume), then hand the connection to a task of
//! its own ([`Live`]) that loops over its hub handle (close requests
//! first, then queued frames), the check of a `refresh_token` under way
//! (polled beside the socket rather than awaited inline, so that a slow
//! Redis or database stalls nothing: see `refresh.rs`), and the socket,
//! until something closes it. Errors end here: they are logged and turned into a close code,
//! never returned to the acceptor.

mod context;
mod messages;
mod presence;
mod refresh;
mod resume;
mod wire;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

pub use context::{Context, Settings};
pub use messages::ClientMessage;
pub use wire::Wire;

use crate::auth::{AuthError, DinerIdentity, Endpoint, StaffIdentity, TenantId};
use crate::close::Close;
use crate::event::unix_ms;
use crate::hub::{
    Broken, ConnHandle, Member, Outbound, Refusal, Registered, Registration, SectorScope, Signal,
};
use crate::metrics::{Disconnect, Rejection, RevocationCheck, Undelivered};
use crate::reply::{Connected, Reply, Who};
use crate::sectors::sync::SectorCommand;

/// A client's WebSocket: tungstenite over the gateway's own socket.
pub type ClientSocket = WebSocketStream<Wire>;

/// What the HTTP layer learned from the upgrade request.
pub struct ConnectRequest {
    pub endpoint: Endpoint,
    /// `token` (staff) or `table_token` (diner) from the query string.
    pub token: Option<String>,
    pub origin: Option<String>,
    pub peer: SocketAddr,
    /// `last_event_id`: resume after this event (PROTOCOL.md §14).
    pub last_event_id: Option<String>,
    /// Called once, when the connection is admitted or refused: the HTTP
    /// layer frees the connection's place among pending handshakes.
    pub on_decided: Option<OnDecided>,
}

/// See [`ConnectRequest::on_decided`].
pub type OnDecided = Box<dyn FnOnce() + Send + Sync>;

/// Runs one connection to its end.
///
/// Two tasks: the one that upgraded the socket admits the connection (and
/// replays what it missed), then hands it to a task of its own for the rest
/// of its life. The long-lived task then holds only the loop's state (under
/// a kilobyte), not the upgrade's, the admission's and this function's
/// arguments, which would otherwise stay in its future for as long as the
/// connection is open (about 3 KiB more, per connection).
pub async fn serve(socket: ClientSocket, ctx: Arc<Context>, req: ConnectRequest) {
    let span = tracing::info_span!(
        "conn",
        endpoint = req.endpoint.as_str(),
        peer = %req.peer,
        origin = req.origin.as_deref().unwrap_or("-"),
        user = tracing::field::Empty,
        tenant = tracing::field::Empty,
        branches = tracing::field::Empty,
        session = tracing::field::Empty,
        sector_ids = tracing::field::Empty,
        id = tracing::field::Empty,
    );
    let tasks = ctx.tasks.clone();
    if let Some(live) = open(socket, ctx, req).instrument(span.clone()).await {
        tasks.spawn(live.run().instrument(span));
    }
}

/// An admitted connection: what its loop needs, and nothing else.
struct Live {
    socket: ClientSocket,
    ctx: Arc<Context>,
    registered: Registered,
    catch_up: resume::CatchUp,
    limiter: DefaultDirectRateLimiter,
    /// Whom a `refresh_token`'s token must name.
    owner: refresh::Owner,
    /// The `refresh_token` being checked, if any (one at most).
    refreshes: refresh::Refreshes,
    /// An admin's `presence` requests: the one being read, those waiting.
    presences: presence::Presences,
}

/// Admits the connection and replays what it missed; `None` once it is
/// refused or gone.
async fn open(
    mut socket: ClientSocket,
    ctx: Arc<Context>,
    mut req: ConnectRequest,
) -> Option<Live> {
    let close_timeout = ctx.settings.close_timeout;
    let admitted = admit(&ctx, &mut req).await;
    if let Some(decided) = req.on_decided.take() {
        decided();
    }
    let Admitted {
        registered,
        deferred_hello,
        owner,
    } = match admitted {
        Ok(admitted) => admitted,
        Err(refused) => {
            let (close, why) = (refused.close(), refused.rejection());
            ctx.metrics.rejected(why);
            tracing::info!(
                code = close.code(),
                reason = why.as_str(),
                "connection refused"
            );
            close_socket(&mut socket, None, close, close_timeout).await;
            return None;
        }
    };
    let handle = &registered.handle;
    tracing::Span::current().record("id", handle.id);
    tracing::info!("connected");
    // The drain closes what the hub holds; one admitted after it began
    // closes here.
    if ctx.draining.is_cancelled() {
        handle.close(Close::Shutdown);
    }
    let mut catch_up = resume::CatchUp::default();
    if let (Some(mut hello), Some(last)) = (deferred_hello, &req.last_event_id) {
        let replay = resume::replay(&ctx, handle.id, last).await;
        let m = &ctx.metrics;
        m.resumed(replay.recovered);
        m.replayed_events.inc_by(replay.frames.len() as u64);
        tracing::info!(
            recovered = replay.recovered,
            replayed = replay.frames.len(),
            "resumed"
        );
        hello.recovered = Some(replay.recovered);
        let first = std::iter::once(Reply::Connected(hello).to_text());
        let sent = tokio::time::timeout(close_timeout, async {
            for frame in first.chain(replay.frames) {
                socket.feed(Message::Text(frame)).await?;
            }
            socket.flush().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::info!(by = "client", during = "replay", "Connection closed");
            return None;
        }
        catch_up = replay.catch_up;
    }
    let limiter = rate_limiter(ctx.settings.rate_limit_per_s);
    Some(Live {
        socket,
        registered,
        catch_up,
        limiter,
        ctx,
        owner,
        refreshes: refresh::Refreshes::default(),
        presences: presence::Presences::default(),
    })
}

impl Live {
    /// The connection's life: close requests, queued frames and the socket,
    /// until something closes it.
    fn run(self) -> impl Future<Output = ()> {
        // An async block rather than an `async fn`: the fields are used in
        // place, where an `async fn` would keep a second copy of `self` (its
        // argument, moved into a local) for the connection's whole life.
        let mut this = self;
        async move {
            let handle = &this.registered.handle;
            let ctx = &this.ctx;
            let socket = &mut this.socket;
            let close_timeout = ctx.settings.close_timeout;
            // From here on, whoever queues a frame writes it; this task
            // only writes what the socket had no room for (or, while a
            // resume catches up, everything, to filter it).
            socket
                .get_mut()
                .attach(handle.clone(), this.catch_up.is_active());
            let end = loop {
                tokio::select! {
                    biased;
                    signal = handle.signal() => match signal {
                        Signal::Close(why) => break End::Gateway(why),
                        Signal::Broken => break End::Lost,
                        // A write stuck on a client that does not read still
                        // yields to a close request (slow consumer, shutdown).
                        Signal::Frames => tokio::select! {
                            biased;
                            why = handle.close_requested() => break End::Gateway(why),
                            written = write_queued(handle, &mut this.catch_up) => match written {
                                Ok(published_ms) => observe_written(ctx, published_ms),
                                Err(Broken) => break End::Lost,
                            },
                        },
                    },
                    // A `refresh_token` checked: applied and answered here.
                    () = this.refreshes.next(ctx, handle), if this.refreshes.is_running() => {}
                    // A `presence` read: answered here.
                    () = this.presences.next(ctx, handle), if this.presences.is_running() => {}
                    inbound = socket.next() => {
                        let message = match received(inbound) {
                            Ok(message) => message,
                            Err(end) => break end,
                        };
                        handle.touch();
                        match message {
                            Message::Text(text) => {
                                if this.limiter.check().is_err() {
                                    break End::Gateway(Close::RateLimited);
                                }
                                let message = ClientMessage::parse(handle.endpoint, text.as_str());
                                let pending = Pending {
                                    refreshes: &mut this.refreshes,
                                    presences: &mut this.presences,
                                };
                                on_message(ctx, handle, message, pending, this.owner);
                            }
                            Message::Binary(_) => break End::Gateway(Close::Binary),
                            // Raw frames only come out of a read when configured to.
                            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                            Message::Close(frame) => {
                                // tungstenite's reply to the client's close:
                                // into the queue on a flush, then written.
                                let reply = async {
                                    let _ = socket.flush().await;
                                    handle.drain().await
                                };
                                let _ = Box::pin(tokio::time::timeout(close_timeout, reply)).await;
                                break End::Client(frame.map(|f| u16::from(f.code)));
                            }
                        }
                    }
                }
            };
            // Boxed: a one-off phase, kept out of the loop's state.
            Box::pin(finish(ctx, &this.registered, socket, end)).await;
        }
    }
}

/// What a read from the socket gave: a message, or the end of the
/// connection.
fn received(inbound: Option<Result<Message, tungstenite::Error>>) -> Result<Message, End> {
    match inbound {
        None => Err(End::Lost),
        Some(Err(e)) => Err(read_error_code(e).map_or(End::Lost, End::Gateway)),
        Some(Ok(message)) => Ok(message),
    }
}

/// What a connection answers beside its loop.
struct Pending<'a> {
    refreshes: &'a mut refresh::Refreshes,
    presences: &'a mut presence::Presences,
}

/// Answers a client's message, or hands it to whoever answers it.
fn on_message(
    ctx: &Arc<Context>,
    handle: &ConnHandle,
    message: ClientMessage,
    pending: Pending<'_>,
    owner: refresh::Owner,
) {
    match message {
        // Answered by the sector sync task with `sectors_updated`.
        ClientMessage::RefreshSectors => {
            ctx.sector_sync.send(SectorCommand::Refresh(handle.id));
        }
        // Checked beside the loop, one at a time: one sent meanwhile is
        // refused at once.
        ClientMessage::RefreshToken(token) => pending.refreshes.push(ctx, handle, owner, token),
        // Read beside the loop, one at a time; others wait their turn.
        ClientMessage::Presence(branch) => pending.presences.push(ctx, handle, branch),
        // Only the events this connection received count; no reply.
        ClientMessage::Ack(ids) => {
            let (received, others) = handle.take_receipts(ids);
            if !others.is_empty() {
                ctx.acks.ignored(others.len());
            }
            if !received.is_empty() {
                ctx.acks.acked(handle.tenant_id, received);
            }
        }
        // Replies share the outbound queue: one writer, in order.
        other => {
            let reply = other.fixed_reply().unwrap_or_default();
            handle.push(Outbound::reply(reply));
        }
    }
}

/// Observes the delay from publish (`ts`, Unix ms; 0 when none was
/// written) to the client.
fn observe_written(ctx: &Context, published_ms: i64) {
    if published_ms > 0 {
        ctx.metrics
            .publish_to_client_seconds
            .observe((unix_ms() - published_ms).max(0) as f64 / 1000.0);
    }
}

/// How a connection's loop ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The gateway closes it, for this reason.
    Gateway(Close),
    /// The client sent a close frame (with this code, if any).
    Client(Option<u16>),
    /// The client went away without a close frame, or a write failed.
    Lost,
}

/// The end of a connection: out of the hub (what is still queued is
/// counted as undelivered), the close handshake when the gateway closes it,
/// and the seed's `Connection closed` line with the audit context.
async fn finish(ctx: &Context, registered: &Registered, socket: &mut ClientSocket, end: End) {
    let handle = &registered.handle;
    // The audit context carries the sectors as they are now: a refresh or
    // an assignment change may have changed them since admission.
    if let Some((_, _, Member::Staff { sectors, .. })) = ctx.hub.member(handle.id) {
        record_sector_ids(&tracing::Span::current(), &sectors);
    }
    // Out of the hub before the close handshake, as the seed's disconnect:
    // no more events are aimed at it, and what its queue still holds is
    // never written.
    let unsent = registered.release() as u64;
    ctx.metrics
        .undelivered(Undelivered::ConnectionClosed, unsent);
    if let End::Gateway(why) = end {
        record_close(ctx, why);
        close_socket(socket, Some(handle), why, ctx.settings.close_timeout).await;
    }
    // Events a failed write carried, and one the close found half written
    // and could not finish.
    let failed = (handle.take_lost() + handle.abandon()) as u64;
    ctx.metrics.undelivered(Undelivered::WriteFailed, failed);
    let unsent = unsent + failed;
    match end {
        End::Gateway(why) => tracing::info!(
            by = "gateway",
            code = why.code(),
            reason = why.reason(),
            unsent,
            "Connection closed"
        ),
        End::Client(code) => tracing::info!(by = "client", code, unsent, "Connection closed"),
        End::Lost => tracing::info!(by = "client", unsent, "Connection closed"),
    }
}

/// Records a connection's `sector_ids` in its log span, as `connected`
/// reports them (`[10,11]`; `null` when not filtered or unknown).
fn record_sector_ids(span: &tracing::Span, sectors: &SectorScope) {
    let reported = serde_json::to_string(&sectors.reported()).unwrap_or_default();
    span.record("sector_ids", reported);
}

/// An admitted connection, in the hub.
struct Admitted {
    registered: Registered,
    /// `connected`, when the connection resumes: written by the
    /// connection itself before its replay, not queued.
    deferred_hello: Option<Connected>,
    owner: refresh::Owner,
}

/// Why admission refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Token missing, invalid, expired or revoked.
    Auth,
    /// `ALLOWED_ORIGINS` does not list the origin.
    Origin,
    /// The token's roles may not open the endpoint.
    Forbidden,
    /// `WSGATEWAY_MAX_CONNECTIONS`.
    AtCapacity,
    /// `WSGATEWAY_MAX_CONNECTIONS_PER_USER`.
    UserLimit,
    /// `WSGATEWAY_MAX_CONNECTIONS_PER_SESSION`.
    SessionLimit,
}

impl Refused {
    /// The close the client gets.
    fn close(self) -> Close {
        match self {
            Refused::Auth => Close::Unauthorized,
            Refused::Origin | Refused::Forbidden => Close::Forbidden,
            Refused::AtCapacity => Close::AtCapacity,
            Refused::UserLimit | Refused::SessionLimit => Close::UserLimit,
        }
    }

    /// How it is counted.
    fn rejection(self) -> Rejection {
        match self {
            Refused::Auth => Rejection::Auth,
            Refused::Origin => Rejection::Origin,
            Refused::Forbidden => Rejection::Forbidden,
            Refused::AtCapacity => Rejection::MaxTotal,
            Refused::UserLimit => Rejection::MaxPerUser,
            Refused::SessionLimit => Rejection::MaxPerSession,
        }
    }
}

/// Who a verified token says the connection is, as the hub registers it.
struct Identified {
    tenant_id: TenantId,
    member: Member,
    /// The token's expiry, Unix seconds.
    expires_at: u64,
    jti: Option<Box<str>>,
    connected: Connected,
    owner: refresh::Owner,
}

/// The admission checks, in the order of PROTOCOL.md §2. On success the
/// connection is in the hub and `connected` is first in its queue.
async fn admit(ctx: &Arc<Context>, req: &mut ConnectRequest) -> Result<Admitted, Refused> {
    // The token is not kept past admission (nor is the origin).
    let token = req.token.take();
    let origin = req.origin.take();
    let identified = if req.endpoint == Endpoint::Diner {
        identify_diner(ctx, token.as_deref())?
    } else {
        identify_staff(ctx, req.endpoint, token.as_deref(), origin.as_deref()).await?
    };
    register(ctx, req, identified)
}

/// `connected`'s `heartbeat_interval_s`.
fn heartbeat_s(settings: &Settings) -> u64 {
    settings.heartbeat_interval.as_secs_f64().round() as u64
}

/// A diner, by its table token.
fn identify_diner(ctx: &Context, token: Option<&str>) -> Result<Identified, Refused> {
    let id: DinerIdentity = ctx.verifier.table(token).map_err(auth_refusal)?;
    let span = tracing::Span::current();
    span.record("tenant", id.tenant_id);
    span.record("branches", tracing::field::display(id.branch_id));
    span.record("session", id.session_id);
    let connected = Connected {
        endpoint: Endpoint::Diner.as_str(),
        who: Who::Diner {
            tenant_id: id.tenant_id,
            branch_id: id.branch_id,
            session_id: id.session_id,
            table_id: id.table_id,
        },
        heartbeat_interval_s: heartbeat_s(&ctx.settings),
        recovered: None,
    };
    let member = Member::Diner {
        branch_id: id.branch_id,
        session_id: id.session_id,
        table_id: id.table_id,
    };
    Ok(Identified {
        tenant_id: id.tenant_id,
        member,
        expires_at: id.exp,
        jti: None,
        connected,
        owner: refresh::Owner::Diner {
            tenant_id: id.tenant_id,
            branch_id: id.branch_id,
            session_id: id.session_id,
            table_id: id.table_id,
        },
    })
}

/// A member of staff: origin, token, revocation, roles, then a waiter's
/// sectors.
async fn identify_staff(
    ctx: &Context,
    endpoint: Endpoint,
    token: Option<&str>,
    origin: Option<&str>,
) -> Result<Identified, Refused> {
    let settings = &ctx.settings;
    if let (Some(allowed), Some(origin)) = (&settings.allowed_origins, origin)
        && !allowed.allows(origin.trim_end_matches('/'))
    {
        return Err(Refused::Origin);
    }
    let id: StaffIdentity = ctx.verifier.staff(token).map_err(auth_refusal)?;
    let span = tracing::Span::current();
    span.record("user", id.user_id);
    span.record("tenant", id.tenant_id);
    span.record("branches", tracing::field::debug(&id.branch_ids));
    if token_revoked(ctx, id.tenant_id, id.jti.as_deref(), "token").await {
        tracing::debug!("token revoked");
        return Err(Refused::Auth);
    }
    if !endpoint.allows(id.roles) {
        return Err(Refused::Forbidden);
    }
    let sectors = if endpoint == Endpoint::Waiter && !id.roles.sees_all_sectors() {
        ctx.sectors.scope_for(&id).await
    } else {
        SectorScope::All
    };
    record_sector_ids(&span, &sectors);
    let connected = Connected {
        endpoint: endpoint.as_str(),
        who: Who::Staff {
            user_id: id.user_id,
            tenant_id: id.tenant_id,
            branch_ids: id.branch_ids.clone(),
            sector_ids: sectors.reported(),
        },
        heartbeat_interval_s: heartbeat_s(settings),
        recovered: None,
    };
    let member = Member::Staff {
        user_id: id.user_id,
        branch_ids: id.branch_ids,
        sectors,
    };
    Ok(Identified {
        tenant_id: id.tenant_id,
        member,
        expires_at: id.exp,
        jti: id.jti.map(String::into_boxed_str),
        connected,
        owner: refresh::Owner::Staff {
            tenant_id: id.tenant_id,
            user_id: id.user_id,
        },
    })
}

/// Puts an identified connection in the hub, within the capacity and
/// per-user (per-session) limits.
fn register(
    ctx: &Context,
    req: &ConnectRequest,
    identified: Identified,
) -> Result<Admitted, Refused> {
    let Identified {
        tenant_id,
        member,
        expires_at,
        jti,
        connected,
        owner,
    } = identified;
    // `connected` is queued before registration, so that no event can
    // precede it; a resuming connection writes it itself, before its replay.
    let (greeting, deferred) = if req.last_event_id.is_some() {
        (None, Some(connected))
    } else {
        let text = Reply::Connected(connected).to_text();
        (Some(Outbound::reply(text)), None)
    };
    let registered = ctx
        .hub
        .register(Registration {
            tenant_id,
            endpoint: req.endpoint,
            member,
            expires_at,
            jti,
            queue_capacity: ctx.settings.send_queue_size,
            greeting,
        })
        .map_err(|refusal| match refusal {
            Refusal::AtCapacity => Refused::AtCapacity,
            Refusal::UserLimit => Refused::UserLimit,
            Refusal::SessionLimit => Refused::SessionLimit,
        })?;
    Ok(Admitted {
        registered,
        deferred_hello: deferred,
        owner,
    })
}

/// Whether a token's `jti` is in the revoked set, counted. Fails open: a
/// Redis that gives no answer lets the token pass, logged as
/// `revocation check failed; {token} accepted` (`token`: which one, in
/// words). False without a revoked set or a `jti`.
async fn token_revoked(ctx: &Context, tenant: TenantId, jti: Option<&str>, token: &str) -> bool {
    let (Some(revocations), Some(jti)) = (&ctx.revocations, jti) else {
        return false;
    };
    let checked = |outcome| ctx.metrics.revocation_checked(outcome, 1);
    match revocations.is_revoked(tenant, jti).await {
        Ok(true) => {
            checked(RevocationCheck::Revoked);
            true
        }
        Ok(false) => {
            checked(RevocationCheck::Valid);
            false
        }
        Err(e) => {
            checked(RevocationCheck::Error);
            tracing::warn!(error = %e, "revocation check failed; {token} accepted");
            false
        }
    }
}

fn auth_refusal(e: AuthError) -> Refused {
    tracing::debug!(reason = %e, "token refused");
    Refused::Auth
}

fn rate_limiter(per_second: u32) -> DefaultDirectRateLimiter {
    // One clock for every connection: building a quanta clock calibrates it
    // (CPUID and all), which showed in the connect path's profile.
    static CLOCK: std::sync::OnceLock<governor::clock::DefaultClock> = std::sync::OnceLock::new();
    let clock = CLOCK.get_or_init(Default::default).clone();
    let n = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    // Burst equal to the rate, and full when the connection opens.
    RateLimiter::direct_with_clock(Quota::per_second(n), clock)
}

/// Writes what is queued, waiting for room in the socket, skipping events
/// a resume already replayed; once that catch-up is over, pushes write
/// themselves again. Returns the newest publish time (`ts`) written, or 0.
async fn write_queued(handle: &ConnHandle, catch_up: &mut resume::CatchUp) -> Result<i64, Broken> {
    let written = std::future::poll_fn(|cx| {
        handle.poll_drain(cx, &mut |frame| catch_up.replayed(frame.text().as_str()))
    })
    .await;
    if !catch_up.is_active() {
        handle.unfilter();
    }
    written
}

/// The close code for a failed read, if the client is still there to get one.
fn read_error_code(e: tungstenite::Error) -> Option<Close> {
    match e {
        tungstenite::Error::Capacity(_) => Some(Close::TooBig),
        tungstenite::Error::Utf8(_) => Some(Close::InvalidUtf8),
        // The client went away without a close handshake: nobody to tell.
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => None,
        tungstenite::Error::Protocol(p) => {
            tracing::debug!(error = %p, "protocol error");
            Some(Close::ProtocolError)
        }
        other => {
            tracing::debug!(error = %other, "read failed");
            None
        }
    }
}

fn record_close(ctx: &Context, why: Close) {
    let m = &ctx.metrics;
    let counted = match why {
        Close::RateLimited => return m.rejected(Rejection::RateLimit),
        Close::Shutdown => Disconnect::Shutdown,
        Close::Heartbeat => Disconnect::Heartbeat,
        Close::SlowConsumer => Disconnect::SlowConsumer,
        Close::Binary => Disconnect::Binary,
        Close::TooBig => Disconnect::TooLarge,
        Close::InvalidUtf8 => Disconnect::InvalidUtf8,
        Close::ProtocolError => Disconnect::ProtocolError,
        Close::Unauthorized => Disconnect::TokenInvalid,
        // Admission's refusals, counted as rejections there; never the end
        // of an admitted connection.
        Close::AtCapacity | Close::Forbidden | Close::UserLimit => Disconnect::Internal,
    };
    m.disconnected(counted);
}

/// Sends a close frame and waits, up to `timeout`, for the client's reply,
/// so that the client reads the code before the TCP connection goes. With
/// the connection's `handle` (once live), the frame is queued after what is
/// already there and this waits for it to be written.
async fn close_socket(
    socket: &mut ClientSocket,
    handle: Option<&ConnHandle>,
    why: Close,
    timeout: Duration,
) {
    let frame = CloseFrame {
        code: why.code().into(),
        reason: Utf8Bytes::from_static(why.reason()),
    };
    let handshake = async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        if let Some(handle) = handle
            && handle.drain().await.is_err()
        {
            return;
        }
        // Drain until the client answers the close (or goes away).
        while let Some(Ok(m)) = socket.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, handshake).await;
}

#[cfg(test)]
mod tests;
