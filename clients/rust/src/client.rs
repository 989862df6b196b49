//! The client handle: what the app calls, and the state the connection task keeps
//! current (subscriptions and their replicas, the write queue and its optimistic
//! overlay, rooms). Everything needed to resume lives here, so a new connection
//! rebuilds its session from it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use crate::connection;
use crate::error::{Error, Result};
use crate::optimistic::{Outcome, Overlay};
use crate::queue::{Mutation, MutationQueue};
use crate::replica::{Parts, Row, Table};
use crate::room::Room;

#[derive(Debug, Clone)]
pub struct Config {
    /// `ws://host:port/ws`.
    pub url: String,
    pub client_id: String,
    pub token: Option<String>,
    /// The write queue's file; None keeps it in memory (lost on exit).
    pub queue_path: Option<PathBuf>,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Config {
    pub fn new(url: impl Into<String>, client_id: impl Into<String>) -> Config {
        Config {
            url: url.into(),
            client_id: client_id.into(),
            token: None,
            queue_path: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// What happens, for the app (and the CLI) to react to.
#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        welcome: Value,
    },
    Disconnected {
        reason: String,
    },
    /// A whole transaction for a subscription (all its parts).
    Changes {
        sub: String,
        position: i64,
        changes: Vec<Value>,
    },
    /// A replica finished loading a snapshot (first load, or after a resync).
    Loaded {
        sub: String,
        position: i64,
    },
    /// The bridge could not resume a stream subscription (`resync_required`); it has
    /// ended. Replicas reload by themselves instead.
    ResyncRequired {
        sub: String,
        message: String,
    },
    WriteSettled {
        mutation: Mutation,
        result: Value,
        outcome: Outcome,
    },
    /// A room's members changed (the full list after the change).
    Presence {
        room: String,
        members: Vec<Value>,
    },
    Broadcast(Value),
    /// An error the bridge sent that no request of ours handled.
    Error(Value),
}

#[derive(Debug)]
pub(crate) struct Sub {
    pub channel: String,
    /// The table's name as written (`public.items`).
    pub table: String,
    pub filter: Option<Value>,
    /// What to send as `since` on the next subscribe.
    pub position: Option<i64>,
    /// Some: a replica (loads a snapshot first).
    pub replica: Option<Table>,
    /// Parts of a transaction still arriving.
    pub parts: Parts,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub subs: BTreeMap<String, Sub>,
    pub queue: MutationQueue,
    pub overlay: Overlay,
    pub rooms: BTreeMap<String, Room>,
    pub welcome: Option<Value>,
}

#[derive(Debug)]
pub(crate) enum Command {
    Start(String),
    Stop(String),
    Write,
    Join(String),
    Send(Value),
    Close,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub config: Config,
    inner: Mutex<Inner>,
    pub events: mpsc::UnboundedSender<Event>,
    /// How many writes are pending (for `flush`).
    pub pending: watch::Sender<usize>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding it leaves plain data: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }
}

pub struct Client {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub type Events = mpsc::UnboundedReceiver<Event>;

impl Client {
    /// Opens the queue and starts connecting (in the background, with backoff, for
    /// as long as the client lives). Pending writes from an earlier run are replayed
    /// once connected.
    pub fn start(config: Config) -> Result<(Client, Events)> {
        let queue = match &config.queue_path {
            Some(p) => MutationQueue::open(p, &config.client_id)?,
            None => MutationQueue::in_memory(&config.client_id),
        };
        let mut overlay = Overlay::default();
        for m in queue.pending() {
            overlay.add(m);
        }
        let (events, events_rx) = mpsc::unbounded_channel();
        let (pending, _) = watch::channel(queue.len());
        let shared = Arc::new(Shared {
            config,
            inner: Mutex::new(Inner {
                subs: BTreeMap::new(),
                queue,
                overlay,
                rooms: BTreeMap::new(),
                welcome: None,
            }),
            events,
            pending,
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(connection::run(shared.clone(), commands_rx));
        Ok((
            Client {
                shared,
                commands,
                task: Some(task),
            },
            events_rx,
        ))
    }

    fn command(&self, c: Command) -> Result<()> {
        self.commands.send(c).map_err(|_| Error::Closed)
    }

    /// Streams `table`'s changes after `since` (None: from now), optionally filtered
    /// (`{"column", "op", "value"}`). Resumes from the last position on reconnect.
    pub fn subscribe(
        &self,
        id: &str,
        table: &str,
        since: Option<i64>,
        filter: Option<Value>,
    ) -> Result<()> {
        self.add_sub(id, table, since, filter, None)
    }

    /// Keeps a replica of `table` (snapshot, then changes by version).
    pub fn replicate(&self, id: &str, table: &str, filter: Option<Value>) -> Result<()> {
        self.add_sub(id, table, None, filter, Some(Table::new()))
    }

    fn add_sub(
        &self,
        id: &str,
        table: &str,
        since: Option<i64>,
        filter: Option<Value>,
        replica: Option<Table>,
    ) -> Result<()> {
        {
            let mut inner = self.shared.lock();
            if inner.subs.contains_key(id) {
                return Err(Error::Invalid(format!("subscription id {id:?} is in use")));
            }
            inner.subs.insert(
                id.to_string(),
                Sub {
                    channel: format!("table:{table}"),
                    table: table.to_string(),
                    filter,
                    position: since,
                    replica,
                    parts: Parts::default(),
                },
            );
        }
        self.command(Command::Start(id.to_string()))
    }

    pub fn unsubscribe(&self, id: &str) -> Result<()> {
        if self.shared.lock().subs.remove(id).is_some() {
            self.command(Command::Stop(id.to_string()))?;
        }
        Ok(())
    }

    /// The last position a subscription has everything up to.
    pub fn position(&self, sub: &str) -> Option<i64> {
        self.shared.lock().subs.get(sub).and_then(|s| s.position)
    }

    /// Whether a replica has loaded its snapshot.
    pub fn is_loaded(&self, sub: &str) -> bool {
        self.shared
            .lock()
            .subs
            .get(sub)
            .and_then(|s| s.replica.as_ref())
            .is_some_and(Table::is_loaded)
    }

    /// A replica's rows as the server has them.
    pub fn server_rows(&self, sub: &str) -> Vec<Row> {
        let inner = self.shared.lock();
        inner
            .subs
            .get(sub)
            .and_then(|s| s.replica.as_ref())
            .map(|t| t.rows().cloned().collect())
            .unwrap_or_default()
    }

    /// A replica's rows as the app should show them: with this client's pending
    /// writes on top (optimistic).
    pub fn rows(&self, sub: &str) -> Vec<Map<String, Value>> {
        let inner = self.shared.lock();
        let Some(s) = inner.subs.get(sub) else {
            return Vec::new();
        };
        let Some(table) = s.replica.as_ref() else {
            return Vec::new();
        };
        inner.overlay.view(&s.table, table).into_values().collect()
    }

    /// Queues one mutation (persisted before this returns) and sends it when
    /// connected; returns its mutation id. `op`: insert, update, upsert, delete.
    pub fn write(
        &self,
        table: &str,
        op: &str,
        key: Value,
        values: Option<Value>,
        base_version: Option<i64>,
    ) -> Result<i64> {
        if !matches!(op, "insert" | "update" | "upsert" | "delete") {
            return Err(Error::Invalid(format!("unknown op {op:?}")));
        }
        if !key.is_object() {
            return Err(Error::Invalid("key must be a JSON object".into()));
        }
        let mutation = {
            let mut inner = self.shared.lock();
            let m = inner.queue.push(Mutation {
                table: table.to_string(),
                op: op.to_string(),
                key,
                values,
                base_version,
                base_values: None,
                mutation_id: 0,
                hlc: None,
            })?;
            inner.overlay.add(&m);
            self.shared.pending.send_replace(inner.queue.len());
            m
        };
        self.command(Command::Write)?;
        Ok(mutation.mutation_id)
    }

    pub fn pending_writes(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Waits until every queued write (this run's and earlier runs') has its result.
    pub async fn flush(&self) {
        let mut rx = self.shared.pending.subscribe();
        let _ = rx.wait_for(|&n| n == 0).await;
    }

    /// Joins `room` with `state` (again after every reconnect).
    pub fn join(&self, room: &str, state: Value) -> Result<()> {
        self.shared
            .lock()
            .rooms
            .insert(room.to_string(), Room::new(room, state));
        self.command(Command::Join(room.to_string()))
    }

    /// Replaces our state in a joined room.
    pub fn update_presence(&self, room: &str, state: Value) -> Result<()> {
        {
            let mut inner = self.shared.lock();
            let Some(r) = inner.rooms.get_mut(room) else {
                return Err(Error::Invalid(format!("room {room:?} not joined")));
            };
            r.state = state.clone();
        }
        self.command(Command::Send(
            json!({"type": "presence", "room": room, "state": state}),
        ))
    }

    pub fn leave(&self, room: &str) -> Result<()> {
        if self.shared.lock().rooms.remove(room).is_some() {
            self.command(Command::Send(json!({"type": "leave", "room": room})))?;
        }
        Ok(())
    }

    /// An ephemeral event to the room's other members (dropped while disconnected).
    pub fn broadcast(&self, room: &str, event: &str, payload: Value) -> Result<()> {
        self.command(Command::Send(
            json!({"type": "broadcast", "room": room, "event": event, "payload": payload}),
        ))
    }

    pub fn members(&self, room: &str) -> Vec<Value> {
        self.shared
            .lock()
            .rooms
            .get(room)
            .map(|r| r.members.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The last `welcome` (None before the first connection).
    pub fn welcome(&self) -> Option<Value> {
        self.shared.lock().welcome.clone()
    }

    /// Closes the connection and stops reconnecting. Queued writes stay in the file.
    pub async fn close(mut self) {
        let _ = self.command(Command::Close);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Close);
    }
}
