//! The fan-out hub: subscriptions by table and filter, the node's window of recent
//! transactions, and the switch of every subscription between *live* (fed by
//! [`FanoutHub::publish`], one shared body per stream) and *catching up* (fed by its
//! own task from the window or the database until it reaches the hub's head).
//!
//! Every subscription starts catching up from its `since` (or the head); one whose
//! queue is full when a transaction is published leaves live and catches up from the
//! position before that transaction. The switch back to live happens under the hub's
//! lock when the subscription has everything up to the head, so nothing is missed or
//! sent twice at the seam. A subscription still catching up after
//! `limits.max_catch_up` is told `resync_required` and ended.

pub mod filter;
pub mod outbox;
pub mod page_cache;

pub use filter::{FilterError, FilterSpec, RowFilter, Verdict};
pub use outbox::{ChangesBody, Outbound, Outbox, OutboxReceiver};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::changelog::{left_filter_json, Entry, RecentWindow, TableChanges, Txn};
use crate::config::Limits;
use crate::metrics as m;
use crate::pg::reader::{read_page, PAGE_CHANGES};

/// Identifies one subscription in the hub.
pub type SubKey = u64;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the bridge has not read the change log yet; retry shortly")]
    NotReady,
}

/// What a session asks for.
pub struct SubscribeRequest {
    pub outbox: Outbox,
    pub relation: u32,
    pub channel: String,
    pub filter: Option<RowFilter>,
    /// The subscription's id as JSON (echoed in every `changes` message).
    pub sub_id_json: String,
    /// Start after this position; None: from the head.
    pub since: Option<i64>,
    /// The role the subscription's access was granted to (re-checked while it lives).
    pub role: Option<String>,
}

/// Per-channel figures for `/api/v1/sync/stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelStats {
    pub channel: String,
    pub subscriptions: usize,
    pub live: usize,
    pub catching_up: usize,
    pub streams: usize,
    pub messages_sent: u64,
    pub changes_sent: u64,
}

/// Hub-wide figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HubStats {
    pub head: Option<i64>,
    pub window_start: i64,
    pub window_changes: usize,
    pub subscriptions: usize,
    pub channels: Vec<ChannelStats>,
}

pub struct FanoutHub {
    state: Mutex<HubState>,
    head_tx: watch::Sender<i64>,
    pool: deadpool_postgres::Pool,
    pages: page_cache::PageCache,
    limits: Limits,
    /// The runtime sessions run on: catch-up tasks and the messages that end
    /// subscriptions are spawned there, also when the reader (on its own thread)
    /// publishes.
    runtime: tokio::runtime::Handle,
}

struct HubState {
    head: Option<i64>,
    window: RecentWindow,
    relations: HashMap<u32, RelationStreams>,
    subs: HashMap<SubKey, Subscription>,
    /// How many subscriptions each (table, role) pair has: what the reader re-checks
    /// before every page, without walking every subscription.
    grants: HashMap<(u32, Option<String>), usize>,
    next_key: SubKey,
}

struct RelationStreams {
    channel: String,
    streams: Vec<Stream>,
    messages_sent: AtomicU64,
    changes_sent: AtomicU64,
}

/// Subscribers of one table with one filter: they receive the same bodies.
struct Stream {
    filter: Option<Arc<RowFilter>>,
    live: Vec<LiveSub>,
    /// Subscriptions (live or not) using this stream.
    members: usize,
}

struct LiveSub {
    key: SubKey,
    outbox: Outbox,
    prefix: Arc<str>,
}

struct Subscription {
    outbox: Outbox,
    relation: u32,
    filter: Option<Arc<RowFilter>>,
    prefix: Arc<str>,
    sub_id_json: String,
    live: bool,
    role: Option<String>,
    /// Held by the catch-up task while it sends, and cleared (under the lock) when the
    /// subscription ends: once `unsubscribe_and_wait` returns, nothing more of this
    /// subscription can be queued.
    gate: Arc<tokio::sync::Mutex<bool>>,
}

impl FanoutHub {
    /// Must be called on the runtime the sessions run on.
    pub fn new(pool: deadpool_postgres::Pool, limits: Limits) -> Arc<FanoutHub> {
        let (head_tx, _) = watch::channel(0);
        Arc::new(FanoutHub {
            state: Mutex::new(HubState {
                head: None,
                window: RecentWindow::new(0, limits.window_changes, limits.window_bytes),
                relations: HashMap::new(),
                subs: HashMap::new(),
                grants: HashMap::new(),
                next_key: 1,
            }),
            head_tx,
            pool,
            // About as many changes as the window holds.
            pages: page_cache::PageCache::new(
                (limits.window_changes / PAGE_CHANGES as usize).max(2),
            ),
            limits,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// The position everything has been published up to (None before the reader's
    /// first read).
    pub fn head(&self) -> Option<i64> {
        self.state.lock().head
    }

    /// Sets the starting position (the reader's first connection).
    pub fn start_at(&self, position: i64) {
        let mut st = self.state.lock();
        if st.head.is_none() {
            st.head = Some(position);
            st.window.reset(position);
            drop(st);
            self.head_tx.send_replace(position);
        }
    }

    /// The reader lost its place in the log (compacted past it): every subscription
    /// is told to resync and ended; the hub continues from `position`.
    pub fn reset_at(&self, position: i64) {
        let subs: Vec<(SubKey, Subscription)> = {
            let mut st = self.state.lock();
            st.head = Some(position);
            st.window.reset(position);
            st.relations.clear();
            st.grants.clear();
            st.subs.drain().collect()
        };
        self.pages.clear();
        self.head_tx.send_replace(position);
        for (_, sub) in subs {
            m::resyncs();
            // Waiting for room as long as it takes (a full queue must not swallow it).
            self.runtime.spawn(async move {
                *sub.gate.lock().await = false;
                let _ = sub
                    .outbox
                    .send(Outbound::Text(resync_message(&sub.sub_id_json)))
                    .await;
            });
        }
    }

    /// Publishes one committed transaction to live subscribers and the window.
    pub fn publish(self: &Arc<Self>, txn: Arc<Txn>) {
        let lag_micros = now_micros() - txn.committed_at_micros;
        let mut lagging: Vec<(SubKey, i64)> = Vec::new();
        let mut gone: Vec<SubKey> = Vec::new();
        {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let before = st.head.unwrap_or(0);
            if txn.last <= before {
                return; // already published (a reconnected reader re-read it)
            }
            for table in &txn.tables {
                let Some(rs) = st.relations.get_mut(&table.relation) else {
                    continue;
                };
                // Each change's entry is parsed once, whatever the number of filtered
                // streams that look at it.
                let mut parsed: Option<Vec<Option<Entry<'_>>>> = None;
                for stream in &mut rs.streams {
                    if stream.live.is_empty() {
                        continue;
                    }
                    let entries = stream
                        .filter
                        .as_ref()
                        .map(|_| &**parsed.get_or_insert_with(|| parse_entries(table, txn.after)));
                    let Some(body) = body_for(
                        table,
                        entries,
                        stream.filter.as_deref(),
                        txn.after,
                        txn.last,
                        self.limits.max_frame_bytes,
                    ) else {
                        continue;
                    };
                    let body = Arc::new(body);
                    let mut sent = 0u64;
                    stream.live.retain(|sub| {
                        match sub.outbox.try_send(Outbound::Changes {
                            prefix: sub.prefix.clone(),
                            body: body.clone(),
                        }) {
                            Ok(()) => {
                                sent += 1;
                                true
                            }
                            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                                lagging.push((sub.key, before));
                                false
                            }
                            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                                gone.push(sub.key);
                                false
                            }
                        }
                    });
                    rs.messages_sent
                        .fetch_add(sent * body.parts.len() as u64, Ordering::Relaxed);
                    rs.changes_sent
                        .fetch_add(sent * body.changes as u64, Ordering::Relaxed);
                    m::changes_sent(sent * body.changes as u64);
                }
            }
            st.head = Some(txn.last);
            st.window.push(txn.clone());
            for (key, _) in &lagging {
                if let Some(sub) = st.subs.get_mut(key) {
                    sub.live = false;
                }
            }
            for key in &gone {
                remove_sub(st, *key);
            }
        }
        m::publish_lag(lag_micros);
        self.head_tx.send_replace(txn.last);
        for (key, from) in lagging {
            m::catch_ups();
            self.spawn_catch_up(key, from);
        }
    }

    /// Registers a subscription, catching up from `since` (or the head). Returns its
    /// key and the position it starts after; the caller sends `subscribed`, then
    /// calls [`FanoutHub::start`].
    pub fn subscribe(&self, request: SubscribeRequest) -> Result<(SubKey, i64), HubError> {
        let mut st = self.state.lock();
        let head = st.head.ok_or(HubError::NotReady)?;
        let key = st.next_key;
        st.next_key += 1;
        let filter = request.filter.map(Arc::new);
        let rs = st
            .relations
            .entry(request.relation)
            .or_insert_with(|| RelationStreams {
                channel: request.channel.clone(),
                streams: Vec::new(),
                messages_sent: AtomicU64::new(0),
                changes_sent: AtomicU64::new(0),
            });
        rs.channel = request.channel;
        // Equal filters share one stream (and one body per transaction).
        let canonical = filter.as_ref().map(|f| f.canonical.as_str());
        let stream = match rs
            .streams
            .iter_mut()
            .position(|s| s.filter.as_ref().map(|f| f.canonical.as_str()) == canonical)
        {
            Some(i) => &mut rs.streams[i],
            None => {
                rs.streams.push(Stream {
                    filter: filter.clone(),
                    live: Vec::new(),
                    members: 0,
                });
                rs.streams.last_mut().expect("just pushed")
            }
        };
        stream.members += 1;
        let stream_filter = stream.filter.clone();
        let prefix: Arc<str> =
            format!("{{\"type\":\"changes\",\"sub\":{},", request.sub_id_json).into();
        *st.grants
            .entry((request.relation, request.role.clone()))
            .or_insert(0) += 1;
        st.subs.insert(
            key,
            Subscription {
                outbox: request.outbox,
                relation: request.relation,
                filter: stream_filter,
                prefix,
                sub_id_json: request.sub_id_json,
                live: false,
                role: request.role,
                gate: Arc::new(tokio::sync::Mutex::new(true)),
            },
        );
        m::subscriptions(1);
        Ok((key, request.since.unwrap_or(head)))
    }

    /// Starts feeding a registered subscription from `after`.
    pub fn start(self: &Arc<Self>, key: SubKey, after: i64) {
        self.spawn_catch_up(key, after);
    }

    /// Whether a subscription is still in the hub (the hub ends those told to resync).
    pub fn is_subscribed(&self, key: SubKey) -> bool {
        self.state.lock().subs.contains_key(&key)
    }

    /// Ends a subscription whose connection closed.
    pub fn unsubscribe(&self, key: SubKey) -> bool {
        let mut st = self.state.lock();
        remove_sub(&mut st, key).is_some()
    }

    /// Ends a subscription and waits until its catch-up task (if any) can queue
    /// nothing more: the client's `unsubscribed` then comes after its last `changes`.
    pub async fn unsubscribe_and_wait(&self, key: SubKey) -> bool {
        let gate = {
            let mut st = self.state.lock();
            remove_sub(&mut st, key)
        };
        match gate {
            Some(gate) => {
                *gate.lock().await = false;
                true
            }
            None => false,
        }
    }

    /// The (table, role) pairs subscriptions were granted, for re-checking (sorted).
    pub fn grants(&self) -> Vec<(u32, Option<String>)> {
        let st = self.state.lock();
        let mut grants: Vec<(u32, Option<String>)> = st.grants.keys().cloned().collect();
        grants.sort();
        grants
    }

    /// Ends every subscription to `relation` granted to `role` with `forbidden`: the
    /// role lost the right to stream the table (SELECT revoked, row-level security
    /// enabled).
    pub fn revoke(&self, relation: u32, role: &Option<String>, reason: &str) -> usize {
        let ended: Vec<(Arc<tokio::sync::Mutex<bool>>, Outbox, String)> = {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            let keys: Vec<SubKey> = st
                .subs
                .iter()
                .filter(|(_, s)| s.relation == relation && s.role == *role)
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter()
                .filter_map(|key| {
                    let sub = st
                        .subs
                        .get(&key)
                        .map(|s| (s.outbox.clone(), s.sub_id_json.clone()))?;
                    remove_sub(st, key).map(|gate| (gate, sub.0, sub.1))
                })
                .collect()
        };
        let count = ended.len();
        for (gate, outbox, sub_id_json) in ended {
            let message = format!(
                "{{\"type\":\"error\",\"id\":{sub_id_json},\"code\":\"forbidden\",\"message\":{}}}",
                serde_json::to_string(reason).unwrap_or_else(|_| "\"forbidden\"".into())
            );
            self.runtime.spawn(async move {
                *gate.lock().await = false;
                let _ = outbox.send(Outbound::Text(message)).await;
            });
        }
        count
    }

    pub fn stats(&self) -> HubStats {
        let st = self.state.lock();
        let mut channels: Vec<ChannelStats> = st
            .relations
            .values()
            .map(|rs| {
                let subscriptions: usize = rs.streams.iter().map(|s| s.members).sum();
                let live: usize = rs.streams.iter().map(|s| s.live.len()).sum();
                ChannelStats {
                    channel: rs.channel.clone(),
                    subscriptions,
                    live,
                    catching_up: subscriptions - live,
                    streams: rs.streams.len(),
                    messages_sent: rs.messages_sent.load(Ordering::Relaxed),
                    changes_sent: rs.changes_sent.load(Ordering::Relaxed),
                }
            })
            .collect();
        channels.sort_by(|a, b| a.channel.cmp(&b.channel));
        HubStats {
            head: st.head,
            window_start: st.window.start(),
            window_changes: st.window.len_changes(),
            subscriptions: st.subs.len(),
            channels,
        }
    }

    fn spawn_catch_up(self: &Arc<Self>, key: SubKey, after: i64) {
        let hub = self.clone();
        self.runtime
            .spawn(async move { hub.catch_up(key, after).await });
    }

    /// Feeds one subscription from `after` until it has everything up to the head,
    /// then makes it live.
    async fn catch_up(self: Arc<Self>, key: SubKey, mut after: i64) {
        let started = Instant::now();
        let mut head_rx = self.head_tx.subscribe();
        loop {
            if started.elapsed() > self.limits.max_catch_up {
                self.end_with_resync(key).await;
                return;
            }
            enum Step {
                Window(Vec<Arc<Txn>>),
                Database,
                Wait,
            }
            let (step, outbox, prefix, filter, relation, gate) = {
                let mut guard = self.state.lock();
                let st = &mut *guard;
                let Some(sub) = st.subs.get(&key) else { return };
                let (outbox, prefix, filter, relation, gate) = (
                    sub.outbox.clone(),
                    sub.prefix.clone(),
                    sub.filter.clone(),
                    sub.relation,
                    sub.gate.clone(),
                );
                let head = st.head.unwrap_or(0);
                let step = if after == head {
                    // Caught up: live from here, under the lock publish takes.
                    if let Some(sub) = st.subs.get_mut(&key) {
                        sub.live = true;
                    }
                    let canonical = filter.as_ref().map(|f| f.canonical.as_str());
                    if let Some(stream) = st.relations.get_mut(&relation).and_then(|rs| {
                        rs.streams
                            .iter_mut()
                            .find(|s| s.filter.as_ref().map(|f| f.canonical.as_str()) == canonical)
                    }) {
                        stream.live.push(LiveSub {
                            key,
                            outbox,
                            prefix,
                        });
                    }
                    return;
                } else if after > head {
                    Step::Wait
                } else if st.window.covers(after) {
                    Step::Window(st.window.after(after, 256))
                } else {
                    Step::Database
                };
                (step, outbox, prefix, filter, relation, gate)
            };
            let txns = match step {
                Step::Wait => {
                    let wait = head_rx.wait_for(|h| *h >= after);
                    let remaining = self.limits.max_catch_up.saturating_sub(started.elapsed());
                    let _ = tokio::time::timeout(remaining, wait).await;
                    continue;
                }
                Step::Window(txns) => txns,
                Step::Database => match self.read_from_database(after).await {
                    Ok(txns) => txns,
                    Err(CatchUpError::Resync) => {
                        self.end_with_resync(key).await;
                        return;
                    }
                    Err(CatchUpError::Unavailable) => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            if txns.is_empty() {
                // Cannot be while the head is ahead (the log has what the hub
                // published); a read racing a restore: try again shortly.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            for txn in txns {
                if txn.last <= after {
                    continue;
                }
                let body = txn.table(relation).and_then(|table| {
                    body_for(
                        table,
                        None,
                        filter.as_deref(),
                        after,
                        txn.last,
                        self.limits.max_frame_bytes,
                    )
                });
                if let Some(body) = body {
                    let changes = body.changes as u64;
                    let remaining = self.limits.max_catch_up.saturating_sub(started.elapsed());
                    let send = async {
                        let open = gate.lock().await;
                        if !*open {
                            return Err(None); // unsubscribed meanwhile
                        }
                        outbox
                            .send(Outbound::Changes {
                                prefix: prefix.clone(),
                                body: Arc::new(body),
                            })
                            .await
                            .map_err(Some)
                    };
                    match tokio::time::timeout(remaining, send).await {
                        Ok(Err(None)) => return,
                        Ok(Ok(())) => m::changes_sent(changes),
                        Ok(Err(_)) => {
                            self.unsubscribe(key);
                            return;
                        }
                        Err(_) => {
                            self.end_with_resync(key).await;
                            return;
                        }
                    }
                }
                after = txn.last;
            }
        }
    }

    async fn read_from_database(&self, after: i64) -> Result<Vec<Arc<Txn>>, CatchUpError> {
        let page = self
            .pages
            .get(after, || async {
                let client = self.pool.get().await.map_err(|e| {
                    tracing::warn!(error = %e, "catch-up cannot get a database connection");
                    CatchUpError::Unavailable
                })?;
                match read_page(&client, after, PAGE_CHANGES).await {
                    Ok(txns) => {
                        m::catch_up_reads();
                        Ok(txns.into_iter().map(Arc::new).collect())
                    }
                    Err(e) if e.is_resync() => Err(CatchUpError::Resync),
                    Err(e) => {
                        tracing::warn!(error = %e, "catch-up read failed");
                        Err(CatchUpError::Unavailable)
                    }
                }
            })
            .await?;
        Ok(page.as_ref().clone())
    }

    async fn end_with_resync(&self, key: SubKey) {
        let sub = {
            let mut st = self.state.lock();
            let sub = st
                .subs
                .get(&key)
                .map(|s| (s.outbox.clone(), s.sub_id_json.clone()));
            remove_sub(&mut st, key).zip(sub)
        };
        if let Some((gate, (outbox, sub_id_json))) = sub {
            *gate.lock().await = false;
            m::resyncs();
            // However long the queue stays full: the client must hear it (or lose the
            // connection, and learn it when it resumes).
            let _ = outbox
                .send(Outbound::Text(resync_message(&sub_id_json)))
                .await;
        }
    }
}

enum CatchUpError {
    Resync,
    Unavailable,
}

/// Removes a subscription; returns its send gate.
fn remove_sub(st: &mut HubState, key: SubKey) -> Option<Arc<tokio::sync::Mutex<bool>>> {
    let sub = st.subs.remove(&key)?;
    m::subscriptions(-1);
    let grant = (sub.relation, sub.role.clone());
    if let Some(count) = st.grants.get_mut(&grant) {
        *count -= 1;
        if *count == 0 {
            st.grants.remove(&grant);
        }
    }
    if let Some(rs) = st.relations.get_mut(&sub.relation) {
        let canonical = sub.filter.as_ref().map(|f| f.canonical.as_str());
        if let Some(i) = rs
            .streams
            .iter()
            .position(|s| s.filter.as_ref().map(|f| f.canonical.as_str()) == canonical)
        {
            let stream = &mut rs.streams[i];
            stream.live.retain(|l| l.key != key);
            stream.members -= 1;
            if stream.members == 0 {
                rs.streams.swap_remove(i);
            }
        }
    }
    Some(sub.gate)
}

/// The entries of a table's changes after `after`, parsed (None: unreadable).
fn parse_entries(table: &TableChanges, after: i64) -> Vec<Option<Entry<'_>>> {
    table
        .changes
        .iter()
        .filter(|c| c.position > after)
        .map(|c| Entry::parse(&c.entry).ok())
        .collect()
}

/// The `changes` body of one table's changes after `after` in a transaction ending at
/// `last`, as a subscriber with `filter` receives them; None when nothing is for it.
/// `entries`, when given, are [`parse_entries`] of the same changes.
fn body_for(
    table: &TableChanges,
    entries: Option<&[Option<Entry<'_>>]>,
    filter: Option<&RowFilter>,
    after: i64,
    last: i64,
    max_bytes: usize,
) -> Option<ChangesBody> {
    let changes = table.changes.iter().filter(|c| c.position > after);
    let body = match filter {
        None => {
            let texts: Vec<&str> = changes.map(|c| &*c.json).collect();
            if texts.is_empty() {
                return None;
            }
            ChangesBody::build(last, texts, max_bytes)
        }
        Some(filter) => {
            let mut left: Vec<(usize, String)> = Vec::new();
            let mut chosen: Vec<&str> = Vec::new();
            let mut marks: Vec<Option<usize>> = Vec::new();
            for (i, change) in changes.enumerate() {
                let parsed;
                let entry = match entries {
                    Some(entries) => entries.get(i).and_then(Option::as_ref),
                    None => {
                        parsed = Entry::parse(&change.entry).ok();
                        parsed.as_ref()
                    }
                };
                let verdict = match entry {
                    Some(entry) => filter.verdict(change.op, entry),
                    None => Verdict::Send, // never withhold what cannot be read
                };
                match verdict {
                    Verdict::Send => {
                        chosen.push(&change.json);
                        marks.push(None);
                    }
                    Verdict::SendLeft => {
                        left.push((marks.len(), left_filter_json(&change.json)));
                        chosen.push("");
                        marks.push(Some(left.len() - 1));
                    }
                    Verdict::Skip => {}
                }
            }
            if chosen.is_empty() {
                return None;
            }
            let texts: Vec<&str> = chosen
                .iter()
                .zip(&marks)
                .map(|(text, mark)| match mark {
                    Some(i) => left[*i].1.as_str(),
                    None => *text,
                })
                .collect();
            ChangesBody::build(last, texts, max_bytes)
        }
    };
    Some(body)
}

/// `error` `resync_required` for a subscription.
pub fn resync_message(sub_id_json: &str) -> String {
    format!(
        "{{\"type\":\"error\",\"id\":{sub_id_json},\"code\":\"resync_required\",\"message\":\"the subscription fell outside the retained change log or could not catch up; take a snapshot and subscribe again from its position\"}}"
    )
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
