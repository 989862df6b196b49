//! One WebSocket connection: a reader loop that handles the client's messages in
//! order, and a writer task that drains the connection's bounded queue, writing
//! several queued frames per flush. When either ends, the other is stopped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc;

use super::channel;
use super::protocol::{
    BroadcastRequest, ClientMessage, ErrorCode, ErrorMessage, Hello, JoinRequest, PresenceUpdate,
    ServerMessage, SnapshotRequest, Subscribe, WriteBatchRequest, WriteRequest, PROTOCOL_VERSION,
};
use super::registry::Admission;
use crate::auth::{AuthError, Identity};
use crate::hub::{Outbound, Outbox, OutboxReceiver, RowFilter, SubKey, SubscribeRequest};
use crate::metrics as m;
use crate::pg::catalog::{self, StreamAccess, TableInfo};
use crate::pg::{snapshot, writer, PgError};
use crate::rooms::{Participant, RoomError};
use crate::state::AppState;

/// Close codes (besides the standard ones).
pub mod close {
    /// Authentication failed.
    pub const UNAUTHORIZED: u16 = 4001;
    /// Too many connections from this address.
    pub const RATE_LIMITED: u16 = 4029;
    /// No pong within two heartbeats.
    pub const HEARTBEAT: u16 = 4008;
    /// Unsupported protocol version.
    pub const PROTOCOL: u16 = 4002;
    /// The server is restarting: reconnect (RFC 6455 1012).
    pub const RESTART: u16 = 1012;
}

/// Largest frame the WebSocket layer reads at all (or four times the configured
/// limit, if larger); frames between the configured limit and this get `too_large`
/// and the connection stays, larger ones close it (1009).
const HARD_FRAME_LIMIT: usize = 4 << 20;

/// Frames written per flush at most.
const WRITE_BATCH: usize = 64;

/// `GET /ws`.
pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let admission = state
        .connections
        .admit(peer.ip(), state.config.limits.connections_per_ip);
    let hard_limit = HARD_FRAME_LIMIT.max(state.config.limits.max_frame_bytes.saturating_mul(4));
    ws.max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        // Small buffers: an idle connection should cost little memory.
        .read_buffer_size(4096)
        // Frames queue up to this much before a write: several messages per syscall
        // when a connection is busy; an idle one never grows it.
        .write_buffer_size(32 << 10)
        .on_upgrade(move |socket| async move {
            match admission {
                Some(admission) => run(socket, state, admission).await,
                None => refuse(socket).await,
            }
        })
}

async fn refuse(mut socket: WebSocket) {
    m::error_sent("rate_limited");
    let error = ErrorMessage::new(
        None,
        ErrorCode::RateLimited,
        "too many connections from this address",
    );
    let _ = socket.send(Message::Text(error.to_json().into())).await;
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: close::RATE_LIMITED,
            reason: "too many connections".into(),
        })))
        .await;
}

async fn run(socket: WebSocket, state: AppState, admission: Admission) {
    let (sink, mut stream) = socket.split();
    let (outbox, receiver) = Outbox::new(admission.id, state.config.limits.queue_capacity);
    state.connections.register_outbox(outbox.clone());
    // What the writer is doing, for the heartbeat: a client that reads what we write
    // (even if it sends nothing, not even pongs) is alive.
    let progress = Arc::new(WriterProgress::default());
    let mut writer = tokio::spawn(write_loop(sink, receiver, progress.clone()));
    let mut session = Session {
        state: state.clone(),
        outbox,
        id: format!("{}-{}", state.config.node_name, admission.id),
        hello: None,
        subs: HashMap::new(),
        bucket: TokenBucket::new(state.config.limits.messages_per_second),
        tasks: tokio_util::task::TaskTracker::new(),
        writes: None,
        snapshots: Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_PER_CONNECTION)),
        stalled: false,
        rooms: Default::default(),
        broadcasts: TokenBucket::new(state.config.presence.broadcasts_per_second),
    };
    let heartbeat = state.config.heartbeat;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let mut writer_done = false;
    let shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break };
                last_heard = Instant::now();
                progress.pings_unanswered.store(0, std::sync::atomic::Ordering::Relaxed);
                // Boxed: inline, the whole `on_frame` state machine (~5 KB) would sit
                // in every idle connection's task.
                if !Box::pin(session.on_frame(frame)).await || session.stalled {
                    break;
                }
            }
            _ = ticker.tick() => {
                if session.hello.as_ref().is_some_and(|h| h.identity.expired()) {
                    session.queue(Outbound::Text(
                        ErrorMessage::new(None, ErrorCode::Unauthorized, "the token expired; reconnect with a fresh one").to_json(),
                    ));
                    session.queue(Outbound::Close { code: close::UNAUTHORIZED, reason: "token expired".into() });
                    break;
                }
                if last_heard.elapsed() > heartbeat * 2 && progress.client_gone(heartbeat * 2) {
                    tracing::debug!(session = %session.id, "no answer to heartbeats; closing");
                    session.queue(Outbound::Close { code: close::HEARTBEAT, reason: "heartbeat timeout".into() });
                    break;
                }
                // Never lost to a full queue: the writer sends it before its next batch.
                if session.outbox.try_send(Outbound::Ping).is_err() {
                    progress.ping_due.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            _ = shutdown.cancelled() => {
                let reconnect = ServerMessage::Reconnect { reason: "server shutting down", retry_after_ms: 1000 };
                let _ = session.outbox.send(Outbound::Text(reconnect.to_json())).await;
                let _ = session.outbox.send(Outbound::Close { code: close::RESTART, reason: "server restarting".into() }).await;
                break;
            }
            _ = &mut writer => {
                writer_done = true;
                break;
            }
        }
    }
    for (_, key) in session.subs.drain() {
        state.hub.unsubscribe(key);
    }
    // The others see this connection leave its rooms now, not at its TTL.
    state
        .rooms
        .disconnect(&session.id, session.rooms.drain())
        .await;
    session.tasks.close();
    let drain = state.config.heartbeat.min(Duration::from_secs(5));
    // Let queued messages (a close, a reconnect) go out, but never wait on a client
    // that does not read.
    let Session { outbox, .. } = session;
    drop(outbox);
    if !writer_done && tokio::time::timeout(drain, &mut writer).await.is_err() {
        writer.abort();
    }
    drop(admission);
}

/// Writes queued messages, several per flush, until the queue closes or a write fails.
/// What a connection's writer is doing, as the heartbeat needs to know it.
#[derive(Default)]
struct WriterProgress {
    /// Waiting for something to write (not held up by the client).
    idle: std::sync::atomic::AtomicBool,
    /// Since when the writer has had frames to get out without finishing a flush.
    busy_since: parking_lot::Mutex<Option<Instant>>,
    /// Pings written since the client was last heard from.
    pings_unanswered: std::sync::atomic::AtomicU32,
    /// A ping the queue had no room for: written before the next batch.
    ping_due: std::sync::atomic::AtomicBool,
}

impl WriterProgress {
    /// Whether the client stopped taking part: the writer could not get frames out
    /// for `patience`, or two pings went out without an answer.
    fn client_gone(&self, patience: Duration) -> bool {
        let stuck = self
            .busy_since
            .lock()
            .is_some_and(|since| since.elapsed() > patience);
        stuck
            || self
                .pings_unanswered
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 2
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut receiver: OutboxReceiver,
    progress: Arc<WriterProgress>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        progress.idle.store(true, Relaxed);
        *progress.busy_since.lock() = None;
        let Some(first) = receiver.recv().await else {
            break;
        };
        progress.idle.store(false, Relaxed);
        *progress.busy_since.lock() = Some(Instant::now());
        let mut pings = 0;
        if progress.ping_due.swap(false, Relaxed) {
            if sink.feed(Message::Ping(Default::default())).await.is_err() {
                return;
            }
            pings += 1;
        }
        let mut next = Some(first);
        let mut written = 0;
        while let Some(outbound) = next.take() {
            match outbound {
                Outbound::Close { code, reason } => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })))
                        .await;
                    return;
                }
                Outbound::Text(text) => {
                    if sink.feed(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Outbound::Shared(text) => {
                    if sink.feed(Message::Text((&*text).into())).await.is_err() {
                        return;
                    }
                }
                Outbound::Ping => {
                    if sink.feed(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                    pings += 1;
                }
                Outbound::Changes { prefix, body } => {
                    for part in &body.parts {
                        let mut text = String::with_capacity(prefix.len() + part.len());
                        text.push_str(&prefix);
                        text.push_str(part);
                        if sink
                            .feed(Message::Text(Utf8Bytes::from(text)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            written += 1;
            if written < WRITE_BATCH {
                next = receiver.try_recv().ok();
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
        progress.pings_unanswered.fetch_add(pings, Relaxed);
    }
    let _ = sink.close().await;
}

struct HelloState {
    client_id: String,
    identity: Identity,
    /// This connection as rooms see it.
    participant: Participant,
}

struct Session {
    state: AppState,
    outbox: Outbox,
    id: String,
    hello: Option<HelloState>,
    /// Subscription id (as JSON text) → hub key.
    subs: HashMap<String, SubKey>,
    bucket: TokenBucket,
    /// Snapshots and the write worker.
    tasks: tokio_util::task::TaskTracker,
    /// Writes go to one worker per connection, in order, so the reader loop keeps
    /// reading (pongs, pings) while a write waits on a lock.
    writes: Option<mpsc::Sender<WriteJob>>,
    /// Snapshots this connection may run at once.
    snapshots: Arc<tokio::sync::Semaphore>,
    /// The client stopped reading: a reply could not be queued within two heartbeats.
    stalled: bool,
    /// Rooms joined.
    rooms: std::collections::HashSet<String>,
    /// Broadcasts allowed per second.
    broadcasts: TokenBucket,
}

/// A write waiting for the connection's write worker.
enum WriteJob {
    One(WriteRequest),
    Batch(WriteBatchRequest),
}

/// Writes queued per connection before the reader waits for the worker.
const WRITES_IN_FLIGHT: usize = 32;
/// Snapshots per connection at once.
const SNAPSHOTS_PER_CONNECTION: usize = 2;

impl Session {
    /// Queues a control message without waiting (heartbeats).
    fn queue(&self, message: Outbound) {
        let _ = self.outbox.try_send(message);
    }

    /// Sends a message, waiting for room in the queue, but not past two heartbeats:
    /// a client that reads nothing for that long is closed.
    async fn send(&mut self, text: String) {
        if !send_within(&self.outbox, text, self.state.config.heartbeat * 2).await {
            self.stalled = true;
        }
    }

    async fn error(&mut self, error: ErrorMessage) {
        m::error_sent(error.code.as_str());
        self.send(error.to_json()).await;
    }

    /// Handles one frame; false ends the connection.
    async fn on_frame(&mut self, frame: Message) -> bool {
        if matches!(frame, Message::Text(_) | Message::Binary(_)) && !self.bucket.take() {
            self.error(ErrorMessage::new(
                None,
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second; this one was dropped",
                    self.state.config.limits.messages_per_second
                ),
            ))
            .await;
            return true;
        }
        let text = match frame {
            Message::Text(text) => text,
            Message::Binary(_) => {
                self.error(ErrorMessage::new(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text",
                ))
                .await;
                return true;
            }
            Message::Close(_) => return false,
            Message::Ping(_) | Message::Pong(_) => return true,
        };
        if text.len() > self.state.config.limits.max_frame_bytes {
            self.error(ErrorMessage::new(
                None,
                ErrorCode::TooLarge,
                format!(
                    "frame of {} bytes; the limit is {}",
                    text.len(),
                    self.state.config.limits.max_frame_bytes
                ),
            ))
            .await;
            return true;
        }
        let message = match ClientMessage::parse(text.as_str()) {
            Ok(message) => message,
            Err((id, reason)) => {
                self.error(ErrorMessage::new(id, ErrorCode::BadRequest, reason))
                    .await;
                return true;
            }
        };
        match message {
            ClientMessage::Hello(hello) => return self.on_hello(hello).await,
            ClientMessage::Ping(ping) => {
                self.send(
                    ServerMessage::Pong {
                        id: ping.id.as_ref(),
                    }
                    .to_json(),
                )
                .await;
                return true;
            }
            _ if self.hello.as_ref().is_some_and(|h| h.identity.expired()) => {
                self.error(ErrorMessage::new(
                    None,
                    ErrorCode::Unauthorized,
                    "the token expired; reconnect with a fresh one",
                ))
                .await;
                self.queue(Outbound::Close {
                    code: close::UNAUTHORIZED,
                    reason: "token expired".into(),
                });
                return false;
            }
            _ if self.hello.is_none() => {
                self.error(ErrorMessage::new(
                    None,
                    ErrorCode::Unauthorized,
                    "send hello first",
                ))
                .await;
                return true;
            }
            ClientMessage::Subscribe(subscribe) => self.on_subscribe(subscribe).await,
            ClientMessage::Unsubscribe(unsubscribe) => {
                let id_json = unsubscribe.id.to_string();
                match self.subs.remove(&id_json) {
                    Some(key) => {
                        let patience = self.state.config.heartbeat * 2;
                        if tokio::time::timeout(patience, self.state.hub.unsubscribe_and_wait(key))
                            .await
                            .is_err()
                        {
                            // Its catch-up waits on a client that does not read.
                            self.stalled = true;
                            return true;
                        }
                        self.send(
                            ServerMessage::Unsubscribed {
                                id: &unsubscribe.id,
                            }
                            .to_json(),
                        )
                        .await;
                    }
                    None => {
                        self.error(ErrorMessage::new(
                            Some(unsubscribe.id),
                            ErrorCode::NotFound,
                            "no such subscription",
                        ))
                        .await
                    }
                }
            }
            ClientMessage::Snapshot(request) => self.on_snapshot(request).await,
            ClientMessage::Write(request) => self.queue_write(WriteJob::One(request)).await,
            ClientMessage::WriteBatch(request) => self.queue_write(WriteJob::Batch(request)).await,
            ClientMessage::Join(request) => {
                let id = request.id.clone();
                if let Err(error) = self.join(request).await {
                    self.error(error.with_id(id)).await;
                }
            }
            ClientMessage::Presence(update) => {
                let id = update.id.clone();
                if let Err(error) = self.presence(update) {
                    self.error(error.with_id(id)).await;
                }
            }
            ClientMessage::Leave(request) => {
                let left = self.rooms.remove(&request.room)
                    && self.state.rooms.leave(&self.id, &request.room).await;
                if left {
                    self.send(
                        ServerMessage::Left {
                            id: request.id.as_ref(),
                            room: &request.room,
                        }
                        .to_json(),
                    )
                    .await;
                } else {
                    let error = room_error(RoomError::NotJoined(request.room));
                    self.error(error.with_id(request.id)).await;
                }
            }
            ClientMessage::Broadcast(request) => {
                let id = request.id.clone();
                if let Err(error) = self.broadcast(request).await {
                    self.error(error.with_id(id)).await;
                }
            }
        }
        true
    }

    /// Whether this connection's role may stream (and see who looks at) a table:
    /// SELECT on it, and no row-level security applying to the role.
    async fn check_stream_access(&self, id: &Value, table: &TableInfo) -> Result<(), ErrorMessage> {
        let bad = |code, message: String| ErrorMessage::new(Some(id.clone()), code, message);
        let db = |e: PgError| ErrorMessage::from_db(Some(id.clone()), &e);
        let client = self.state.pool.get().await.map_err(|e| db(e.into()))?;
        match catalog::stream_access(&client, table.relation, self.identity().role.as_deref())
            .await
            .map_err(db)?
        {
            StreamAccess::Allowed => {}
            StreamAccess::NoSelect => {
                return Err(bad(ErrorCode::Forbidden, format!("permission denied: the role may not SELECT from {}", table.name.display())))
            }
            StreamAccess::NoRole => {
                return Err(bad(
                    ErrorCode::Forbidden,
                    "the role this connection runs as does not exist, or the bridge may not act as it".into(),
                ))
            }
            StreamAccess::RowSecurity => {
                return Err(bad(
                    ErrorCode::Forbidden,
                    format!(
                        "{} has row-level security: live changes stream only to roles that bypass it (per-row streaming is not available yet)",
                        table.name.display()
                    ),
                ))
            }
        }
        Ok(())
    }

    fn participant(&self) -> &Participant {
        &self
            .hello
            .as_ref()
            .expect("messages other than hello are handled after hello")
            .participant
    }

    /// Checks a presence state or broadcast payload against the size limit.
    fn check_size(&self, what: &str, value: &Value) -> Result<(), ErrorMessage> {
        let limit = self.state.config.presence.max_state_bytes;
        // Counted, not built: this runs on every cursor update.
        let mut counter = ByteCounter(0);
        let _ = serde_json::to_writer(&mut counter, value);
        let size = counter.0;
        if size > limit {
            return Err(ErrorMessage::new(
                None,
                ErrorCode::TooLarge,
                format!("{what} of {size} bytes; the limit is {limit}"),
            ));
        }
        Ok(())
    }

    async fn join(&mut self, request: JoinRequest) -> Result<(), ErrorMessage> {
        let state = request
            .state
            .unwrap_or_else(|| Value::Object(Default::default()));
        self.check_size("state", &state)?;
        let rejoin = self.rooms.contains(&request.room);
        if !rejoin && self.rooms.len() >= self.state.config.presence.max_rooms {
            return Err(ErrorMessage::new(
                None,
                ErrorCode::TooLarge,
                format!(
                    "at most {} rooms per connection",
                    self.state.config.presence.max_rooms
                ),
            ));
        }
        if !rejoin && request.room.starts_with("table:") {
            // A table's room tells who is looking at the table: only for those who
            // may read it.
            let id = request.id.clone().unwrap_or(Value::Null);
            let no_id = |mut e: ErrorMessage| {
                e.id = request.id.clone();
                e
            };
            let table = self.table(&id, &request.room).await.map_err(no_id)?;
            self.check_stream_access(&id, &table).await.map_err(no_id)?;
        }
        let participant = self.participant().clone();
        let message = self
            .state
            .rooms
            .join(&participant, &request.room, state, request.id.as_ref())
            .await
            .map_err(room_error)?;
        self.rooms.insert(request.room);
        self.send(message).await;
        Ok(())
    }

    fn presence(&mut self, update: PresenceUpdate) -> Result<(), ErrorMessage> {
        self.check_size("state", &update.state)?;
        if !self.rooms.contains(&update.room) {
            return Err(room_error(RoomError::NotJoined(update.room)));
        }
        let participant = self.participant().clone();
        self.state
            .rooms
            .update(&participant, &update.room, update.state)
            .map_err(room_error)
    }

    async fn broadcast(&mut self, request: BroadcastRequest) -> Result<(), ErrorMessage> {
        self.check_size("payload", &request.payload)?;
        if !self.rooms.contains(&request.room) {
            return Err(room_error(RoomError::NotJoined(request.room)));
        }
        if !self.broadcasts.take() {
            return Err(ErrorMessage::new(
                None,
                ErrorCode::RateLimited,
                format!(
                    "more than {} broadcasts per second; this one was not sent",
                    self.state.config.presence.broadcasts_per_second
                ),
            ));
        }
        let payload = serde_json::value::to_raw_value(&request.payload)
            .map_err(|e| ErrorMessage::new(None, ErrorCode::BadRequest, format!("payload: {e}")))?;
        let participant = self.participant().clone();
        self.state
            .rooms
            .broadcast(
                &participant,
                &request.room,
                request.event,
                payload,
                request.echo,
            )
            .await
            .map_err(room_error)
    }

    async fn on_hello(&mut self, hello: Hello) -> bool {
        if self.hello.is_some() {
            self.error(ErrorMessage::new(
                None,
                ErrorCode::BadRequest,
                "hello was already sent",
            ))
            .await;
            return true;
        }
        if hello.protocol != PROTOCOL_VERSION {
            self.error(ErrorMessage::new(
                None,
                ErrorCode::BadRequest,
                format!(
                    "protocol {} is not supported; this server speaks {PROTOCOL_VERSION}",
                    hello.protocol
                ),
            ))
            .await;
            self.queue(Outbound::Close {
                code: close::PROTOCOL,
                reason: "unsupported protocol".into(),
            });
            return false;
        }
        if hello.client_id.is_empty() || hello.client_id.len() > 256 {
            self.error(ErrorMessage::new(
                None,
                ErrorCode::BadRequest,
                "client_id must be 1 to 256 bytes",
            ))
            .await;
            return true;
        }
        match self
            .state
            .auth
            .identify(hello.token.as_deref(), &hello.client_id)
        {
            Ok(identity) => {
                let client_id = identity.scoped_client_id(&hello.client_id);
                if client_id.len() > 256 {
                    self.error(ErrorMessage::new(
                        None,
                        ErrorCode::BadRequest,
                        "client_id and the token's sub together must stay within 256 bytes",
                    ))
                    .await;
                    return true;
                }
                let welcome = ServerMessage::Welcome {
                    session: &self.id,
                    node: &self.state.config.node_name,
                    client_id: &client_id,
                    position: self.state.hub.head().unwrap_or(0),
                    heartbeat_ms: self.state.config.heartbeat.as_millis() as u64,
                    protocol: PROTOCOL_VERSION,
                };
                self.send(welcome.to_json()).await;
                let claims = identity.subject.as_ref().and_then(|_| {
                    serde_json::from_str::<serde_json::Map<String, Value>>(&identity.claims_json)
                        .ok()
                        .map(Arc::new)
                });
                let participant = Participant {
                    connection: self.id.clone(),
                    user: identity.actor.clone(),
                    outbox: self.outbox.clone(),
                    claims,
                };
                self.hello = Some(HelloState {
                    client_id,
                    identity,
                    participant,
                });
                true
            }
            Err(e) => {
                let message = match e {
                    AuthError::Key(_) => "the server's key configuration is invalid".to_string(),
                    e => e.to_string(),
                };
                self.error(ErrorMessage::new(None, ErrorCode::Unauthorized, message))
                    .await;
                self.queue(Outbound::Close {
                    code: close::UNAUTHORIZED,
                    reason: "unauthorized".into(),
                });
                false
            }
        }
    }

    fn identity(&self) -> &Identity {
        &self
            .hello
            .as_ref()
            .expect("checked before dispatch")
            .identity
    }

    /// Resolves a channel to a tracked table, or the error to send.
    async fn table(&self, id: &Value, channel_name: &str) -> Result<TableInfo, ErrorMessage> {
        let name = channel::parse(channel_name).map_err(|e| {
            ErrorMessage::new(Some(id.clone()), ErrorCode::BadRequest, e.to_string())
        })?;
        let db = |e: PgError| ErrorMessage::from_db(Some(id.clone()), &e);
        let client = self.state.pool.get().await.map_err(|e| db(e.into()))?;
        let table = catalog::table(&client, &name)
            .await
            .map_err(db)?
            .ok_or_else(|| {
                ErrorMessage::new(
                    Some(id.clone()),
                    ErrorCode::NotFound,
                    format!("no table {}", name.display()),
                )
            })?;
        if !table.tracked {
            return Err(ErrorMessage::new(
                Some(id.clone()),
                ErrorCode::NotFound,
                format!("table {} is not tracked (livesync.track)", name.display()),
            ));
        }
        Ok(table)
    }

    fn filter(
        &self,
        id: &Value,
        table: &TableInfo,
        spec: Option<crate::hub::FilterSpec>,
    ) -> Result<Option<RowFilter>, ErrorMessage> {
        spec.map(|spec| {
            RowFilter::new(
                spec,
                &table.key_columns,
                &table.filter_columns,
                &table.columns,
            )
        })
        .transpose()
        .map_err(|e| ErrorMessage::new(Some(id.clone()), ErrorCode::BadRequest, e.to_string()))
    }

    async fn on_subscribe(&mut self, request: Subscribe) {
        let id = request.id.clone();
        if let Err(error) = self.subscribe(request).await {
            let _ = id;
            self.error(error).await;
        }
    }

    async fn subscribe(&mut self, request: Subscribe) -> Result<(), ErrorMessage> {
        let id = request.id;
        let bad = |code, message: String| ErrorMessage::new(Some(id.clone()), code, message);
        let id_json = id.to_string();
        if let Some(key) = self.subs.get(&id_json) {
            if self.state.hub.is_subscribed(*key) {
                return Err(bad(
                    ErrorCode::BadRequest,
                    format!("subscription {id_json} exists; unsubscribe first or use another id"),
                ));
            }
            // The hub ended it (resync_required): the id is free again.
            self.subs.remove(&id_json);
        }
        let hub = self.state.hub.clone();
        self.subs.retain(|_, key| hub.is_subscribed(*key));
        if self.subs.len() >= self.state.config.limits.max_subscriptions {
            return Err(bad(
                ErrorCode::TooLarge,
                format!(
                    "at most {} subscriptions per connection",
                    self.state.config.limits.max_subscriptions
                ),
            ));
        }
        if request.since.is_some_and(|s| s < 0) {
            return Err(bad(
                ErrorCode::BadRequest,
                "since must not be negative".into(),
            ));
        }
        let table = self.table(&id, &request.channel).await?;
        let filter = self.filter(&id, &table, request.filter)?;
        // Registered before its access is checked: from here on the reader's
        // per-page check covers this (table, role), so a REVOKE committed after the
        // check below is caught before any later change reaches it.
        let (key, after) = self
            .state
            .hub
            .subscribe(SubscribeRequest {
                outbox: self.outbox.clone(),
                relation: table.relation,
                channel: format!("table:{}", table.name.display()),
                filter,
                sub_id_json: id_json.clone(),
                since: request.since,
                role: self.identity().role.clone(),
            })
            .map_err(|e| bad(ErrorCode::Unavailable, e.to_string()))?;
        if let Err(error) = self.check_subscription(&id, &table, request.since).await {
            self.state.hub.unsubscribe(key);
            return Err(error);
        }
        self.subs.insert(id_json, key);
        let channel = format!("table:{}", table.name.display());
        self.send(
            ServerMessage::Subscribed {
                id: &id,
                channel: &channel,
                position: after,
            }
            .to_json(),
        )
        .await;
        self.state.hub.start(key, after);
        Ok(())
    }

    /// Whether a subscription may start: the role may stream the table, and `since`
    /// is inside the retained log (said now, not after `subscribed`).
    async fn check_subscription(
        &self,
        id: &Value,
        table: &TableInfo,
        since: Option<i64>,
    ) -> Result<(), ErrorMessage> {
        self.check_stream_access(id, table).await?;
        let Some(since) = since else { return Ok(()) };
        let db = |e: PgError| ErrorMessage::from_db(Some(id.clone()), &e);
        let client = self.state.pool.get().await.map_err(|e| db(e.into()))?;
        let statement = client
            .prepare_cached("SELECT 1 FROM livesync.change_runs($1, 1) LIMIT 1")
            .await
            .map_err(|e| db(e.into()))?;
        client
            .query(&statement, &[&since])
            .await
            .map_err(|e| db(e.into()))?;
        Ok(())
    }

    async fn on_snapshot(&mut self, request: SnapshotRequest) {
        let id = request.id.clone();
        let table = match self.table(&id, &request.channel).await {
            Ok(table) => table,
            Err(error) => return self.error(error).await,
        };
        let filter = match self.filter(&id, &table, request.filter) {
            Ok(filter) => filter,
            Err(error) => return self.error(error).await,
        };
        let Ok(slot) = self.snapshots.clone().try_acquire_owned() else {
            return self
                .error(ErrorMessage::new(
                    Some(id),
                    ErrorCode::RateLimited,
                    format!("at most {SNAPSHOTS_PER_CONNECTION} snapshots at once per connection"),
                ))
                .await;
        };
        let state = self.state.clone();
        let identity = self.identity().clone();
        let outbox = self.outbox.clone();
        // In its own task: a big table must not hold up this connection's heartbeat
        // or its other requests.
        self.tasks.spawn(async move {
            let _slot = slot;
            // Snapshots share the pool with writes and catch-up: at most half of it.
            let Ok(_permit) = state.snapshot_permits.clone().acquire_owned().await else {
                return;
            };
            let patience = state.config.heartbeat * 2;
            let (pages_tx, mut pages_rx) = mpsc::channel(1);
            let id_json = id.to_string();
            let channel = serde_json::to_string(&format!("table:{}", table.name.display())).expect("a string serialises");
            // Owns the receiver: when the client is gone and this ends, the reader's
            // next page finds no receiver and the snapshot's transaction ends.
            let forward_outbox = outbox.clone();
            let forward = async move {
                let outbox = forward_outbox;
                let mut page_number = 0;
                while let Some(page) = pages_rx.recv().await {
                    let page: snapshot::SnapshotPage = page;
                    page_number += 1;
                    let mut text = format!(
                        "{{\"type\":\"snapshot_page\",\"id\":{id_json},\"channel\":{channel},\"position\":{},\"page\":{page_number},\"last\":{},\"rows\":[",
                        page.position, page.last
                    );
                    for (i, row) in page.rows.iter().enumerate() {
                        if i > 0 {
                            text.push(',');
                        }
                        text.push_str(row);
                    }
                    text.push_str("]}");
                    // A client that stops reading must not hold a database
                    // connection (and its open transaction) for ever.
                    if !send_within(&outbox, text, patience).await {
                        return;
                    }
                }
            };
            let read = snapshot::read(
                &state.pool,
                &identity,
                &table,
                filter.as_ref(),
                state.config.limits.snapshot_page_rows,
                pages_tx,
            );
            let (result, ()) = tokio::join!(read, forward);
            if let Err(e) = result {
                let error = ErrorMessage::from_db(Some(id), &e);
                m::error_sent(error.code.as_str());
                send_within(&outbox, error.to_json(), patience).await;
            }
        });
    }

    /// Hands a write to the connection's write worker (started on first use).
    async fn queue_write(&mut self, job: WriteJob) {
        let hello = self.hello.as_ref().expect("checked before dispatch");
        let writes = self.writes.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(WRITES_IN_FLIGHT);
            self.tasks.spawn(write_worker(
                rx,
                self.state.clone(),
                hello.identity.clone(),
                hello.client_id.clone(),
                self.outbox.clone(),
            ));
            tx
        });
        // A client pipelining writes faster than the database applies them waits
        // here (its frames are not read meanwhile: TCP pushes back); one whose
        // replies are not read for two heartbeats is closed.
        let patience = self.state.config.heartbeat * 2;
        if !matches!(
            tokio::time::timeout(patience, writes.send(job)).await,
            Ok(Ok(()))
        ) {
            self.stalled = true;
        }
    }
}

/// Queues `text`, waiting at most `patience` for room; false if the client did not
/// make room (or is gone).
async fn send_within(outbox: &Outbox, text: String, patience: Duration) -> bool {
    matches!(
        tokio::time::timeout(patience, outbox.send(Outbound::Text(text))).await,
        Ok(Ok(()))
    )
}

/// Applies a connection's writes one after another, in the order they were sent.
async fn write_worker(
    mut jobs: mpsc::Receiver<WriteJob>,
    state: AppState,
    identity: Identity,
    client_id: String,
    outbox: Outbox,
) {
    let patience = state.config.heartbeat * 2;
    while let Some(job) = jobs.recv().await {
        let reply = match job {
            WriteJob::One(request) => {
                match writer::write(&state.pool, &identity, &client_id, &request.mutation).await {
                    Ok(result) => {
                        m::write_outcome(result.status());
                        result.message(&request.id)
                    }
                    Err(e) => {
                        m::write_outcome("error");
                        let error = ErrorMessage::from_db(Some(request.id), &e);
                        m::error_sent(error.code.as_str());
                        error.to_json()
                    }
                }
            }
            WriteJob::Batch(request) => {
                match writer::write_batch(
                    &state.pool,
                    &identity,
                    &client_id,
                    &request.mutations,
                    request.all_or_nothing,
                )
                .await
                {
                    Ok(results) => {
                        for status in results.statuses() {
                            m::write_outcome(status);
                        }
                        results.message(&request.id)
                    }
                    Err(e) => {
                        m::write_outcome("error");
                        let error = ErrorMessage::from_db(Some(request.id), &e);
                        m::error_sent(error.code.as_str());
                        error.to_json()
                    }
                }
            }
        };
        if !send_within(&outbox, reply, patience).await {
            return;
        }
    }
}

/// Messages per second per connection.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(per_second: u32) -> Self {
        TokenBucket {
            rate: per_second as f64,
            tokens: per_second as f64,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The client's error for a refused room operation.
fn room_error(error: RoomError) -> ErrorMessage {
    let code = match &error {
        RoomError::Forbidden(_) => ErrorCode::Forbidden,
        RoomError::NotJoined(_) | RoomError::Invalid(_) => ErrorCode::BadRequest,
        RoomError::TooLarge(_) => ErrorCode::TooLarge,
        RoomError::Unavailable => ErrorCode::Unavailable,
    };
    ErrorMessage::new(None, code, error.to_string())
}

/// Counts the bytes a serialiser writes, without keeping them.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
