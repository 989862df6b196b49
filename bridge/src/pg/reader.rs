//! Reading the change log: pages of whole transactions from `livesync.change_runs`
//! (the stored runs, exploded here, not per change in SQL), and the [`LogFollower`]
//! that reads once per node on every doorbell ring, safety poll and reconnect and
//! hands each transaction to the hub.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::GenericClient;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;

use super::PgError;
use crate::changelog::{change_json, Change, Entry, Op, RunHeader, TableChanges, TableName, Txn};
use crate::hub::FanoutHub;
use crate::metrics as m;

/// Changes per page read from the database.
pub const PAGE_CHANGES: i32 = 10_000;

const PAGE_SQL: &str = "SELECT first_position, tx_first_position, tx_last_position, relation, \
    schema_name, table_name, op, entries, actor, tx, to_json(committed_at)::text, \
    (extract(epoch FROM committed_at) * 1000000)::int8, client_id, mutation_id \
    FROM livesync.change_runs($1, $2)";

/// Reads the whole transactions committed after `after`, up to about `max_changes`
/// changes (the first transaction always whole). Empty when there is nothing newer.
pub async fn read_page<C: GenericClient>(
    client: &C,
    after: i64,
    max_changes: i32,
) -> Result<Vec<Txn>, PgError> {
    let statement = client.prepare_cached(PAGE_SQL).await?;
    let rows = client.query(&statement, &[&after, &max_changes]).await?;
    let mut txns: Vec<Txn> = Vec::new();
    let mut names: Vec<(u32, Option<Arc<TableName>>)> = Vec::new();
    for row in &rows {
        let first_position: i64 = row.get(0);
        let tx_first: i64 = row.get(1);
        let tx_last: i64 = row.get(2);
        let relation: u32 = row.get(3);
        let op_code: i8 = row.get(6);
        let Some(op) = Op::from_code(op_code) else {
            continue; // a kind this bridge does not know (a newer extension): skip it
        };
        let Json(entries): Json<&RawValue> = row.get(7);
        let committed_at_json: String = row.get(10);
        let header = RunHeader {
            op,
            actor: row.get(8),
            tx: row.get(9),
            committed_at_json: &committed_at_json,
            client_id: row.get(12),
            mutation_id: row.get(13),
        };
        let same_txn = txns.last().is_some_and(|t| t.last == tx_last);
        if !same_txn {
            txns.push(Txn {
                after: after.max(tx_first - 1),
                last: tx_last,
                tx: header.tx,
                committed_at_micros: row.get(11),
                tables: Vec::new(),
            });
        }
        let txn = txns.last_mut().expect("pushed above");
        let name = match names.iter().find(|(r, _)| *r == relation) {
            Some((_, name)) => name.clone(),
            None => {
                let schema: Option<String> = row.get(4);
                let table: Option<String> = row.get(5);
                let name = schema
                    .zip(table)
                    .map(|(schema, table)| Arc::new(TableName { schema, table }));
                names.push((relation, name.clone()));
                name
            }
        };
        let table_index = match txn.tables.iter().position(|t| t.relation == relation) {
            Some(i) => i,
            None => {
                txn.tables.push(TableChanges {
                    relation,
                    name,
                    changes: Vec::new(),
                });
                txn.tables.len() - 1
            }
        };
        let changes = &mut txn.tables[table_index].changes;
        let elements: Vec<&RawValue> = serde_json::from_str(entries.get())
            .map_err(|e| crate::changelog::EntryError::from_json(&e))?;
        changes.reserve(elements.len());
        for (i, element) in elements.into_iter().enumerate() {
            let position = first_position + i as i64;
            if position <= after {
                continue;
            }
            let entry = Entry::parse(element)?;
            let mut json = String::with_capacity(element.get().len() + 160);
            change_json(position, &header, &entry, &mut json);
            changes.push(Change {
                position,
                op,
                json: json.into_boxed_str(),
                entry: element.to_owned(),
            });
        }
    }
    // Runs come in position order within a transaction; a table's changes stay in it.
    Ok(txns)
}

/// The newest position readers can see (`livesync.current_position()`).
pub async fn current_position<C: GenericClient>(client: &C) -> Result<i64, PgError> {
    let statement = client
        .prepare_cached("SELECT livesync.current_position()")
        .await?;
    Ok(client.query_one(&statement, &[]).await?.get(0))
}

/// What the follower reports for `/ready` and `/api/v1/sync/stats`.
#[derive(Debug, Default)]
pub struct FollowerStatus {
    /// The reader's connection works and its last read succeeded.
    pub reading: AtomicBool,
    /// The position the hub has been given everything up to.
    pub position: AtomicI64,
    /// The newest position the database has announced (doorbell payloads, reads).
    pub newest_seen: AtomicI64,
}

impl FollowerStatus {
    pub fn lag(&self) -> i64 {
        (self.newest_seen.load(Ordering::Relaxed) - self.position.load(Ordering::Relaxed)).max(0)
    }
}

/// The node's one reader of the log.
pub struct LogFollower {
    pub database_url: String,
    pub hub: Arc<FanoutHub>,
    /// Rung by the doorbell listener (and on its reconnects).
    pub wake: Arc<Notify>,
    pub poll_interval: Duration,
    pub status: Arc<FollowerStatus>,
}

impl LogFollower {
    /// Reads until cancelled: connects (again after any failure, with backoff), then
    /// reads everything new on every wake-up and every poll interval.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            match self.follow(&cancel).await {
                Ok(()) => return,
                Err(e) => {
                    self.status.reading.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "log reader failed; reconnecting");
                    m::reader_errors();
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn follow(&self, cancel: &CancellationToken) -> Result<(), PgError> {
        // A pool of one: the reader's own connection, with its prepared statements.
        let pool = super::pool(&self.database_url, 1)?;
        let client = pool.get().await?;
        if self.hub.head().is_none() {
            // First start: live from now on; older positions are served from the log.
            let now = current_position(&client).await?;
            self.hub.start_at(now);
            self.status.position.store(now, Ordering::Relaxed);
            self.status.newest_seen.fetch_max(now, Ordering::Relaxed);
        }
        // Prepared ahead, so the page read and the access check pipeline in order.
        client.prepare_cached(PAGE_SQL).await?;
        super::catalog::prepare_stream_access(&client).await?;
        self.status.reading.store(true, Ordering::Relaxed);
        tracing::info!(
            position = self.hub.head().unwrap_or(0),
            "log reader connected"
        );
        loop {
            self.catch_up(&client).await?;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    /// Reads pages until the log has nothing newer.
    async fn catch_up(&self, client: &deadpool_postgres::Client) -> Result<(), PgError> {
        loop {
            let after = self.hub.head().unwrap_or(0);
            // Before a page goes out: do the roles subscribed still have the right to
            // stream their tables? The check is sent right behind the read on the
            // same connection (one round trip for both; both statements are prepared,
            // so each is sent when first polled, in this order), so it sees every
            // REVOKE or `ENABLE ROW LEVEL SECURITY` committed before the page's
            // changes were read, and ends those subscriptions (`forbidden`) before a
            // single one of the changes reaches them.
            let grants = self.hub.grants();
            let check = async {
                if grants.is_empty() {
                    Ok(Vec::new())
                } else {
                    super::catalog::stream_access_many(client, &grants).await
                }
            };
            let (page, access) = tokio::join!(read_page(client, after, PAGE_CHANGES), check);
            let page = match page {
                Ok(page) => page,
                Err(e) if e.is_resync() => {
                    // Our position left the retained log (compaction passed a reader
                    // that was down, or the log was reset): every subscriber must
                    // resync; continue from the newest position.
                    let now = current_position(client).await?;
                    tracing::error!(after, now, "the reader's position is outside the retained log; subscribers must resync");
                    self.hub.reset_at(now);
                    self.status.position.store(now, Ordering::Relaxed);
                    // Not fetch_max: after a reset the old newest position means nothing.
                    self.status.newest_seen.store(now, Ordering::Relaxed);
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.status.reading.store(true, Ordering::Relaxed);
            let Some(last) = page.last().map(|t| t.last) else {
                let newest = self.status.position.load(Ordering::Relaxed);
                self.status.newest_seen.fetch_max(newest, Ordering::Relaxed);
                return Ok(());
            };
            let count = page.iter().map(Txn::change_count).sum::<usize>();
            m::changes_read(count as u64);
            // A failed check fails the connection too; reconnecting reads the page
            // again.
            super::catalog::revoke_lost(&self.hub, &grants, &access?);
            for txn in page {
                self.hub.publish(Arc::new(txn));
            }
            self.status.position.store(last, Ordering::Relaxed);
            self.status.newest_seen.fetch_max(last, Ordering::Relaxed);
        }
    }
}
