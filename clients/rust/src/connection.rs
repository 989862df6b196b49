//! The connection task: connects with exponential backoff and jitter, says hello,
//! rebuilds the session from the client's state (subscriptions with `since` = their
//! last position, pending writes in order, rooms), then routes every message.
//! WebSocket pings are answered by tungstenite as frames are read; a connection
//! silent for two heartbeats is dropped and replaced.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};

use crate::client::{Command, Event, Inner, Shared};
use crate::replica::Applied;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Writes in flight at once: the bridge stops reading a connection with 32 queued,
/// and we must keep reading its replies meanwhile.
const WRITE_WINDOW: usize = 16;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Delay before reconnect attempt `attempt` (0-based): exponential, capped, with
/// full jitter so a fleet of clients does not reconnect in step.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = min
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(max);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
}

enum End {
    Closed,
    /// Lost (or told to go): reconnect after this delay (None: by backoff).
    Reconnect(Option<Duration>, String),
}

pub(crate) async fn run(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut attempt = 0u32;
    loop {
        let (delay, reason) = match session(&shared, &mut commands, &mut attempt).await {
            End::Closed => return,
            End::Reconnect(delay, reason) => (delay, reason),
        };
        shared.lock().welcome = None;
        shared.emit(Event::Disconnected {
            reason: reason.clone(),
        });
        let delay = delay.unwrap_or_else(|| {
            backoff(
                shared.config.backoff_min,
                shared.config.backoff_max,
                attempt,
            )
        });
        attempt = attempt.saturating_add(1);
        debug!(?delay, %reason, "reconnecting");
        // While waiting, only Close matters: the rest is in the state and is resent.
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = commands.recv() => if matches!(c, None | Some(Command::Close)) { return },
            }
        }
    }
}

/// What this connection has sent, so a command racing the resume is not sent twice.
#[derive(Default)]
struct Session {
    started: BTreeSet<String>,
    in_flight: BTreeSet<i64>,
    joined: BTreeSet<String>,
}

async fn session(
    shared: &Shared,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    attempt: &mut u32,
) -> End {
    let config = &shared.config;
    let mut ws = match timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::connect_async(&config.url),
    )
    .await
    {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => return End::Reconnect(None, format!("connect: {e}")),
        Err(_) => return End::Reconnect(None, "connect: timed out".into()),
    };
    let mut hello = json!({"type": "hello", "client_id": config.client_id, "protocol": 1});
    if let Some(token) = &config.token {
        hello["token"] = json!(token);
    }
    if let Err(e) = send(&mut ws, &hello).await {
        return End::Reconnect(None, e);
    }
    let welcome = match timeout(HANDSHAKE_TIMEOUT, read(&mut ws)).await {
        Ok(Some(m)) if m["type"] == "welcome" => m,
        Ok(Some(m)) => {
            shared.emit(Event::Error(m.clone()));
            return End::Reconnect(None, format!("hello refused: {m}"));
        }
        Ok(None) => return End::Reconnect(None, "closed during hello".into()),
        Err(_) => return End::Reconnect(None, "no welcome".into()),
    };
    *attempt = 0;
    let heartbeat =
        Duration::from_millis(welcome["heartbeat_ms"].as_u64().unwrap_or(25_000).max(100));
    shared.lock().welcome = Some(welcome.clone());
    shared.emit(Event::Connected { welcome });

    let mut s = Session::default();
    // Resume: every subscription, pending writes in order, every room.
    let (subs, rooms) = {
        let inner = shared.lock();
        (
            inner.subs.keys().cloned().collect::<Vec<_>>(),
            inner.rooms.keys().cloned().collect::<Vec<_>>(),
        )
    };
    let mut out = Vec::new();
    for id in subs {
        start(shared, &mut s, &id, &mut out);
    }
    fill_writes(shared, &mut s, &mut out);
    for room in rooms {
        join(shared, &mut s, &room, &mut out);
    }
    if let Err(e) = send_all(&mut ws, out).await {
        return End::Reconnect(None, e);
    }

    let mut last_read = Instant::now();
    let mut tick = tokio::time::interval(heartbeat / 2);
    loop {
        let mut out = Vec::new();
        tokio::select! {
            frame = ws.next() => {
                last_read = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(m) = serde_json::from_str::<Value>(&text) else {
                            warn!("not JSON from the bridge: {text}");
                            continue;
                        };
                        if let Some(end) = handle(shared, &mut s, m, &mut out) {
                            let _ = ws.close(None).await;
                            return end;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return End::Reconnect(None, format!("closed by the bridge: {frame:?}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Reconnect(None, format!("read: {e}")),
                    None => return End::Reconnect(None, "connection ended".into()),
                }
            }
            c = commands.recv() => match c {
                None | Some(Command::Close) => {
                    let _ = ws.close(None).await;
                    return End::Closed;
                }
                Some(Command::Start(id)) => start(shared, &mut s, &id, &mut out),
                Some(Command::Stop(id)) => {
                    if s.started.remove(&id) {
                        out.push(json!({"type": "unsubscribe", "id": id}));
                    }
                }
                Some(Command::Write) => fill_writes(shared, &mut s, &mut out),
                Some(Command::Join(room)) => {
                    s.joined.remove(&room);
                    join(shared, &mut s, &room, &mut out);
                }
                Some(Command::Send(m)) => out.push(m),
            },
            _ = tick.tick() => {
                if last_read.elapsed() > heartbeat * 2 {
                    return End::Reconnect(None, "heartbeat timeout".into());
                }
                // Our own ping: keeps the bridge's idle check satisfied and proves the path.
                out.push(json!({"type": "ping"}));
            }
        }
        if let Err(e) = send_all(&mut ws, out).await {
            return End::Reconnect(None, e);
        }
    }
}

/// Starts subscription `id`: a replica without a position loads a snapshot first.
fn start(shared: &Shared, s: &mut Session, id: &str, out: &mut Vec<Value>) {
    let inner = shared.lock();
    let Some(sub) = inner.subs.get(id) else {
        return;
    };
    if !s.started.insert(id.to_string()) {
        return;
    }
    let loaded = sub.replica.as_ref().map(|t| t.is_loaded());
    if loaded == Some(false) {
        let mut m = json!({"type": "snapshot", "id": snap_id(id), "channel": sub.channel});
        if let Some(f) = &sub.filter {
            m["filter"] = f.clone();
        }
        out.push(m);
    } else {
        out.push(subscribe_message(
            id,
            sub.channel.clone(),
            sub.filter.clone(),
            sub.position,
        ));
    }
}

fn subscribe_message(
    id: &str,
    channel: String,
    filter: Option<Value>,
    since: Option<i64>,
) -> Value {
    let mut m = json!({"type": "subscribe", "id": id, "channel": channel});
    if let Some(f) = filter {
        m["filter"] = f;
    }
    if let Some(p) = since {
        m["since"] = json!(p);
    }
    m
}

fn snap_id(sub: &str) -> String {
    format!("snap:{sub}")
}

fn write_id(mutation_id: i64) -> String {
    format!("m:{mutation_id}")
}

/// Sends pending writes not in flight on this connection, oldest first, up to the window.
fn fill_writes(shared: &Shared, s: &mut Session, out: &mut Vec<Value>) {
    let inner = shared.lock();
    for m in inner.queue.pending() {
        if s.in_flight.len() >= WRITE_WINDOW {
            break;
        }
        if !s.in_flight.insert(m.mutation_id) {
            continue;
        }
        let mut msg = serde_json::to_value(m).expect("a mutation serialises");
        msg["type"] = json!("write");
        msg["id"] = json!(write_id(m.mutation_id));
        out.push(msg);
    }
}

fn join(shared: &Shared, s: &mut Session, room: &str, out: &mut Vec<Value>) {
    let inner = shared.lock();
    let Some(r) = inner.rooms.get(room) else {
        return;
    };
    if s.joined.insert(room.to_string()) {
        out.push(json!({"type": "join", "room": room, "state": r.state}));
    }
}

/// Routes one message; Some when the connection should end.
fn handle(shared: &Shared, s: &mut Session, m: Value, out: &mut Vec<Value>) -> Option<End> {
    let kind = m["type"].as_str().unwrap_or_default();
    match kind {
        "changes" => on_changes(shared, m, out),
        "snapshot_page" => {
            let sub_id = m["id"].as_str().and_then(|i| i.strip_prefix("snap:"))?;
            let mut inner = shared.lock();
            let sub = inner.subs.get_mut(sub_id)?;
            let table = sub.replica.as_mut()?;
            if table.load_page(&m) {
                sub.position = table.position();
                let position = sub.position.unwrap_or_default();
                out.push(subscribe_message(
                    sub_id,
                    sub.channel.clone(),
                    sub.filter.clone(),
                    sub.position,
                ));
                shared.emit(Event::Loaded {
                    sub: sub_id.to_string(),
                    position,
                });
            }
        }
        "write_result" => {
            if let Some(mid) = m["id"]
                .as_str()
                .and_then(|i| i.strip_prefix("m:"))
                .and_then(|n| n.parse().ok())
            {
                settle(shared, s, mid, m);
                fill_writes(shared, s, out);
            }
        }
        "presence_state" | "presence_diff" => {
            let room = m["room"].as_str().unwrap_or_default().to_string();
            let mut inner = shared.lock();
            let r = inner.rooms.get_mut(&room)?;
            if kind == "presence_state" {
                r.apply_state(&m);
            } else {
                r.apply_diff(&m);
            }
            let members = r.members.values().cloned().collect();
            shared.emit(Event::Presence { room, members });
        }
        "subscribed" => {
            // A stream started "from now" resumes from here if the connection drops
            // before its first change, so nothing in between is missed.
            let id = m["id"].as_str()?;
            let mut inner = shared.lock();
            let sub = inner.subs.get_mut(id)?;
            if sub.position.is_none() {
                sub.position = m["position"].as_i64();
            }
        }
        "broadcast" => shared.emit(Event::Broadcast(m)),
        "reconnect" => {
            let after = m["retry_after_ms"].as_u64().unwrap_or(1000);
            return Some(End::Reconnect(
                Some(Duration::from_millis(after)),
                "the bridge asked us to reconnect".into(),
            ));
        }
        "error" => return on_error(shared, s, m, out),
        _ => {}
    }
    None
}

fn on_changes(shared: &Shared, m: Value, out: &mut Vec<Value>) {
    let Some(sub_id) = m["sub"].as_str().map(str::to_string) else {
        return;
    };
    let Some(position) = m["position"].as_i64() else {
        return;
    };
    let mut inner = shared.lock();
    let Some(sub) = inner.subs.get_mut(&sub_id) else {
        return;
    };
    // A transaction in parts is applied whole, once its last part is here.
    let Some(changes) = sub.parts.push(&m) else {
        return;
    };
    let mut reload = false;
    if let Some(table) = sub.replica.as_mut() {
        reload = table.apply_transaction(&changes, position) == Applied::ReloadRequired;
    }
    sub.position = Some(position);
    if reload {
        // The table's shape changed: load it again, then resume from that snapshot.
        reload_replica(&mut inner, &sub_id, out);
    }
    shared.emit(Event::Changes {
        sub: sub_id,
        position,
        changes,
    });
}

fn reload_replica(inner: &mut Inner, sub_id: &str, out: &mut Vec<Value>) {
    let Some(sub) = inner.subs.get_mut(sub_id) else {
        return;
    };
    let Some(table) = sub.replica.as_mut() else {
        return;
    };
    table.reset();
    sub.position = None;
    sub.parts.clear();
    out.push(json!({"type": "unsubscribe", "id": sub_id}));
    let mut m = json!({"type": "snapshot", "id": snap_id(sub_id), "channel": sub.channel});
    if let Some(f) = &sub.filter {
        m["filter"] = f.clone();
    }
    out.push(m);
}

fn settle(shared: &Shared, s: &mut Session, mutation_id: i64, result: Value) {
    s.in_flight.remove(&mutation_id);
    let mut inner = shared.lock();
    let mutation = match inner.queue.complete(mutation_id) {
        Ok(Some(m)) => m,
        Ok(None) => return, // a duplicate result (a replay raced a resend)
        Err(e) => {
            // Not recorded as done: it stays pending and is replayed (idempotently).
            warn!("queue: {e}");
            return;
        }
    };
    let Inner { subs, overlay, .. } = &mut *inner;
    let mut outcome = None;
    for sub in subs.values_mut().filter(|sub| sub.table == mutation.table) {
        outcome = Some(overlay.settle(&mutation, &result, sub.replica.as_mut()));
    }
    let outcome = outcome.unwrap_or_else(|| overlay.settle(&mutation, &result, None));
    // The event first: whoever wakes from `flush` finds it already sent.
    shared.emit(Event::WriteSettled {
        mutation,
        result,
        outcome,
    });
    shared.pending.send_replace(inner.queue.len());
}

fn on_error(shared: &Shared, s: &mut Session, m: Value, out: &mut Vec<Value>) -> Option<End> {
    let code = m["code"].as_str().unwrap_or_default().to_string();
    let id = m["id"].as_str().map(str::to_string);
    if code == "unauthorized" {
        shared.emit(Event::Error(m));
        return Some(End::Reconnect(None, "unauthorized".into()));
    }
    let Some(id) = id else {
        shared.emit(Event::Error(m));
        return None;
    };
    if let Some(mid) = id.strip_prefix("m:").and_then(|n| n.parse::<i64>().ok()) {
        // `internal` is not retried: it is not known to be transient, and retrying
        // it forever would hold the queue.
        if matches!(code.as_str(), "unavailable" | "rate_limited") {
            // Retryable: it stays queued; the next connection replays it.
            s.in_flight.remove(&mid);
            shared.emit(Event::Error(m));
            return Some(End::Reconnect(None, format!("write {mid}: {code}")));
        }
        // The bridge will never apply it: settle it as rejected (rolls back).
        let result = json!({"status": "rejected", "reason": "error", "error": m});
        settle(shared, s, mid, result);
        fill_writes(shared, s, out);
        return None;
    }
    let sub_id = id.strip_prefix("snap:").unwrap_or(&id).to_string();
    let mut inner = shared.lock();
    let is_replica = inner.subs.get(&sub_id).map(|sub| sub.replica.is_some());
    match (code.as_str(), is_replica) {
        ("resync_required", Some(true)) => {
            s.started.insert(sub_id.clone());
            reload_replica(&mut inner, &sub_id, out);
            // The reload's unsubscribe is for a subscription already ended.
            out.retain(|o| !(o["type"] == "unsubscribe" && o["id"] == sub_id));
        }
        ("resync_required", Some(false)) => {
            inner.subs.remove(&sub_id);
            s.started.remove(&sub_id);
            shared.emit(Event::ResyncRequired {
                sub: sub_id,
                message: m["message"].as_str().unwrap_or_default().into(),
            });
        }
        (_, Some(_)) if matches!(code.as_str(), "unavailable" | "rate_limited") => {
            drop(inner);
            return Some(End::Reconnect(None, format!("{id}: {code}")));
        }
        _ => shared.emit(Event::Error(m)),
    }
    None
}

async fn send(ws: &mut Ws, m: &Value) -> Result<(), String> {
    ws.send(Message::Text(m.to_string().into()))
        .await
        .map_err(|e| format!("send: {e}"))
}

async fn send_all(ws: &mut Ws, out: Vec<Value>) -> Result<(), String> {
    for m in out {
        ws.feed(Message::Text(m.to_string().into()))
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    ws.flush().await.map_err(|e| format!("send: {e}"))
}

/// The next JSON text message; None when the connection ended.
async fn read(ws: &mut Ws) -> Option<Value> {
    while let Some(frame) = ws.next().await {
        match frame.ok()? {
            Message::Text(t) => return serde_json::from_str(&t).ok(),
            Message::Close(_) => return None,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        for attempt in 0..30 {
            let d = backoff(min, max, attempt);
            let ceiling = (min * 2u32.pow(attempt.min(20))).min(max);
            assert!(d <= ceiling && d >= ceiling / 2, "{attempt}: {d:?}");
        }
    }
}
