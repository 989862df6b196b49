//! Client writes: `livesync.write` / `livesync.write_batch` in a transaction of their
//! own, run as the client's identity; the result is returned only once the
//! transaction has committed. Also the cleanup endpoint's `livesync.compact`.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{Map, Value};

use super::{session_role, PgError};
use crate::auth::Identity;
use crate::ws::protocol::Mutation;

/// `livesync.write`'s result, kept as the JSON text the database gave (never parsed
/// whole: a row may hold JSON nested deeper than a parser's recursion limit).
#[derive(Debug)]
pub struct WriteResult {
    text: String,
    status: Option<String>,
}

impl WriteResult {
    /// The metrics label of its `status`.
    pub fn status(&self) -> &'static str {
        status_label(self.status.as_deref())
    }

    /// `{"type": "write_result", "id": …, …the result's fields}`.
    pub fn message(&self, id: &Value) -> String {
        let fields = self
            .text
            .trim()
            .strip_prefix('{')
            .unwrap_or("}")
            .trim_start();
        let comma = if fields.starts_with('}') { "" } else { "," };
        format!("{{\"type\":\"write_result\",\"id\":{id}{comma}{fields}")
    }
}

/// `livesync.write_batch`'s results, as text.
#[derive(Debug)]
pub struct BatchResults {
    text: String,
    statuses: Vec<Option<String>>,
}

impl BatchResults {
    pub fn statuses(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.statuses.iter().map(|s| status_label(s.as_deref()))
    }

    /// `{"type": "write_batch_result", "id": …, "results": [...]}`.
    pub fn message(&self, id: &Value) -> String {
        format!(
            "{{\"type\":\"write_batch_result\",\"id\":{id},\"results\":{}}}",
            self.text
        )
    }

    /// The results array, as JSON text.
    pub fn json(&self) -> &str {
        &self.text
    }
}

fn status_label(status: Option<&str>) -> &'static str {
    match status {
        Some("applied") => "applied",
        Some("merged") => "merged",
        Some("conflict") => "conflict",
        Some("rejected") => "rejected",
        _ => "other",
    }
}

/// Applies one mutation for `client_id`; returns `livesync.write`'s result.
pub async fn write(
    pool: &Pool,
    identity: &Identity,
    client_id: &str,
    m: &Mutation,
) -> Result<WriteResult, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    session_role::enter(&tx, identity).await?;
    let statement = tx
        .prepare_cached(
            "SELECT r::text, r ->> 'status' FROM livesync.write($1::text::regclass, $2, $3::jsonb, $4::jsonb, $5, $6::jsonb, $7, $8, $9) AS r",
        )
        .await?;
    let row = tx
        .query_one(
            &statement,
            &[
                &m.table,
                &m.op,
                &m.key,
                &m.values,
                &m.base_version,
                &m.base_values,
                &client_id,
                &m.mutation_id,
                &m.hlc,
            ],
        )
        .await?;
    let result = WriteResult {
        text: row.get(0),
        status: row.get(1),
    };
    tx.commit().await?;
    Ok(result)
}

/// Applies mutations in order (`livesync.write_batch`); one result per mutation.
pub async fn write_batch(
    pool: &Pool,
    identity: &Identity,
    client_id: &str,
    mutations: &[Mutation],
    all_or_nothing: bool,
) -> Result<BatchResults, PgError> {
    let batch: Vec<Value> = mutations
        .iter()
        .map(|m| batch_entry(m, client_id))
        .collect();
    let batch = Value::Array(batch);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    session_role::enter(&tx, identity).await?;
    let statement = tx
        .prepare_cached(
            "SELECT r::text, ARRAY(SELECT e ->> 'status' FROM pg_catalog.jsonb_array_elements(r) AS e) \
             FROM livesync.write_batch($1::jsonb, $2) AS r",
        )
        .await?;
    let row = tx.query_one(&statement, &[&batch, &all_or_nothing]).await?;
    let results = BatchResults {
        text: row.get(0),
        statuses: row.get(1),
    };
    tx.commit().await?;
    Ok(results)
}

/// A mutation in `livesync.write_batch`'s shape.
fn batch_entry(m: &Mutation, client_id: &str) -> Value {
    let mut entry = Map::new();
    entry.insert("rel".into(), m.table.clone().into());
    entry.insert("op".into(), m.op.clone().into());
    entry.insert("key".into(), m.key.clone());
    if let Some(values) = &m.values {
        entry.insert("new_values".into(), values.clone());
    }
    if let Some(v) = m.base_version {
        entry.insert("base_version".into(), v.into());
    }
    if let Some(v) = &m.base_values {
        entry.insert("base_values".into(), v.clone());
    }
    entry.insert("client_id".into(), client_id.into());
    entry.insert("mutation_id".into(), m.mutation_id.into());
    if let Some(hlc) = &m.hlc {
        entry.insert("hlc".into(), hlc.clone().into());
    }
    Value::Object(entry)
}

/// `livesync.compact(retention)`: how many changes it removed.
pub async fn compact(pool: &Pool, retention: Duration) -> Result<i64, PgError> {
    let client = pool.get().await?;
    let interval = format!("{} seconds", retention.as_secs());
    let row = client
        .query_one("SELECT livesync.compact($1::text::interval)", &[&interval])
        .await?;
    Ok(row.get(0))
}
