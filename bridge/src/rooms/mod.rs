//! Rooms on this node: who of this node's connections is in which room, presence
//! updates coalesced per room, broadcasts, and the node's side of liveness.
//!
//! [`RoomHub`] drives the [`crate::presence`] store (who is in a room, shared by every
//! node) and broker (room events between nodes). A room's events reach this node's
//! members directly and the other nodes' members through the broker; events from
//! other nodes arrive on the broker's receiver and go to this node's members.
//!
//! Presence updates are not written one by one: a room gathers its members' latest
//! states for `coalesce` (a burst becomes one diff ending on the latest state), then
//! writes them to the store and sends one `presence_diff` with all of them.

pub mod policy;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use policy::{RoomAction, RoomPolicy, RoomRule};

use crate::hub::{Outbound, Outbox};
use crate::metrics as m;
use crate::presence::{
    BrokerEvent, Member, PresenceDiff, PresenceError, PresenceStore, RoomBroker, RoomEvent,
};

/// Why a room operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("{0}")]
    Forbidden(String),
    #[error("not in room {0}; join it first")]
    NotJoined(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Invalid(String),
    #[error("presence is unavailable (its store cannot be reached); retry")]
    Unavailable,
}

impl From<PresenceError> for RoomError {
    fn from(e: PresenceError) -> Self {
        match e {
            PresenceError::Invalid { what, reason } => {
                RoomError::Invalid(format!("invalid {what}: {reason}"))
            }
            PresenceError::Unavailable(_) | PresenceError::Backend(_) => {
                m::redis_errors();
                tracing::warn!(error = %e, "presence operation failed");
                RoomError::Unavailable
            }
        }
    }
}

/// One connection as the rooms see it.
#[derive(Clone)]
pub struct Participant {
    /// The connection id (`welcome.session`).
    pub connection: String,
    /// The token's `sub`, else the hello's client id.
    pub user: String,
    pub outbox: Outbox,
    /// The token's claims (None: no token).
    pub claims: Option<Arc<serde_json::Map<String, Value>>>,
}

/// Settings of the rooms.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    pub coalesce: Duration,
    pub policy: RoomPolicy,
}

/// Figures for `/api/v1/sync/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct RoomStats {
    pub backend: &'static str,
    pub healthy: bool,
    pub rooms: usize,
    pub members: usize,
    pub presence_updates: u64,
    pub coalesced_updates: u64,
    pub diffs_sent: u64,
    pub broadcasts: u64,
    pub redis_errors: u64,
}

#[derive(Default)]
struct Counters {
    updates: AtomicU64,
    coalesced: AtomicU64,
    diffs: AtomicU64,
    broadcasts: AtomicU64,
}

/// This node's members of one room.
#[derive(Default)]
struct LocalRoom {
    members: HashMap<String, Participant>,
    /// Latest state per member not yet written (coalescing).
    pending: HashMap<String, Value>,
    /// A flush is scheduled or running.
    flushing: bool,
    /// Members whose queue was full when a presence message was due: they get a
    /// fresh `presence_state` at the next liveness tick.
    stale: Vec<String>,
}

pub struct RoomHub {
    store: Arc<dyn PresenceStore>,
    broker: Arc<dyn RoomBroker>,
    backend: &'static str,
    settings: RoomSettings,
    rooms: Mutex<HashMap<String, LocalRoom>>,
    /// One turn at a time per room for what writes a room's members to the store and
    /// then tells the room (joins, flushes, leaves, members put back): the room hears
    /// of them in the order the store applied them, here and on the other nodes. An
    /// entry lives while someone holds or waits for it.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counters: Counters,
}

/// A room's turn (see [`RoomHub::turns`]); released on drop.
struct RoomTurn<'a> {
    hub: &'a RoomHub,
    room: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for RoomTurn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut turns = self.hub.turns.lock();
        // Clones are made under this lock only: 1 means nobody holds or waits.
        if turns
            .get(&self.room)
            .is_some_and(|t| Arc::strong_count(t) == 1)
        {
            turns.remove(&self.room);
        }
    }
}

impl RoomHub {
    /// Starts the hub's background work (events from other nodes, heartbeats and
    /// sweeps every TTL / 3) until `cancel`.
    pub fn start(
        store: Arc<dyn PresenceStore>,
        broker: Arc<dyn RoomBroker>,
        events: mpsc::Receiver<BrokerEvent>,
        backend: &'static str,
        settings: RoomSettings,
        cancel: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Arc<RoomHub> {
        let hub = Arc::new(RoomHub {
            store,
            broker,
            backend,
            settings,
            rooms: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        tasks.spawn(hub.clone().receive(events, cancel.clone()));
        tasks.spawn(hub.clone().keep_alive(cancel));
        hub
    }

    pub fn healthy(&self) -> bool {
        self.store.healthy() && self.broker.healthy()
    }

    /// Waits for `room`'s turn.
    async fn turn(&self, room: &str) -> RoomTurn<'_> {
        let lock = self
            .turns
            .lock()
            .entry(room.to_string())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        RoomTurn {
            hub: self,
            room: room.to_string(),
            guard: Some(guard),
        }
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Whether the policy lets `who` do `action` in `room`.
    pub fn allows(&self, who: &Participant, room: &str, action: RoomAction) -> bool {
        self.settings
            .policy
            .allows(room, action, who.claims.as_deref())
    }

    /// Joins `room` (or replaces the state of a member that already joined): returns
    /// the `presence_state` message for the joiner; the others get a `presence_diff`.
    pub async fn join(
        self: &Arc<Self>,
        who: &Participant,
        room: &str,
        state: Value,
        id: Option<&Value>,
    ) -> Result<String, RoomError> {
        if !self.allows(who, room, RoomAction::Join) {
            return Err(RoomError::Forbidden(format!(
                "this connection may not join {room}"
            )));
        }
        let rejoin = self.is_member(room, &who.connection);
        if !rejoin {
            // Receive the room's events before joining it, so nothing published by
            // others after our join can be missed.
            self.broker.subscribe(room).await.map_err(|e| {
                self.unsubscribe_in_background(room);
                RoomError::from(e)
            })?;
        }
        let turn = self.turn(room).await;
        let joined = match self
            .store
            .join(room, &who.connection, &who.user, state)
            .await
        {
            Ok(joined) => joined,
            Err(e) => {
                if !rejoin {
                    self.unsubscribe_in_background(room);
                }
                return Err(e.into());
            }
        };
        {
            let mut rooms = self.rooms.lock();
            let local = rooms.entry(room.to_string()).or_default();
            local.members.insert(who.connection.clone(), who.clone());
            // A join's state supersedes a pending update.
            local.pending.remove(&who.connection);
        }
        let mut members = joined.members;
        // Others see a join, or (a rejoin) an update.
        let diff = if rejoin {
            PresenceDiff {
                updates: vec![joined.member.clone()],
                leaves: joined.expired,
                ..Default::default()
            }
        } else {
            PresenceDiff {
                joins: vec![joined.member.clone()],
                leaves: joined.expired,
                ..Default::default()
            }
        };
        self.deliver_diff(room, &diff, &[&who.connection]);
        self.publish(room, RoomEvent::Diff(diff)).await;
        drop(turn);
        members.sort_by_key(|m| m.joined_at);
        Ok(presence_state_json(id, room, &who.connection, &members))
    }

    /// Queues a new state for a member; the room's next flush (within `coalesce`)
    /// writes it and tells everyone.
    pub fn update(
        self: &Arc<Self>,
        who: &Participant,
        room: &str,
        state: Value,
    ) -> Result<(), RoomError> {
        if !self.store.healthy() {
            return Err(RoomError::Unavailable);
        }
        let schedule = {
            let mut rooms = self.rooms.lock();
            let Some(local) = rooms
                .get_mut(room)
                .filter(|r| r.members.contains_key(&who.connection))
            else {
                return Err(RoomError::NotJoined(room.to_string()));
            };
            self.counters.updates.fetch_add(1, Ordering::Relaxed);
            m::presence_updates();
            if local
                .pending
                .insert(who.connection.clone(), state)
                .is_some()
            {
                self.counters.coalesced.fetch_add(1, Ordering::Relaxed);
                m::presence_coalesced();
            }
            !std::mem::replace(&mut local.flushing, true)
        };
        if schedule {
            let hub = self.clone();
            let room = room.to_string();
            // The first update of a quiet room goes out at once; what arrives while
            // that is on its way waits for the next round, `coalesce` later.
            tokio::spawn(async move { hub.flush(&room).await });
        }
        Ok(())
    }

    /// Writes a room's pending states and sends them as one diff; repeats while more
    /// arrived meanwhile (each round after another `coalesce`).
    async fn flush(self: Arc<Self>, room: &str) {
        loop {
            // Rounds start `coalesce` apart, however long a round's writes took.
            let round = tokio::time::Instant::now();
            // Taken before the pending states: a leave (or join) either comes before
            // (and took its member's pending state away) or after the diff is out.
            let turn = self.turn(room).await;
            let pending: Vec<(String, Value)> = {
                let mut rooms = self.rooms.lock();
                let Some(local) = rooms.get_mut(room) else {
                    return;
                };
                if local.pending.is_empty() {
                    local.flushing = false;
                    // Everyone left while this flush ran: `leave` kept the room for it.
                    if local.members.is_empty() {
                        rooms.remove(room);
                    }
                    return;
                }
                local.pending.drain().collect()
            };
            let writes = pending.into_iter().map(|(connection, state)| {
                let store = self.store.clone();
                async move { store.update(room, &connection, state).await }
            });
            let results = futures_util::future::join_all(writes).await;
            let mut updates = Vec::with_capacity(results.len());
            for result in results {
                match result {
                    Ok(Some(member)) => updates.push(member),
                    Ok(None) => {} // left meanwhile
                    Err(e) => {
                        let _ = RoomError::from(e); // counted and logged
                    }
                }
            }
            if !updates.is_empty() {
                let diff = PresenceDiff {
                    updates,
                    ..Default::default()
                };
                self.deliver_diff(room, &diff, &[]);
                self.publish(room, RoomEvent::Diff(diff)).await;
            }
            drop(turn);
            tokio::time::sleep_until(round + self.settings.coalesce).await;
        }
    }

    /// Leaves a room; false when the connection was not in it.
    pub async fn leave(&self, connection: &str, room: &str) -> bool {
        let turn = self.turn(room).await;
        let was_member = {
            let mut rooms = self.rooms.lock();
            match rooms.get_mut(room) {
                Some(local) => {
                    let was = local.members.remove(connection).is_some();
                    local.pending.remove(connection);
                    if local.members.is_empty() && !local.flushing {
                        rooms.remove(room);
                    }
                    was
                }
                None => false,
            }
        };
        if !was_member {
            return false;
        }
        match self.store.leave(room, connection).await {
            Ok(Some(member)) => {
                let diff = PresenceDiff {
                    leaves: vec![member],
                    ..Default::default()
                };
                self.deliver_diff(room, &diff, &[]);
                self.publish(room, RoomEvent::Diff(diff)).await;
            }
            Ok(None) => {}
            // The store keeps it until its TTL runs out (no one heartbeats it now).
            Err(e) => {
                let _ = RoomError::from(e);
            }
        }
        drop(turn);
        if let Err(e) = self.broker.unsubscribe(room).await {
            let _ = RoomError::from(e);
        }
        true
    }

    /// Sends a broadcast to the room's other members on every node (and back to the
    /// sender with `echo`).
    pub async fn broadcast(
        &self,
        who: &Participant,
        room: &str,
        event: String,
        payload: Box<RawValue>,
        echo: bool,
    ) -> Result<(), RoomError> {
        if !self.is_member(room, &who.connection) {
            return Err(RoomError::NotJoined(room.to_string()));
        }
        if !self.allows(who, room, RoomAction::Broadcast) {
            return Err(RoomError::Forbidden(format!(
                "this connection may not broadcast in {room}"
            )));
        }
        if !self.broker.healthy() {
            return Err(RoomError::Unavailable);
        }
        let event = RoomEvent::Broadcast {
            event,
            payload,
            from_connection: who.connection.clone(),
            from_user: who.user.clone(),
        };
        // Other nodes first: if they cannot be reached the sender hears so, and
        // nobody got it.
        self.broker.publish(room, &event).await?;
        self.counters.broadcasts.fetch_add(1, Ordering::Relaxed);
        m::broadcasts();
        let skip: &[&str] = if echo { &[] } else { &[&who.connection] };
        self.deliver(room, Arc::from(event_json(room, &event)), skip);
        Ok(())
    }

    /// Leaves every room a closing connection was in.
    pub async fn disconnect(&self, connection: &str, rooms: impl IntoIterator<Item = String>) {
        for room in rooms {
            self.leave(connection, &room).await;
        }
    }

    /// Removes stale members now (`POST /api/v1/sync/cleanup`); returns how many.
    pub async fn sweep_now(&self) -> Result<usize, RoomError> {
        let swept = self.store.sweep().await?;
        let mut count = 0;
        for s in swept {
            count += s.leaves.len();
            self.publish_leaves(&s.room, s.leaves).await;
        }
        Ok(count)
    }

    pub fn stats(&self) -> RoomStats {
        let (rooms, members) = {
            let rooms = self.rooms.lock();
            (rooms.len(), rooms.values().map(|r| r.members.len()).sum())
        };
        RoomStats {
            backend: self.backend,
            healthy: self.healthy(),
            rooms,
            members,
            presence_updates: self.counters.updates.load(Ordering::Relaxed),
            coalesced_updates: self.counters.coalesced.load(Ordering::Relaxed),
            diffs_sent: self.counters.diffs.load(Ordering::Relaxed),
            broadcasts: self.counters.broadcasts.load(Ordering::Relaxed),
            redis_errors: m::redis_error_count(),
        }
    }

    fn is_member(&self, room: &str, connection: &str) -> bool {
        self.rooms
            .lock()
            .get(room)
            .is_some_and(|r| r.members.contains_key(connection))
    }

    fn unsubscribe_in_background(&self, room: &str) {
        let broker = self.broker.clone();
        let room = room.to_string();
        tokio::spawn(async move {
            let _ = broker.unsubscribe(&room).await;
        });
    }

    async fn publish(&self, room: &str, event: RoomEvent) {
        if let Err(e) = self.broker.publish(room, &event).await {
            let _ = RoomError::from(e);
        }
    }

    async fn publish_leaves(&self, room: &str, leaves: Vec<Member>) {
        if leaves.is_empty() {
            return;
        }
        let diff = PresenceDiff {
            leaves,
            ..Default::default()
        };
        self.deliver_diff(room, &diff, &[]);
        self.publish(room, RoomEvent::Diff(diff)).await;
    }

    fn deliver_diff(&self, room: &str, diff: &PresenceDiff, skip: &[&str]) {
        if diff.is_empty() {
            return;
        }
        self.counters.diffs.fetch_add(1, Ordering::Relaxed);
        m::presence_diffs();
        self.deliver(room, Arc::from(diff_json(room, diff)), skip);
    }

    /// Queues one message (the same bytes) for every local member of `room` but
    /// `skip`. A member whose queue is full misses it and is marked stale: it gets a
    /// fresh `presence_state` at the next liveness tick.
    fn deliver(&self, room: &str, message: Arc<str>, skip: &[&str]) {
        let mut rooms = self.rooms.lock();
        let Some(local) = rooms.get_mut(room) else {
            return;
        };
        let mut stale = Vec::new();
        for (connection, member) in &local.members {
            if skip.contains(&connection.as_str()) {
                continue;
            }
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) =
                member.outbox.try_send(Outbound::Shared(message.clone()))
            {
                stale.push(connection.clone());
            }
        }
        for connection in stale {
            if !local.stale.contains(&connection) {
                local.stale.push(connection);
            }
        }
    }

    /// Events from other nodes, to this node's members.
    async fn receive(
        self: Arc<Self>,
        mut events: mpsc::Receiver<BrokerEvent>,
        cancel: CancellationToken,
    ) {
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
            };
            match event {
                BrokerEvent::Room { room, event, .. } => match &event {
                    RoomEvent::Diff(diff) => self.deliver_diff(&room, diff, &[]),
                    RoomEvent::Broadcast { .. } => {
                        self.deliver(&room, Arc::from(event_json(&room, &event)), &[])
                    }
                },
                BrokerEvent::Reconnected | BrokerEvent::Lagged { .. } => {
                    // Events were lost (and Redis may have lost presence): put our
                    // members back and give every local member the room's state anew.
                    tracing::info!("presence broker reconnected or lagged; re-registering members");
                    match self.store.reregister().await {
                        // Every local member gets the state just below.
                        Ok(back) => self.publish_joins(back, false).await,
                        Err(e) => {
                            let _ = RoomError::from(e);
                        }
                    }
                    let rooms: Vec<String> = self.rooms.lock().keys().cloned().collect();
                    for room in rooms {
                        self.resend_state(&room, None).await;
                    }
                }
            }
        }
    }

    /// Tells a room of this node's members put back; with `resend`, they get the
    /// room's state anew.
    async fn publish_joins(&self, back: Vec<(String, Member)>, resend: bool) {
        let mut by_room: HashMap<String, Vec<Member>> = HashMap::new();
        for (room, member) in back {
            by_room.entry(room).or_default().push(member);
        }
        for (room, mut joins) in by_room {
            let turn = self.turn(&room).await;
            // One that left meanwhile stays gone: its leave was told already.
            joins.retain(|m| self.is_member(&room, &m.connection));
            if joins.is_empty() {
                continue;
            }
            let diff = PresenceDiff {
                joins,
                ..Default::default()
            };
            // The members put back learn it from a fresh `presence_state` (below), not
            // from a diff announcing themselves.
            let back: Vec<String> = diff.joins.iter().map(|m| m.connection.clone()).collect();
            let skip: Vec<&str> = back.iter().map(String::as_str).collect();
            self.deliver_diff(&room, &diff, &skip);
            self.publish(&room, RoomEvent::Diff(diff)).await;
            drop(turn);
            // They may have been told they (and their neighbours) left, by the nodes
            // that reaped this one while it could not heartbeat.
            if resend {
                self.resend_state(&room, Some(&back)).await;
            }
        }
    }

    /// Sends the room's current members to its local members (`only`: to these).
    async fn resend_state(&self, room: &str, only: Option<&[String]>) {
        let Ok(mut members) = self.store.members(room).await else {
            return;
        };
        members.sort_by_key(|m| m.joined_at);
        let targets: Vec<Participant> = {
            let rooms = self.rooms.lock();
            let Some(local) = rooms.get(room) else { return };
            local
                .members
                .values()
                .filter(|p| only.is_none_or(|only| only.contains(&p.connection)))
                .cloned()
                .collect()
        };
        for p in targets {
            let message = presence_state_json(None, room, &p.connection, &members);
            if p.outbox.try_send(Outbound::Text(message)).is_ok() {
                let mut rooms = self.rooms.lock();
                if let Some(local) = rooms.get_mut(room) {
                    local.stale.retain(|c| *c != p.connection);
                }
            }
        }
    }

    /// Heartbeats this node's members and sweeps expired ones (ours and other
    /// nodes'), every TTL / 3.
    async fn keep_alive(self: Arc<Self>, cancel: CancellationToken) {
        let period = (self.store.ttl() / 3).max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let (live, stale): (Vec<String>, Vec<(String, Vec<String>)>) = {
                let rooms = self.rooms.lock();
                let mut live: Vec<String> = rooms
                    .values()
                    .flat_map(|r| r.members.keys().cloned())
                    .collect();
                live.sort();
                live.dedup();
                let stale = rooms
                    .iter()
                    .filter(|(_, r)| !r.stale.is_empty())
                    .map(|(room, r)| (room.clone(), r.stale.clone()))
                    .collect();
                (live, stale)
            };
            match self.store.heartbeat(&live).await {
                Ok(back) => self.publish_joins(back, true).await,
                Err(e) => {
                    let _ = RoomError::from(e);
                }
            }
            match self.store.sweep().await {
                Ok(swept) => {
                    for s in swept {
                        self.publish_leaves(&s.room, s.leaves).await;
                    }
                }
                Err(e) => {
                    let _ = RoomError::from(e);
                }
            }
            for (room, connections) in stale {
                self.resend_state(&room, Some(&connections)).await;
            }
            let stats = self.stats();
            m::presence_gauges(stats.rooms, stats.members);
        }
    }
}

/// `presence_state` for one member of a room.
pub fn presence_state_json(
    id: Option<&Value>,
    room: &str,
    own: &str,
    members: &[Member],
) -> String {
    #[derive(Serialize)]
    struct PresenceState<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        room: &'a str,
        #[serde(rename = "self")]
        own: &'a str,
        members: &'a [Member],
    }
    serde_json::to_string(&PresenceState {
        kind: "presence_state",
        id,
        room,
        own,
        members,
    })
    .unwrap_or_default()
}

fn diff_json(room: &str, diff: &PresenceDiff) -> String {
    #[derive(Serialize)]
    struct Diff<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        joins: &'a [Member],
        leaves: &'a [Member],
        updates: &'a [Member],
    }
    serde_json::to_string(&Diff {
        kind: "presence_diff",
        room,
        joins: &diff.joins,
        leaves: &diff.leaves,
        updates: &diff.updates,
    })
    .unwrap_or_default()
}

fn event_json(room: &str, event: &RoomEvent) -> String {
    #[derive(Serialize)]
    struct From<'a> {
        connection: &'a str,
        user: &'a str,
    }
    #[derive(Serialize)]
    struct Broadcast<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        room: &'a str,
        event: &'a str,
        payload: &'a RawValue,
        from: From<'a>,
    }
    match event {
        RoomEvent::Broadcast {
            event,
            payload,
            from_connection,
            from_user,
        } => serde_json::to_string(&Broadcast {
            kind: "broadcast",
            room,
            event,
            payload,
            from: From {
                connection: from_connection,
                user: from_user,
            },
        })
        .unwrap_or_default(),
        RoomEvent::Diff(diff) => diff_json(room, diff),
    }
}
