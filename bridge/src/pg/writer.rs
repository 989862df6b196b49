//! Client writes: `livesync.write` / `livesync.write_batch` in a transaction of their
//! own, run as the client's identity; the result is returned only once the
//! transaction has committed. Also the cleanup endpoint's `livesync.compact`.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::{Map, Value};

use super::{session_role, PgError};
use crate::auth::Identity;
use crate::ws::protocol::Mutation;

/// Applies one mutation for `client_id`; returns `livesync.write`'s result object.
pub async fn write(
    pool: &Pool,
    identity: &Identity,
    client_id: &str,
    m: &Mutation,
) -> Result<Map<String, Value>, PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    session_role::enter(&tx, identity).await?;
    let statement = tx
        .prepare_cached(
            "SELECT livesync.write($1::text::regclass, $2, $3::jsonb, $4::jsonb, $5, $6::jsonb, $7, $8, $9)",
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
    let result: Value = row.get(0);
    tx.commit().await?;
    Ok(match result {
        Value::Object(map) => map,
        other => {
            let mut map = Map::new();
            map.insert("result".into(), other);
            map
        }
    })
}

/// Applies mutations in order (`livesync.write_batch`); one result per mutation.
pub async fn write_batch(
    pool: &Pool,
    identity: &Identity,
    client_id: &str,
    mutations: &[Mutation],
    all_or_nothing: bool,
) -> Result<Value, PgError> {
    let batch: Vec<Value> = mutations
        .iter()
        .map(|m| batch_entry(m, client_id))
        .collect();
    let batch = Value::Array(batch);
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    session_role::enter(&tx, identity).await?;
    let statement = tx
        .prepare_cached("SELECT livesync.write_batch($1::jsonb, $2)")
        .await?;
    let row = tx.query_one(&statement, &[&batch, &all_or_nothing]).await?;
    let results: Value = row.get(0);
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
