//! Snapshots: a table's current rows and the position they are valid at, read in pages
//! from a cursor in one REPEATABLE READ transaction.
//!
//! The position is read first, in the same snapshot: every transaction sequenced at or
//! before it committed before its sequencing tick did, so the rows show all of them. A
//! change after the position may already show too; its version tells the client that
//! it has it (versions only grow), so position + versions make snapshot and stream
//! meet without a gap. Rows are read as the client's role (privileges and row-level
//! security apply); the position as the bridge (the client's role cannot read the log).

use deadpool_postgres::Pool;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_postgres::IsolationLevel;

use super::catalog::TableInfo;
use super::{reader, session_role, PgError};
use crate::auth::Identity;
use crate::changelog::entry_object;
use crate::hub::RowFilter;

/// One page of rows, each `{"key": {...}, "version": n, "row": {...}}`.
#[derive(Debug)]
pub struct SnapshotPage {
    pub position: i64,
    pub rows: Vec<String>,
    pub last: bool,
}

/// Reads the table into `pages`. Stops early (Ok) when the receiver is gone.
pub async fn read(
    pool: &Pool,
    identity: &Identity,
    table: &TableInfo,
    filter: Option<&RowFilter>,
    page_rows: usize,
    pages: mpsc::Sender<SnapshotPage>,
) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    // First statement: fixes the snapshot, and the position with it.
    let position = reader::current_position(&tx).await?;
    session_role::enter(&tx, identity).await?;
    tx.batch_execute(&format!(
        "DECLARE livesync_snapshot NO SCROLL CURSOR FOR \
         SELECT (pg_catalog.to_jsonb(t.*) - '_livesync_version' - '_livesync_clocks')::text, t._livesync_version \
         FROM ONLY {} t",
        table.name.sql()
    ))
    .await?;
    let fetch = format!("FETCH {page_rows} FROM livesync_snapshot");
    loop {
        let rows = tx.query(&fetch, &[]).await?;
        let last = rows.len() < page_rows;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let text: &str = row.get(0);
            let version: i64 = row.get(1);
            if let Some(row) = snapshot_row(text, version, table, filter)? {
                out.push(row);
            }
        }
        if pages
            .send(SnapshotPage {
                position,
                rows: out,
                last,
            })
            .await
            .is_err()
            || last
        {
            break;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// One row as sent, or None when the filter excludes it.
fn snapshot_row(
    text: &str,
    version: i64,
    table: &TableInfo,
    filter: Option<&RowFilter>,
) -> Result<Option<String>, PgError> {
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| crate::changelog::EntryError::from_json(&e))?;
    let object = entry_object(raw)?;
    if let Some(filter) = filter {
        if !filter.matches_raw(object.get(&filter.column)) {
            return Ok(None);
        }
    }
    let mut out = String::with_capacity(text.len() + 64);
    out.push_str("{\"key\":{");
    for (i, column) in table.key_columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        crate::changelog::push_json_str(&mut out, column);
        out.push(':');
        out.push_str(object.get(column).map(|v| v.get()).unwrap_or("null"));
    }
    out.push_str("},\"version\":");
    crate::changelog::push_int(&mut out, version);
    out.push_str(",\"row\":");
    out.push_str(text);
    out.push('}');
    Ok(Some(out))
}
