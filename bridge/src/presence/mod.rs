//! Presence (who is in a room, with what state and color) and ephemeral room events
//! (presence diffs, broadcasts) shared between bridge nodes.
//!
//! Two traits, each with an in-memory implementation for a bridge running alone
//! ([`memory`]) and a Redis one for several bridges behind any load balancer
//! ([`redis`]); [`connect`] picks Redis when a URL is configured:
//!
//! - [`PresenceStore`]: the members of each room. A store is one node's view: it is
//!   built with the node's name, and every member it joins belongs to that node.
//!   Members carry a deadline (the store's TTL, 30 s by default) that
//!   [`PresenceStore::heartbeat`] pushes back for the connections the caller still
//!   hears from; [`PresenceStore::sweep`] removes members past their deadline and every
//!   member of nodes that stopped heartbeating, and hands them back so the caller
//!   publishes them as leaves.
//! - [`RoomBroker`]: carries [`RoomEvent`]s to the *other* nodes with members in a
//!   room. A node delivers its own events to its own connections itself; the broker
//!   never echoes a node's events back to it.
//!
//! Expected driving (the session layer's job): `join`/`update`/`leave` per client
//! message, publishing the resulting diff to local members and through the broker;
//! `subscribe` the room on the broker while the node has members there;
//! `heartbeat` and `sweep` every [`PresenceStore::ttl`]` / 3`; on
//! [`BrokerEvent::Reconnected`] or [`BrokerEvent::Lagged`], `reregister` and re-read
//! `members` of the node's rooms, sending clients the fresh state.

mod lua;
pub mod memory;
pub mod palette;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

/// How long a member stays without a heartbeat, unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How long a user's color in a room is remembered after they leave it.
pub const DEFAULT_COLOR_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// One connection's presence in one room.
///
/// This is also the wire shape (`presence_state`, `presence_diff`, pub/sub between
/// nodes). `node` is included: node names are not secret (clients see theirs in
/// `welcome`), and a client can tell two tabs on different nodes apart with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Globally unique connection id (`<node>-<n>`, see `ws::session`).
    pub connection: String,
    /// The user (token subject). Two tabs of one user are two connections of one user.
    pub user: String,
    /// The bridge node holding the connection.
    pub node: String,
    /// What the client last said about itself (cursor, selection, status).
    pub state: Value,
    /// `#rrggbb`, stable per user per room (see [`palette`]).
    pub color: String,
    /// Milliseconds since the Unix epoch.
    pub joined_at: i64,
    /// When the member was last joined, updated or heartbeated (ms since the epoch).
    pub last_seen: i64,
}

/// Changes to a room's members, published as one message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceDiff {
    pub joins: Vec<Member>,
    pub leaves: Vec<Member>,
    pub updates: Vec<Member>,
}

impl PresenceDiff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty() && self.updates.is_empty()
    }
}

/// An ephemeral event for a room's members, carried between nodes by a [`RoomBroker`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomEvent {
    Diff(PresenceDiff),
    /// A client's broadcast; `payload` stays raw JSON so a node forwards it without
    /// parsing it (cursor moves arrive at high rates).
    Broadcast {
        event: String,
        payload: Box<RawValue>,
        from_connection: String,
        from_user: String,
    },
}

/// What a node's broker receiver yields.
#[derive(Debug)]
pub enum BrokerEvent {
    /// An event published by another node.
    Room {
        room: String,
        /// The node that published it.
        origin: String,
        event: RoomEvent,
    },
    /// The broker's connection was re-established after a loss: events published
    /// meanwhile are gone, and Redis may have lost presence. Reregister this node's
    /// members and re-send its rooms' state to its clients.
    Reconnected,
    /// The receiver was not drained fast enough and `missed` events were dropped:
    /// re-send the state of this node's rooms to its clients.
    Lagged { missed: u64 },
}

/// The result of [`PresenceStore::join`].
#[derive(Debug, Clone)]
pub struct Joined {
    /// The joining member, with its color.
    pub member: Member,
    /// The room's members now, the joining one included.
    pub members: Vec<Member>,
    /// Members found expired and removed on the way; publish them as leaves.
    pub expired: Vec<Member>,
}

/// Members removed by [`PresenceStore::sweep`] from one room.
#[derive(Debug, Clone)]
pub struct Swept {
    pub room: String,
    pub leaves: Vec<Member>,
}

/// Cheap counts for stats: the members this node holds (a Redis store does not count
/// other nodes' members; that would mean scanning Redis).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PresenceStats {
    pub rooms: usize,
    pub members: usize,
}

/// Why a presence operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// Redis cannot be reached or did not answer in time. The caller answers the
    /// client "unavailable, retry"; the node re-registers its members by itself once
    /// Redis is back.
    #[error("presence is unavailable: {0}")]
    Unavailable(String),
    /// A name the store cannot use (empty room, connection or node).
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// Redis answered with an error that retrying will not fix (a bug or a foreign
    /// key in our namespace).
    #[error("presence store error: {0}")]
    Backend(String),
}

/// The members of each room; see the [module docs](self).
#[async_trait::async_trait]
pub trait PresenceStore: Send + Sync {
    /// The node this store joins members for.
    fn node(&self) -> &str;

    /// How long a member lives without a heartbeat.
    fn ttl(&self) -> Duration;

    /// Adds `connection` (of `user`) to `room` with `state`, choosing its color. Joining
    /// again with the same connection replaces its state and keeps its color and
    /// `joined_at` (a connection belongs to one user: another user's join with the
    /// same connection id replaces the old member).
    async fn join(
        &self,
        room: &str,
        connection: &str,
        user: &str,
        state: Value,
    ) -> Result<Joined, PresenceError>;

    /// Replaces the state of a member of this node; `None` if it is not a member.
    async fn update(
        &self,
        room: &str,
        connection: &str,
        state: Value,
    ) -> Result<Option<Member>, PresenceError>;

    /// Removes a member; `None` if it was not one.
    async fn leave(&self, room: &str, connection: &str) -> Result<Option<Member>, PresenceError>;

    /// The room's members, oldest first; never expired ones.
    async fn members(&self, room: &str) -> Result<Vec<Member>, PresenceError>;

    /// Marks this node alive and pushes back the deadline of this node's members whose
    /// connection is in `live` (connection ids); members of other connections are left
    /// to expire. Members of live connections that the store finds missing (Redis lost
    /// them, or other nodes reaped this node while it could not heartbeat) are put back
    /// with their color and `joined_at`, and returned: publish them as joins.
    async fn heartbeat(&self, live: &[String]) -> Result<Vec<(String, Member)>, PresenceError>;

    /// Removes members past their deadline and every member of nodes whose heartbeat
    /// expired; returns them per room, to be published as leaves.
    async fn sweep(&self) -> Result<Vec<Swept>, PresenceError>;

    /// Puts back every member this node holds that the store lost (after Redis came
    /// back empty, say), keeping colors and `joined_at`; returns those put back, to be
    /// published as joins.
    async fn reregister(&self) -> Result<Vec<(String, Member)>, PresenceError>;

    /// False while the backend is unreachable (for readiness).
    fn healthy(&self) -> bool;

    fn stats(&self) -> PresenceStats;
}

/// Carries [`RoomEvent`]s between nodes; see the [module docs](self). Received
/// events arrive on the receiver handed out when the broker is built.
#[async_trait::async_trait]
pub trait RoomBroker: Send + Sync {
    /// Sends `event` to the other nodes subscribed to `room`.
    async fn publish(&self, room: &str, event: &RoomEvent) -> Result<(), PresenceError>;

    /// Starts receiving `room`'s events. Counted: each `subscribe` is matched by one
    /// `unsubscribe`, and the room is received while the count is positive. The count
    /// is taken even when this returns `Unavailable`; the subscription is then made
    /// as soon as the broker reconnects.
    async fn subscribe(&self, room: &str) -> Result<(), PresenceError>;

    /// Undoes one `subscribe`.
    async fn unsubscribe(&self, room: &str) -> Result<(), PresenceError>;

    /// False while the broker is disconnected (for readiness).
    fn healthy(&self) -> bool;
}

/// Settings shared by both implementations.
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    /// This node's name (member `node`, heartbeat key). Must be unique among live
    /// nodes: the bridge's default (host name and pid) is.
    pub node: String,
    pub ttl: Duration,
    pub color_memory: Duration,
    /// Redis commands (and connection attempts) taking longer fail as `Unavailable`.
    pub command_timeout: Duration,
    /// Received events waiting for the caller; past this they are dropped and the
    /// receiver gets [`BrokerEvent::Lagged`].
    pub event_capacity: usize,
}

impl PresenceSettings {
    pub fn new(node: impl Into<String>) -> Self {
        PresenceSettings {
            node: node.into(),
            ttl: DEFAULT_TTL,
            color_memory: DEFAULT_COLOR_MEMORY,
            command_timeout: Duration::from_secs(1),
            event_capacity: 65_536,
        }
    }
}

/// A node's presence: the store, the broker and the broker's events.
pub struct Presence {
    pub store: Arc<dyn PresenceStore>,
    pub broker: Arc<dyn RoomBroker>,
    pub events: mpsc::Receiver<BrokerEvent>,
}

/// Redis presence when `redis_url` is set, in-memory presence otherwise. Fails only
/// on a malformed URL: an unreachable Redis is `Unavailable` until it answers.
pub async fn connect(
    redis_url: Option<&str>,
    settings: PresenceSettings,
) -> Result<Presence, PresenceError> {
    match redis_url {
        Some(url) => {
            let (store, broker, events) = redis::connect(url, settings).await?;
            Ok(Presence {
                store: Arc::new(store),
                broker: Arc::new(broker),
                events,
            })
        }
        None => {
            let store = memory::MemoryPresence::new(&settings);
            let (broker, events) = memory::MemoryBroker::new(&settings);
            Ok(Presence {
                store: Arc::new(store),
                broker: Arc::new(broker),
                events,
            })
        }
    }
}

/// Rejects names that would break key hashing (`{}` tags) or mean nothing.
pub(crate) fn check_name(what: &'static str, name: &str) -> Result<(), PresenceError> {
    if name.is_empty() {
        return Err(PresenceError::Invalid {
            what,
            reason: "must not be empty".into(),
        });
    }
    // Keys are `...{<name>}...`: a name starting with `}` makes the hash tag empty, so
    // Redis Cluster hashes each of a room's keys apart and every script fails
    // (CROSSSLOT). Any other `{`/`}` keeps one tag for all of a room's keys.
    if name.starts_with('}') {
        return Err(PresenceError::Invalid {
            what,
            reason: "must not start with '}'".into(),
        });
    }
    if name.len() > 1024 {
        return Err(PresenceError::Invalid {
            what,
            reason: "longer than 1024 bytes".into(),
        });
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_events_round_trip_with_raw_payloads() {
        let event = RoomEvent::Broadcast {
            event: "cursor".into(),
            payload: RawValue::from_string(r#"{"x": 1.50, "big": 12345678901234567890}"#.into())
                .unwrap(),
            from_connection: "n-1".into(),
            from_user: "ada".into(),
        };
        let text = serde_json::to_string(&event).unwrap();
        let back: RoomEvent = serde_json::from_str(&text).unwrap();
        let RoomEvent::Broadcast { payload, .. } = back else {
            panic!("not a broadcast: {text}")
        };
        // Untouched: not re-formatted, no precision lost.
        assert_eq!(payload.get(), r#"{"x": 1.50, "big": 12345678901234567890}"#);
    }
}
