//! In-memory presence and broker, for a bridge running without Redis.
//!
//! Same behaviour as the Redis implementation (colors, deadlines, node liveness),
//! kept in one process. [`MemoryPresence::peer`] and [`MemoryBroker::peer`] give other
//! "nodes" sharing the same state, which lets tests drive several nodes in one
//! process; a real bridge has one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    check_name, now_ms, palette, BrokerEvent, Joined, Member, PresenceError, PresenceSettings,
    PresenceStats, PresenceStore, RoomBroker, RoomEvent, Swept,
};

/// Presence held in this process.
#[derive(Clone)]
pub struct MemoryPresence {
    node: String,
    ttl: Duration,
    color_memory: Duration,
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    rooms: HashMap<String, Room>,
    /// Node → heartbeat deadline (ms since the epoch).
    nodes: HashMap<String, i64>,
}

#[derive(Default)]
struct Room {
    members: HashMap<String, Entry>,
    /// User → (color, when last used), kept after they leave.
    colors: HashMap<String, (String, i64)>,
}

struct Entry {
    member: Member,
    deadline: i64,
}

impl Room {
    fn held(&self, color: &str) -> bool {
        self.members.values().any(|e| e.member.color == color)
    }

    fn remove_where(&mut self, dead: impl Fn(&Entry) -> bool) -> Vec<Member> {
        let gone: Vec<String> = self
            .members
            .iter()
            .filter(|(_, e)| dead(e))
            .map(|(c, _)| c.clone())
            .collect();
        let mut out: Vec<Member> = gone
            .iter()
            .filter_map(|c| self.members.remove(c))
            .map(|e| e.member)
            .collect();
        out.sort_by(|a, b| (a.joined_at, &a.connection).cmp(&(b.joined_at, &b.connection)));
        out
    }

    fn sorted_members(&self) -> Vec<Member> {
        let mut out: Vec<Member> = self.members.values().map(|e| e.member.clone()).collect();
        out.sort_by(|a, b| (a.joined_at, &a.connection).cmp(&(b.joined_at, &b.connection)));
        out
    }
}

impl MemoryPresence {
    pub fn new(settings: &PresenceSettings) -> Self {
        MemoryPresence {
            node: settings.node.clone(),
            ttl: settings.ttl,
            color_memory: settings.color_memory,
            shared: Arc::default(),
        }
    }

    /// Another node's view of the same presence.
    pub fn peer(&self, node: impl Into<String>) -> Self {
        MemoryPresence {
            node: node.into(),
            ..self.clone()
        }
    }

    fn ttl_ms(&self) -> i64 {
        self.ttl.as_millis() as i64
    }
}

#[async_trait::async_trait]
impl PresenceStore for MemoryPresence {
    fn node(&self) -> &str {
        &self.node
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn join(
        &self,
        room: &str,
        connection: &str,
        user: &str,
        state: Value,
    ) -> Result<Joined, PresenceError> {
        check_name("room", room)?;
        check_name("connection", connection)?;
        check_name("user", user)?;
        let now = now_ms();
        let deadline = now + self.ttl_ms();
        let mut shared = self.shared.lock();
        shared
            .nodes
            .entry(self.node.clone())
            .and_modify(|d| *d = (*d).max(deadline))
            .or_insert(deadline);
        let r = shared.rooms.entry(room.to_string()).or_default();
        let mut expired = r.remove_where(|e| e.deadline < now);
        // A connection id belongs to one user: another user's join replaces the member.
        if r.members
            .get(connection)
            .is_some_and(|e| e.member.user != user)
        {
            expired.extend(r.members.remove(connection).map(|e| e.member));
        }
        if let Some(e) = r.members.get_mut(connection) {
            e.member.state = state;
            e.member.last_seen = now;
            e.deadline = deadline;
            let member = e.member.clone();
            return Ok(Joined {
                member,
                members: r.sorted_members(),
                expired,
            });
        }
        let forget_before = now - self.color_memory.as_millis() as i64;
        let present: HashSet<String> = r.members.values().map(|e| e.member.user.clone()).collect();
        r.colors
            .retain(|u, (_, at)| *at >= forget_before || present.contains(u));
        let color = match r.members.values().find(|e| e.member.user == user) {
            Some(tab) => tab.member.color.clone(),
            None => {
                let remembered = r.colors.get(user).map(|(c, _)| c.as_str());
                palette::choose(user, remembered, |c| r.held(c))
            }
        };
        r.colors.insert(user.to_string(), (color.clone(), now));
        let member = Member {
            connection: connection.to_string(),
            user: user.to_string(),
            node: self.node.clone(),
            state,
            color,
            joined_at: now,
            last_seen: now,
        };
        r.members.insert(
            connection.to_string(),
            Entry {
                member: member.clone(),
                deadline,
            },
        );
        Ok(Joined {
            member,
            members: r.sorted_members(),
            expired,
        })
    }

    async fn update(
        &self,
        room: &str,
        connection: &str,
        state: Value,
    ) -> Result<Option<Member>, PresenceError> {
        let now = now_ms();
        let mut shared = self.shared.lock();
        let entry = shared
            .rooms
            .get_mut(room)
            .and_then(|r| r.members.get_mut(connection));
        Ok(entry.map(|e| {
            e.member.state = state;
            e.member.last_seen = now;
            e.deadline = now + self.ttl_ms();
            e.member.clone()
        }))
    }

    async fn leave(&self, room: &str, connection: &str) -> Result<Option<Member>, PresenceError> {
        let mut shared = self.shared.lock();
        Ok(shared
            .rooms
            .get_mut(room)
            .and_then(|r| r.members.remove(connection))
            .map(|e| e.member))
    }

    async fn members(&self, room: &str) -> Result<Vec<Member>, PresenceError> {
        let now = now_ms();
        let shared = self.shared.lock();
        let Some(r) = shared.rooms.get(room) else {
            return Ok(Vec::new());
        };
        let mut out: Vec<Member> = r
            .members
            .values()
            .filter(|e| e.deadline >= now)
            .map(|e| e.member.clone())
            .collect();
        out.sort_by(|a, b| (a.joined_at, &a.connection).cmp(&(b.joined_at, &b.connection)));
        Ok(out)
    }

    async fn heartbeat(&self, live: &[String]) -> Result<Vec<(String, Member)>, PresenceError> {
        let now = now_ms();
        let deadline = now + self.ttl_ms();
        let live: HashSet<&str> = live.iter().map(String::as_str).collect();
        let mut shared = self.shared.lock();
        shared.nodes.insert(self.node.clone(), deadline);
        for r in shared.rooms.values_mut() {
            for e in r.members.values_mut() {
                if e.member.node == self.node && live.contains(e.member.connection.as_str()) {
                    e.deadline = deadline;
                    e.member.last_seen = now;
                }
            }
        }
        // Nothing is ever lost here, so nothing to put back.
        Ok(Vec::new())
    }

    async fn sweep(&self) -> Result<Vec<Swept>, PresenceError> {
        let now = now_ms();
        let forget_before = now - self.color_memory.as_millis() as i64;
        let mut shared = self.shared.lock();
        let dead: HashSet<String> = shared
            .nodes
            .iter()
            .filter(|(n, d)| **d < now && **n != self.node)
            .map(|(n, _)| n.clone())
            .collect();
        shared.nodes.retain(|n, _| !dead.contains(n));
        let mut out = Vec::new();
        shared.rooms.retain(|room, r| {
            let leaves = r.remove_where(|e| e.deadline < now || dead.contains(&e.member.node));
            if !leaves.is_empty() {
                out.push(Swept {
                    room: room.clone(),
                    leaves,
                });
            }
            r.colors.retain(|_, (_, at)| *at >= forget_before);
            !r.members.is_empty() || !r.colors.is_empty()
        });
        out.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(out)
    }

    async fn reregister(&self) -> Result<Vec<(String, Member)>, PresenceError> {
        Ok(Vec::new())
    }

    fn healthy(&self) -> bool {
        true
    }

    fn stats(&self) -> PresenceStats {
        let shared = self.shared.lock();
        let mut stats = PresenceStats::default();
        for r in shared.rooms.values() {
            let mine = r
                .members
                .values()
                .filter(|e| e.member.node == self.node)
                .count();
            if mine > 0 {
                stats.rooms += 1;
                stats.members += mine;
            }
        }
        stats
    }
}

/// Room events between the "nodes" of one process (none, for a lone bridge: it
/// delivers its own events itself, so publishing reaches nobody).
pub struct MemoryBroker {
    node: String,
    capacity: usize,
    bus: Arc<Mutex<HashMap<String, Inbox>>>,
}

struct Inbox {
    tx: mpsc::Sender<BrokerEvent>,
    rooms: HashMap<String, usize>,
    missed: u64,
}

impl MemoryBroker {
    pub fn new(settings: &PresenceSettings) -> (Self, mpsc::Receiver<BrokerEvent>) {
        Self::on_bus(
            settings.node.clone(),
            settings.event_capacity,
            Arc::default(),
        )
    }

    /// Another node on the same in-process bus.
    pub fn peer(&self, node: impl Into<String>) -> (Self, mpsc::Receiver<BrokerEvent>) {
        Self::on_bus(node.into(), self.capacity, self.bus.clone())
    }

    fn on_bus(
        node: String,
        capacity: usize,
        bus: Arc<Mutex<HashMap<String, Inbox>>>,
    ) -> (Self, mpsc::Receiver<BrokerEvent>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        bus.lock().insert(
            node.clone(),
            Inbox {
                tx,
                rooms: HashMap::new(),
                missed: 0,
            },
        );
        (
            MemoryBroker {
                node,
                capacity,
                bus,
            },
            rx,
        )
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        self.bus.lock().remove(&self.node);
    }
}

#[async_trait::async_trait]
impl RoomBroker for MemoryBroker {
    async fn publish(&self, room: &str, event: &RoomEvent) -> Result<(), PresenceError> {
        let mut bus = self.bus.lock();
        for (node, inbox) in bus.iter_mut() {
            if *node == self.node || !inbox.rooms.contains_key(room) {
                continue;
            }
            if inbox.missed > 0
                && inbox
                    .tx
                    .try_send(BrokerEvent::Lagged {
                        missed: inbox.missed,
                    })
                    .is_ok()
            {
                inbox.missed = 0;
            }
            let delivered = inbox.missed == 0
                && inbox
                    .tx
                    .try_send(BrokerEvent::Room {
                        room: room.to_string(),
                        origin: self.node.clone(),
                        event: event.clone(),
                    })
                    .is_ok();
            if !delivered {
                inbox.missed += 1;
            }
        }
        Ok(())
    }

    async fn subscribe(&self, room: &str) -> Result<(), PresenceError> {
        check_name("room", room)?;
        if let Some(inbox) = self.bus.lock().get_mut(&self.node) {
            *inbox.rooms.entry(room.to_string()).or_default() += 1;
        }
        Ok(())
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), PresenceError> {
        if let Some(inbox) = self.bus.lock().get_mut(&self.node) {
            if let Some(n) = inbox.rooms.get_mut(room) {
                *n -= 1;
                if *n == 0 {
                    inbox.rooms.remove(room);
                }
            }
        }
        Ok(())
    }

    fn healthy(&self) -> bool {
        true
    }
}
