//! Presence and room events in Redis, for several bridges serving the same rooms.
//!
//! # Keys
//! Everything of one room shares the hash tag `{<room>}`, so one room lives in one
//! Redis Cluster slot and each script (see [`super::lua`]) touches one slot only:
//!
//! | key | type | what |
//! | --- | --- | --- |
//! | `livesync:presence:{R}:members` | hash | connection → `{user, node, color, joined_at, ttl}` |
//! | `livesync:presence:{R}:state` | hash | connection → the client's state, as sent |
//! | `livesync:presence:{R}:expiry` | zset | connection → deadline (ms) |
//! | `livesync:presence:{R}:users` | hash | present user → `"<connections> <color>"` |
//! | `livesync:presence:{R}:held` | hash | color → present users holding it |
//! | `livesync:presence:{R}:colors` | hash | user → last color (kept after they leave) |
//! | `livesync:presence:{R}:seen` | zset | user → when they last left (to forget colors) |
//! | `livesync:presence:{R}:events` | channel | the room's [`RoomEvent`]s |
//! | `livesync:presence:nodes` | zset | node → heartbeat deadline (ms) |
//! | `livesync:presence:node:{N}:rooms` | set | rooms where node N may have members |
//! | `livesync:presence:node:{N}:reaper` | string | the node cleaning up after dead N |
//!
//! A room's keys expire a day (the color memory) after its last write.
//!
//! # Liveness
//! Each node keeps a copy of the members it joined. Its heartbeat re-registers the
//! node, adds its rooms to its rooms set, pushes back its live members' deadlines and
//! puts back any that Redis lost (restart, or reaped by others while this node could
//! not reach Redis): the store heals itself within one heartbeat of Redis answering.
//! A sweep removes this node's members that stopped being live, and reaps nodes whose
//! heartbeat deadline passed: one surviving node (holding the `reaper` key) removes
//! the dead node's members from each of its rooms and unregisters it.
//!
//! # Redis down
//! Every command runs under [`PresenceSettings::command_timeout`]: an unreachable
//! Redis answers [`PresenceError::Unavailable`] quickly. The `ConnectionManager`
//! reconnects by itself (a few quick retries per attempt, a new attempt per command),
//! and the broker's subscriber reconnects in its own loop, resubscribes and reports
//! [`BrokerEvent::Reconnected`].
//!
//! # Cluster
//! `redis+cluster://host:port[,host:port...]` (or several comma-separated `redis://`
//! URLs) uses a cluster connection for the same scripts. Room events use plain
//! `PUBLISH`, which a cluster forwards to every node, so the subscriber may listen on
//! any one of them; `SPUBLISH`/`SSUBSCRIBE` (Redis 7) would keep each room's traffic
//! on its shard but needs a subscriber per shard, left for when that traffic matters.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value as RedisValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::lua::{
    DEAD_NODES_SCRIPT, JOIN_SCRIPT, LEAVE_SCRIPT, MEMBERS_SCRIPT, NODE_BEAT_SCRIPT,
    NODE_FORGET_SCRIPT, REFRESH_SCRIPT, RESTORE_SCRIPT, SWEEP_SCRIPT, UPDATE_SCRIPT,
};
use super::{
    check_name, BrokerEvent, Joined, Member, PresenceError, PresenceSettings, PresenceStats,
    PresenceStore, RoomBroker, RoomEvent, Swept,
};

const NODES_KEY: &str = "livesync:presence:nodes";

/// Scripts in flight at once for one heartbeat or sweep.
const CONCURRENCY: usize = 32;

/// Dead nodes reaped per sweep at most.
const REAP_BATCH: usize = 16;

fn room_keys(room: &str) -> [String; 7] {
    [
        "members", "state", "expiry", "users", "held", "colors", "seen",
    ]
    .map(|k| format!("livesync:presence:{{{room}}}:{k}"))
}

fn channel(room: &str) -> String {
    format!("livesync:presence:{{{room}}}:events")
}

fn node_rooms_key(node: &str) -> String {
    format!("livesync:presence:node:{{{node}}}:rooms")
}

fn reaper_key(node: &str) -> String {
    format!("livesync:presence:node:{{{node}}}:reaper")
}

/// A connection to one Redis or to a Redis Cluster; both reconnect by themselves.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, RedisValue> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<RedisValue>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where Redis is: one server, or a cluster's seed nodes.
#[derive(Debug, Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

impl Target {
    fn parse(url: &str) -> Target {
        let (cluster, rest) = match url.split_once("+cluster://") {
            Some((scheme, rest)) => (true, format!("{scheme}://{rest}")),
            None => (false, url.to_string()),
        };
        let scheme = rest.split("://").next().unwrap_or("redis").to_string();
        let urls: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                if u.contains("://") {
                    u.to_string()
                } else {
                    format!("{scheme}://{u}")
                }
            })
            .collect();
        if cluster || urls.len() > 1 {
            Target::Cluster(urls)
        } else {
            Target::Single(rest)
        }
    }

    /// The servers a subscriber may listen on, in order of preference.
    fn subscriber_urls(&self) -> Vec<String> {
        match self {
            Target::Single(url) => vec![url.clone()],
            Target::Cluster(urls) => urls.clone(),
        }
    }
}

fn invalid_url(e: RedisError) -> PresenceError {
    PresenceError::Invalid {
        what: "redis url",
        reason: e.to_string(),
    }
}

fn open(target: &Target, timeout: Duration) -> Result<Conn, PresenceError> {
    match target {
        Target::Single(url) => {
            let client = redis::Client::open(url.as_str()).map_err(invalid_url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                // Few, quick retries per attempt: the next command starts a new attempt,
                // and callers are waiting with a timeout anyway.
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(250));
            let manager =
                ConnectionManager::new_lazy_with_config(client, config).map_err(invalid_url)?;
            Ok(Conn::Single(manager))
        }
        Target::Cluster(urls) => {
            let client = redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2)
                .min_retry_wait(50)
                .max_retry_wait(250)
                .build()
                .map_err(invalid_url)?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout);
            Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config),
            ))
        }
    }
}

/// What a Redis error means for the caller.
fn classify(e: RedisError) -> PresenceError {
    use redis::{ErrorKind, ServerErrorKind};
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        );
    if transient {
        PresenceError::Unavailable(e.to_string())
    } else {
        PresenceError::Backend(e.to_string())
    }
}

/// Whether a command failed because its connection was gone: it was already known
/// dead (the first command after Redis comes back), or could not be made. The manager
/// is reconnecting by then, so one retry usually succeeds. The redis crate reports a
/// request in flight when the connection drops the same way, so a retried command
/// may apply twice; every script here tolerates that (a second join is an update, a
/// second leave finds nothing, refreshes and restores are idempotent).
fn connection_lost(e: &RedisError) -> bool {
    e.is_connection_refusal() || e.is_connection_dropped()
}

/// Runs Redis commands under the command timeout, keeping the health flag.
#[derive(Clone)]
struct Redis {
    conn: Conn,
    timeout: Duration,
    healthy: Arc<AtomicBool>,
}

impl Redis {
    async fn run<T, F>(&self, f: impl Fn(Conn) -> F) -> Result<T, PresenceError>
    where
        F: Future<Output = RedisResult<T>>,
    {
        let attempts = async {
            match f(self.conn.clone()).await {
                Err(e) if connection_lost(&e) => f(self.conn.clone()).await,
                other => other,
            }
        };
        let result = match tokio::time::timeout(self.timeout, attempts).await {
            Err(_) => Err(PresenceError::Unavailable(format!(
                "Redis did not answer within {:?}",
                self.timeout
            ))),
            Ok(result) => result.map_err(classify),
        };
        match &result {
            Ok(_) => self.healthy.store(true, Ordering::Relaxed),
            Err(PresenceError::Unavailable(e)) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "Redis unavailable: presence degraded");
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Runs a room script with `args` after the common memory and TTL arguments.
    async fn room<T: redis::FromRedisValue>(
        &self,
        script: &'static redis::Script,
        room: &str,
        common: (u64, u64),
        args: &[&str],
    ) -> Result<T, PresenceError> {
        let mut invocation = script.prepare_invoke();
        for key in room_keys(room) {
            invocation.key(key);
        }
        invocation.arg(common.0).arg(common.1);
        for a in args {
            invocation.arg(*a);
        }
        self.invoke(&invocation).await
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, PresenceError> {
        self.run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, PresenceError> {
        self.run(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }
}

/// The fields of a member that Lua reads and writes (see [`super::lua`]).
#[derive(Deserialize)]
struct Meta {
    user: String,
    node: String,
    color: String,
    // cjson writes numbers as doubles.
    joined_at: f64,
    ttl: f64,
}

/// A member as the scripts return it: `[connection, meta, state, deadline]`. Anything
/// unreadable is logged and treated as absent.
fn parse_member(raw: &[String]) -> Option<Member> {
    let [connection, meta, state, deadline] = raw else {
        if !raw.is_empty() {
            tracing::warn!(fields = raw.len(), "malformed presence entry in Redis");
        }
        return None;
    };
    let meta: Meta = match serde_json::from_str(meta) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(%connection, error = %e, "unreadable presence member in Redis; ignored");
            return None;
        }
    };
    let state: Value = match serde_json::from_str(state) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%connection, error = %e, "unreadable presence state in Redis; ignored");
            return None;
        }
    };
    let deadline = deadline.parse::<f64>().unwrap_or(0.0) as i64;
    Some(Member {
        connection: connection.clone(),
        user: meta.user,
        node: meta.node,
        state,
        color: meta.color,
        joined_at: meta.joined_at as i64,
        last_seen: deadline - meta.ttl as i64,
    })
}

fn parse_members(raw: &[Vec<String>]) -> Vec<Member> {
    let mut out: Vec<Member> = raw.iter().filter_map(|r| parse_member(r)).collect();
    out.sort_by(|a, b| (a.joined_at, &a.connection).cmp(&(b.joined_at, &b.connection)));
    out
}

/// The members this node joined, so it can refresh and restore them.
#[derive(Default)]
struct Local {
    rooms: HashMap<String, LocalRoom>,
}

#[derive(Default)]
struct LocalRoom {
    members: HashMap<String, LocalMember>,
    /// Joins under way: the room must stay in the node's rooms set.
    pending: usize,
}

struct LocalMember {
    member: Member,
    /// Our idea of its deadline (never later than Redis's).
    deadline: Instant,
    /// Which join this is (a connection may leave and join again): a member put back
    /// by [`RedisPresence::restore`] counts only if the join it restored still holds.
    epoch: u64,
}

/// Epochs of [`LocalMember`]s.
static EPOCHS: AtomicU64 = AtomicU64::new(0);

/// Presence in Redis; see the [module docs](self).
pub struct RedisPresence {
    node: String,
    ttl: Duration,
    color_memory: Duration,
    redis: Redis,
    local: tokio::sync::Mutex<Local>,
    /// Members held, for [`PresenceStats`] without locking.
    counts: parking_lot::Mutex<PresenceStats>,
    registered: AtomicBool,
}

impl RedisPresence {
    pub fn new(url: &str, settings: &PresenceSettings) -> Result<Self, PresenceError> {
        check_name("node", &settings.node)?;
        let target = Target::parse(url);
        Self::with_target(&target, settings)
    }

    fn with_target(target: &Target, settings: &PresenceSettings) -> Result<Self, PresenceError> {
        Ok(RedisPresence {
            node: settings.node.clone(),
            ttl: settings.ttl,
            color_memory: settings.color_memory,
            redis: Redis {
                conn: open(target, settings.command_timeout)?,
                timeout: settings.command_timeout,
                healthy: Arc::new(AtomicBool::new(true)),
            },
            local: tokio::sync::Mutex::new(Local::default()),
            counts: parking_lot::Mutex::new(PresenceStats::default()),
            registered: AtomicBool::new(false),
        })
    }

    fn common(&self) -> (u64, u64) {
        (
            self.color_memory.as_millis() as u64,
            self.ttl.as_millis() as u64,
        )
    }

    /// Registers the node in the registry; true if it was not registered.
    async fn beat(&self) -> Result<bool, PresenceError> {
        let mut beat = NODE_BEAT_SCRIPT.prepare_invoke();
        beat.key(NODES_KEY)
            .arg(&self.node)
            .arg(self.ttl.as_millis() as u64);
        let added: i64 = self.redis.invoke(&beat).await?;
        self.registered.store(true, Ordering::Relaxed);
        Ok(added == 1)
    }

    async fn add_rooms(&self, rooms: Vec<String>) -> Result<(), PresenceError> {
        if rooms.is_empty() {
            return Ok(());
        }
        let key = node_rooms_key(&self.node);
        let keep = self.color_memory.as_millis() as i64;
        for chunk in rooms.chunks(1000) {
            let mut pipe = redis::pipe();
            pipe.sadd(&key, chunk).ignore().pexpire(&key, keep).ignore();
            let pipe = &pipe;
            self.redis
                .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
                .await?;
        }
        Ok(())
    }

    fn recount(&self, local: &Local) {
        let mut counts = self.counts.lock();
        counts.rooms = local
            .rooms
            .values()
            .filter(|r| !r.members.is_empty())
            .count();
        counts.members = local.rooms.values().map(|r| r.members.len()).sum();
    }

    /// Puts back one member the node holds if Redis lost it; `Some` if it did.
    async fn restore(&self, room: &str, m: &Member) -> Result<Option<Member>, PresenceError> {
        // The join being restored; a member that left since it was listed is not put
        // back (a leave removes the local copy before Redis's).
        let Some(epoch) = self
            .local
            .lock()
            .await
            .rooms
            .get(room)
            .and_then(|r| r.members.get(&m.connection))
            .map(|lm| lm.epoch)
        else {
            return Ok(None);
        };
        let state = serde_json::to_string(&m.state).unwrap_or_else(|_| "null".into());
        let joined_at = m.joined_at.to_string();
        let deadline = Instant::now() + self.ttl;
        let (restored, raw): (String, Vec<String>) = self
            .redis
            .room(
                &RESTORE_SCRIPT,
                room,
                self.common(),
                &[
                    &m.connection,
                    &m.user,
                    &self.node,
                    &m.color,
                    &joined_at,
                    &state,
                ],
            )
            .await?;
        let Some(member) = parse_member(&raw) else {
            return Ok(None);
        };
        let mut local = self.local.lock().await;
        match local
            .rooms
            .get_mut(room)
            .and_then(|r| r.members.get_mut(&m.connection))
        {
            Some(lm) if lm.epoch == epoch => {
                lm.member.color = member.color.clone();
                lm.deadline = deadline;
                Ok((restored == "1").then_some(member))
            }
            // Joined again meanwhile: that join wrote (or found) the member; not ours
            // to announce.
            Some(_) => Ok(None),
            // Left while we put it back (its leave may have run first in Redis): take
            // out what we put back, or it stays a ghost until its TTL.
            None => {
                drop(local);
                if restored == "1" {
                    let _: Vec<String> = self
                        .redis
                        .room(&LEAVE_SCRIPT, room, self.common(), &[&m.connection])
                        .await?;
                }
                Ok(None)
            }
        }
    }

    /// Removes, in each room, its expired members, the members of `dead_node` (or '')
    /// and the `force`d connections.
    async fn sweep_room(
        &self,
        room: &str,
        dead_node: &str,
        force: &[String],
    ) -> Result<Vec<Member>, PresenceError> {
        let mut args: Vec<&str> = vec![dead_node];
        args.extend(force.iter().map(String::as_str));
        let raw: Vec<Vec<String>> = self
            .redis
            .room(&SWEEP_SCRIPT, room, self.common(), &args)
            .await?;
        Ok(parse_members(&raw))
    }

    /// Cleans up after a node whose heartbeat expired, unless another node is on it.
    async fn reap(&self, dead: &str) -> Result<Vec<Swept>, PresenceError> {
        let reaper = reaper_key(dead);
        let claimed: Option<String> = self
            .redis
            .query(
                redis::cmd("SET")
                    .arg(&reaper)
                    .arg(&self.node)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl.as_millis() as u64),
            )
            .await?;
        if claimed.is_none() {
            return Ok(Vec::new());
        }
        let rooms_key = node_rooms_key(dead);
        let rooms: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(&rooms_key))
            .await?;
        tracing::info!(node = %dead, rooms = rooms.len(), "reaping a node whose heartbeat expired");
        let results: Vec<Result<Swept, PresenceError>> = stream::iter(rooms)
            .map(|room| async move {
                let leaves = self.sweep_room(&room, dead, &[]).await?;
                Ok(Swept { room, leaves })
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let swept = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.redis
            .query::<()>(redis::cmd("DEL").arg(&rooms_key).arg(&reaper))
            .await?;
        let mut forget = NODE_FORGET_SCRIPT.prepare_invoke();
        forget.key(NODES_KEY).arg(dead);
        self.redis.invoke::<i64>(&forget).await?;
        Ok(swept)
    }
}

#[async_trait::async_trait]
impl PresenceStore for RedisPresence {
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
        if !self.registered.load(Ordering::Relaxed) {
            self.beat().await?;
        }
        self.local
            .lock()
            .await
            .rooms
            .entry(room.to_string())
            .or_default()
            .pending += 1;
        // Taken before Redis sets its deadline, so ours is never the later one.
        let started = Instant::now();
        let result = async {
            // Indexed before the member exists, so a node dying right after the join
            // is still found in this room by the survivors.
            self.add_rooms(vec![room.to_string()]).await?;
            let state_json = serde_json::to_string(&state)
                .map_err(|e| PresenceError::Backend(format!("state not serialisable: {e}")))?;
            let (me, expired, members): (Vec<String>, Vec<Vec<String>>, Vec<Vec<String>>) = self
                .redis
                .room(
                    &JOIN_SCRIPT,
                    room,
                    self.common(),
                    &[connection, user, &self.node, &state_json],
                )
                .await?;
            let member = parse_member(&me)
                .ok_or_else(|| PresenceError::Backend("join returned no member".into()))?;
            Ok(Joined {
                member,
                members: parse_members(&members),
                expired: parse_members(&expired),
            })
        }
        .await;
        let mut local = self.local.lock().await;
        let r = local.rooms.entry(room.to_string()).or_default();
        r.pending -= 1;
        if let Ok(joined) = &result {
            r.members.insert(
                connection.to_string(),
                LocalMember {
                    member: joined.member.clone(),
                    deadline: started + self.ttl,
                    epoch: EPOCHS.fetch_add(1, Ordering::Relaxed),
                },
            );
            // Removed by the join as expired: maybe ours (a stale copy).
            for gone in &joined.expired {
                if gone.connection != connection {
                    r.members.remove(&gone.connection);
                }
            }
        }
        self.recount(&local);
        result
    }

    async fn update(
        &self,
        room: &str,
        connection: &str,
        state: Value,
    ) -> Result<Option<Member>, PresenceError> {
        let state_json = serde_json::to_string(&state)
            .map_err(|e| PresenceError::Backend(format!("state not serialisable: {e}")))?;
        let started = Instant::now();
        let raw: Vec<String> = self
            .redis
            .room(
                &UPDATE_SCRIPT,
                room,
                self.common(),
                &[connection, &state_json],
            )
            .await?;
        let member = parse_member(&raw);
        let mut local = self.local.lock().await;
        if let Some(lm) = local
            .rooms
            .get_mut(room)
            .and_then(|r| r.members.get_mut(connection))
        {
            match &member {
                Some(m) => {
                    lm.member = m.clone();
                    lm.deadline = started + self.ttl;
                }
                // Gone from Redis: the heartbeat puts it back if it is live.
                None => lm.member.state = state,
            }
        }
        Ok(member)
    }

    async fn leave(&self, room: &str, connection: &str) -> Result<Option<Member>, PresenceError> {
        // The local copy goes first, so a heartbeat or re-registration running now does
        // not put the member back after Redis's copy is gone (see `restore`).
        let copy = {
            let mut local = self.local.lock().await;
            let copy = local
                .rooms
                .get_mut(room)
                .and_then(|r| r.members.remove(connection));
            self.recount(&local);
            copy
        };
        let raw: Vec<String> = match self
            .redis
            .room(&LEAVE_SCRIPT, room, self.common(), &[connection])
            .await
        {
            Ok(raw) => raw,
            Err(e) => {
                // Kept, no longer refreshed: the sweep removes it at its deadline.
                if let Some(copy) = copy {
                    let mut local = self.local.lock().await;
                    let r = local.rooms.entry(room.to_string()).or_default();
                    r.members.entry(connection.to_string()).or_insert(copy);
                    self.recount(&local);
                }
                return Err(e);
            }
        };
        Ok(parse_member(&raw))
    }

    async fn members(&self, room: &str) -> Result<Vec<Member>, PresenceError> {
        let raw: Vec<Vec<String>> = self
            .redis
            .room(&MEMBERS_SCRIPT, room, self.common(), &[])
            .await?;
        Ok(parse_members(&raw))
    }

    async fn heartbeat(&self, live: &[String]) -> Result<Vec<(String, Member)>, PresenceError> {
        self.beat().await?;
        let live: std::collections::HashSet<&str> = live.iter().map(String::as_str).collect();
        let mut by_room: Vec<(String, Vec<String>)> = Vec::new();
        {
            let mut local = self.local.lock().await;
            let empty: Vec<String> = local
                .rooms
                .iter()
                .filter(|(_, r)| r.members.is_empty() && r.pending == 0)
                .map(|(room, _)| room.clone())
                .collect();
            for room in &empty {
                local.rooms.remove(room);
            }
            // Under the lock: a join of one of these rooms waits, and re-adds it after.
            if !empty.is_empty() {
                let key = node_rooms_key(&self.node);
                self.redis
                    .query::<()>(redis::cmd("SREM").arg(&key).arg(&empty))
                    .await?;
            }
            // Heals a rooms set lost with Redis, or trimmed by a reaper that thought
            // this node dead.
            self.add_rooms(local.rooms.keys().cloned().collect())
                .await?;
            for (room, r) in &local.rooms {
                let conns: Vec<String> = r
                    .members
                    .keys()
                    .filter(|c| live.contains(c.as_str()))
                    .cloned()
                    .collect();
                if !conns.is_empty() {
                    by_room.push((room.clone(), conns));
                }
            }
        }
        let started = Instant::now();
        let results: Vec<Result<(String, Vec<String>, Vec<String>), PresenceError>> =
            stream::iter(by_room)
                .map(|(room, conns)| async move {
                    let args: Vec<&str> = conns.iter().map(String::as_str).collect();
                    let missing: Vec<String> = self
                        .redis
                        .room(&REFRESH_SCRIPT, &room, self.common(), &args)
                        .await?;
                    Ok((room, conns, missing))
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut lost = Vec::new();
        {
            let mut local = self.local.lock().await;
            for result in results {
                let (room, conns, missing) = result?;
                let Some(r) = local.rooms.get_mut(&room) else {
                    continue;
                };
                for conn in conns {
                    let Some(lm) = r.members.get_mut(&conn) else {
                        continue;
                    };
                    if missing.contains(&conn) {
                        lost.push((room.clone(), lm.member.clone()));
                    } else {
                        lm.deadline = started + self.ttl;
                    }
                }
            }
        }
        let mut restored = Vec::new();
        for (room, member) in lost {
            if let Some(m) = self.restore(&room, &member).await? {
                tracing::info!(%room, connection = %m.connection, "presence member put back");
                restored.push((room, m));
            }
        }
        Ok(restored)
    }

    async fn sweep(&self) -> Result<Vec<Swept>, PresenceError> {
        let now = Instant::now();
        // This node's members that stopped being live: the node says they are gone,
        // whatever Redis's clock says.
        let stale: Vec<(String, Vec<String>)> = {
            let local = self.local.lock().await;
            local
                .rooms
                .iter()
                .filter_map(|(room, r)| {
                    let conns: Vec<String> = r
                        .members
                        .iter()
                        .filter(|(_, m)| m.deadline < now)
                        .map(|(c, _)| c.clone())
                        .collect();
                    (!conns.is_empty()).then(|| (room.clone(), conns))
                })
                .collect()
        };
        let mut out: HashMap<String, Vec<Member>> = HashMap::new();
        for (room, conns) in stale {
            let leaves = self.sweep_room(&room, "", &conns).await?;
            let mut local = self.local.lock().await;
            if let Some(r) = local.rooms.get_mut(&room) {
                for c in &conns {
                    r.members.remove(c);
                }
            }
            self.recount(&local);
            drop(local);
            out.entry(room).or_default().extend(leaves);
        }
        let mut dead_nodes = DEAD_NODES_SCRIPT.prepare_invoke();
        dead_nodes.key(NODES_KEY).arg(&self.node).arg(REAP_BATCH);
        let dead: Vec<String> = self.redis.invoke(&dead_nodes).await?;
        for node in dead {
            for swept in self.reap(&node).await? {
                out.entry(swept.room).or_default().extend(swept.leaves);
            }
        }
        let mut out: Vec<Swept> = out
            .into_iter()
            .filter(|(_, leaves)| !leaves.is_empty())
            .map(|(room, leaves)| Swept { room, leaves })
            .collect();
        out.sort_by(|a, b| a.room.cmp(&b.room));
        Ok(out)
    }

    async fn reregister(&self) -> Result<Vec<(String, Member)>, PresenceError> {
        self.beat().await?;
        let held: Vec<(String, Member)> = {
            let local = self.local.lock().await;
            self.add_rooms(local.rooms.keys().cloned().collect())
                .await?;
            local
                .rooms
                .iter()
                .flat_map(|(room, r)| r.members.values().map(|m| (room.clone(), m.member.clone())))
                .collect()
        };
        let results: Vec<Result<Option<(String, Member)>, PresenceError>> =
            stream::iter(held)
                .map(|(room, m)| async move {
                    Ok(self.restore(&room, &m).await?.map(|back| (room, back)))
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        let mut restored = Vec::new();
        for r in results {
            if let Some(back) = r? {
                restored.push(back);
            }
        }
        if !restored.is_empty() {
            tracing::info!(members = restored.len(), "presence members re-registered");
        }
        Ok(restored)
    }

    fn healthy(&self) -> bool {
        self.redis.healthy.load(Ordering::Relaxed)
    }

    fn stats(&self) -> PresenceStats {
        *self.counts.lock()
    }
}

/// What travels on a room's channel.
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    node: &'a str,
    room: &'a str,
    event: &'a RoomEvent,
}

#[derive(Deserialize)]
struct EnvelopeIn {
    node: String,
    room: String,
    event: RoomEvent,
}

enum Control {
    Subscribe(String, oneshot::Sender<Result<(), PresenceError>>),
    Unsubscribe(String, oneshot::Sender<Result<(), PresenceError>>),
}

/// Room events over Redis pub/sub; see the [module docs](self).
pub struct RedisBroker {
    node: String,
    redis: Redis,
    timeout: Duration,
    wanted: Arc<parking_lot::Mutex<HashMap<String, usize>>>,
    control: mpsc::UnboundedSender<Control>,
    connected: Arc<AtomicBool>,
    subscriber: tokio::task::JoinHandle<()>,
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

impl RedisBroker {
    pub fn new(
        url: &str,
        settings: &PresenceSettings,
    ) -> Result<(Self, mpsc::Receiver<BrokerEvent>), PresenceError> {
        check_name("node", &settings.node)?;
        let target = Target::parse(url);
        let urls = target.subscriber_urls();
        let clients = urls
            .iter()
            .map(|u| redis::Client::open(u.as_str()).map_err(invalid_url))
            .collect::<Result<Vec<_>, _>>()?;
        if clients.is_empty() {
            return Err(PresenceError::Invalid {
                what: "redis url",
                reason: "names no server".into(),
            });
        }
        let (events_tx, events_rx) = mpsc::channel(settings.event_capacity.max(1));
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let wanted = Arc::new(parking_lot::Mutex::new(HashMap::new()));
        let connected = Arc::new(AtomicBool::new(false));
        let subscriber = tokio::spawn(
            Subscriber {
                node: settings.node.clone(),
                clients,
                timeout: settings.command_timeout,
                wanted: wanted.clone(),
                control: control_rx,
                events: events_tx,
                connected: connected.clone(),
                missed: AtomicU64::new(0),
            }
            .run(),
        );
        let broker = RedisBroker {
            node: settings.node.clone(),
            redis: Redis {
                conn: open(&target, settings.command_timeout)?,
                timeout: settings.command_timeout,
                healthy: Arc::new(AtomicBool::new(true)),
            },
            timeout: settings.command_timeout,
            wanted,
            control: control_tx,
            connected,
            subscriber,
        };
        Ok((broker, events_rx))
    }

    async fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), PresenceError>>) -> Control,
    ) -> Result<(), PresenceError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .map_err(|_| PresenceError::Unavailable("the subscriber stopped".into()))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            _ => Err(PresenceError::Unavailable(
                "no subscription confirmation from Redis".into(),
            )),
        }
    }
}

#[async_trait::async_trait]
impl RoomBroker for RedisBroker {
    async fn publish(&self, room: &str, event: &RoomEvent) -> Result<(), PresenceError> {
        let payload = serde_json::to_string(&EnvelopeOut {
            node: &self.node,
            room,
            event,
        })
        .map_err(|e| PresenceError::Backend(format!("event not serialisable: {e}")))?;
        self.redis
            .query::<i64>(redis::cmd("PUBLISH").arg(channel(room)).arg(&payload))
            .await?;
        Ok(())
    }

    async fn subscribe(&self, room: &str) -> Result<(), PresenceError> {
        check_name("room", room)?;
        let first = {
            let mut wanted = self.wanted.lock();
            let n = wanted.entry(room.to_string()).or_default();
            *n += 1;
            *n == 1
        };
        if !first {
            return Ok(());
        }
        let room = room.to_string();
        self.ask(|tx| Control::Subscribe(room, tx)).await
    }

    async fn unsubscribe(&self, room: &str) -> Result<(), PresenceError> {
        let last = {
            let mut wanted = self.wanted.lock();
            match wanted.get_mut(room) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    wanted.remove(room);
                    true
                }
                None => false,
            }
        };
        if !last {
            return Ok(());
        }
        let room = room.to_string();
        self.ask(|tx| Control::Unsubscribe(room, tx)).await
    }

    fn healthy(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// The task that owns the pub/sub connection: connects, subscribes to the wanted
/// rooms, forwards messages, and starts over when the connection is lost.
struct Subscriber {
    node: String,
    clients: Vec<redis::Client>,
    timeout: Duration,
    wanted: Arc<parking_lot::Mutex<HashMap<String, usize>>>,
    control: mpsc::UnboundedReceiver<Control>,
    events: mpsc::Sender<BrokerEvent>,
    connected: Arc<AtomicBool>,
    missed: AtomicU64,
}

impl Subscriber {
    async fn run(mut self) {
        let mut attempt: usize = 0;
        let mut ever_connected = false;
        loop {
            let client = &self.clients[attempt % self.clients.len()];
            attempt += 1;
            match self.connect(client).await {
                Ok(pubsub) => {
                    attempt = 0;
                    self.connected.store(true, Ordering::Relaxed);
                    if ever_connected {
                        tracing::info!("Redis pub/sub reconnected");
                        if self.events.send(BrokerEvent::Reconnected).await.is_err() {
                            return;
                        }
                    }
                    ever_connected = true;
                    if !self.serve(pubsub).await {
                        return;
                    }
                    self.connected.store(false, Ordering::Relaxed);
                    tracing::warn!("Redis pub/sub connection lost; reconnecting");
                }
                Err(e) => {
                    tracing::debug!(error = %e, "Redis pub/sub connect failed");
                    // Requests made meanwhile fail now; the wanted set keeps them.
                    while let Ok(c) = self.control.try_recv() {
                        let (Control::Subscribe(_, tx) | Control::Unsubscribe(_, tx)) = c;
                        let _ = tx.send(Err(PresenceError::Unavailable(e.to_string())));
                    }
                    let pause = Duration::from_millis(100 * (attempt.min(10) as u64));
                    tokio::time::sleep(pause).await;
                }
            }
            if self.events.is_closed() {
                return;
            }
        }
    }

    async fn connect(&self, client: &redis::Client) -> Result<redis::aio::PubSub, PresenceError> {
        let mut pubsub = tokio::time::timeout(self.timeout, client.get_async_pubsub())
            .await
            .map_err(|_| PresenceError::Unavailable("connect timed out".into()))?
            .map_err(classify)?;
        let channels: Vec<String> = self.wanted.lock().keys().map(|r| channel(r)).collect();
        for chunk in channels.chunks(1000) {
            tokio::time::timeout(self.timeout, pubsub.subscribe(chunk))
                .await
                .map_err(|_| PresenceError::Unavailable("subscribe timed out".into()))?
                .map_err(classify)?;
        }
        Ok(pubsub)
    }

    /// Serves one connection until it is lost (true) or the broker is gone (false).
    async fn serve(&mut self, pubsub: redis::aio::PubSub) -> bool {
        let (mut sink, mut messages) = pubsub.split();
        // Notices a silently dead connection (no FIN) between messages.
        let mut ping = tokio::time::interval(self.timeout.max(Duration::from_millis(500)) * 2);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = messages.next() => {
                    let Some(msg) = msg else { return true };
                    if !self.forward(msg.get_payload_bytes()).await {
                        return false;
                    }
                }
                control = self.control.recv() => {
                    let Some(control) = control else { return false };
                    let (result, tx) = match control {
                        Control::Subscribe(room, tx) => {
                            // Unsubscribed again while the request waited: nothing to do.
                            if !self.wanted.lock().contains_key(&room) {
                                let _ = tx.send(Ok(()));
                                continue;
                            }
                            (tokio::time::timeout(self.timeout, sink.subscribe(channel(&room))).await, tx)
                        }
                        Control::Unsubscribe(room, tx) => {
                            if self.wanted.lock().contains_key(&room) {
                                let _ = tx.send(Ok(()));
                                continue;
                            }
                            (tokio::time::timeout(self.timeout, sink.unsubscribe(channel(&room))).await, tx)
                        }
                    };
                    match result {
                        Ok(Ok(())) => { let _ = tx.send(Ok(())); }
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(classify(e)));
                            return true;
                        }
                        Err(_) => {
                            let _ = tx.send(Err(PresenceError::Unavailable("subscribe timed out".into())));
                            return true;
                        }
                    }
                }
                _ = ping.tick() => {
                    let pong = tokio::time::timeout(self.timeout, sink.ping::<RedisValue>()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        return true;
                    }
                }
            }
        }
    }

    /// Hands one message to the receiver; false if the receiver is gone.
    async fn forward(&self, payload: &[u8]) -> bool {
        let envelope: EnvelopeIn = match parse_envelope(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable room event on Redis; dropped");
                return true;
            }
        };
        if envelope.node == self.node {
            return true;
        }
        let missed = self.missed.load(Ordering::Relaxed);
        if missed > 0 {
            match self.events.try_send(BrokerEvent::Lagged { missed }) {
                Ok(()) => self.missed.store(0, Ordering::Relaxed),
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.missed.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            }
        }
        let event = BrokerEvent::Room {
            room: envelope.room,
            origin: envelope.node,
            event: envelope.event,
        };
        match self.events.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            // The redis crate buffers pub/sub messages without bound anyway; better to
            // drop here and tell the receiver than to grow.
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.missed.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }
}

/// How deep an envelope may nest: a client's state or payload is at most as deep as
/// serde_json's default limit lets a frame be (128), and the envelope adds a few levels.
const MAX_ENVELOPE_DEPTH: usize = 160;

/// Reads an envelope. Not under serde_json's default recursion limit (128): a state or
/// payload a node accepted from its client (up to ~127 deep) arrives wrapped 5 levels
/// deeper and would be dropped; the depth is checked first instead, so the parser's
/// stack stays bounded whatever is published on the channel.
fn parse_envelope(payload: &[u8]) -> Result<EnvelopeIn, String> {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in payload {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if deepest > MAX_ENVELOPE_DEPTH {
        return Err(format!("nested {deepest} deep"));
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    de.disable_recursion_limit();
    let envelope = EnvelopeIn::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(envelope)
}

/// The Redis store and broker for `url`.
pub async fn connect(
    url: &str,
    settings: PresenceSettings,
) -> Result<(RedisPresence, RedisBroker, mpsc::Receiver<BrokerEvent>), PresenceError> {
    let store = RedisPresence::new(url, &settings)?;
    let (broker, events) = RedisBroker::new(url, &settings)?;
    // Registered now if Redis answers; otherwise at the first join or heartbeat.
    if let Err(e) = store.beat().await {
        tracing::warn!(error = %e, "Redis not reachable yet; presence starts degraded");
    }
    Ok((store, broker, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_room_one_slot() {
        let keys = room_keys("doc:42");
        assert!(keys.iter().all(|k| k.contains("{doc:42}")));
        assert_eq!(channel("a}b"), "livesync:presence:{a}b}:events");
    }

    #[tokio::test]
    async fn urls() {
        assert!(matches!(Target::parse("redis://h:1"), Target::Single(u) if u == "redis://h:1"));
        let Target::Cluster(urls) = Target::parse("redis+cluster://h:1,h:2") else {
            panic!("not a cluster")
        };
        assert_eq!(urls, ["redis://h:1", "redis://h:2"]);
        let settings = PresenceSettings::new("n");
        assert!(RedisBroker::new("redis+cluster://", &settings).is_err());
        assert!(matches!(
            Target::parse("redis://h:1,redis://h:2"),
            Target::Cluster(u) if u.len() == 2
        ));
    }

    #[test]
    fn envelopes_nested_as_deep_as_clients_may_send_are_read() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let envelope = |n: usize| {
            format!(
                r#"{{"node":"n","room":"r","event":{{"broadcast":{{"event":"e","payload":{},"from_connection":"c","from_user":"u"}}}}}}"#,
                deep(n)
            )
        };
        assert!(parse_envelope(envelope(127).as_bytes()).is_ok());
        assert!(parse_envelope(envelope(10_000).as_bytes()).is_err());
        // Brackets inside strings do not count.
        let text = format!(
            r#"{{"node":"n","room":"{}\"","event":{{"diff":{{"joins":[],"leaves":[],"updates":[]}}}}}}"#,
            "[".repeat(1000)
        );
        assert!(parse_envelope(text.as_bytes()).is_ok(), "{text}");
    }

    #[test]
    fn malformed_entries_are_absent() {
        assert!(parse_member(&["c".into(), "not json".into(), "{}".into(), "1".into()]).is_none());
        assert!(parse_member(&["c".into()]).is_none());
        let ok = parse_member(&[
            "c".into(),
            r##"{"user":"u","node":"n","color":"#E5484D","joined_at":1.7e12,"ttl":30000}"##.into(),
            "[]".into(),
            "1700000030000".into(),
        ])
        .expect("a member");
        assert_eq!(ok.joined_at, 1_700_000_000_000);
        assert_eq!(ok.last_seen, 1_700_000_000_000);
        assert_eq!(ok.state, serde_json::json!([]));
    }
}
