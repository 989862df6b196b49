//! Appending change rows to `livesync.changes`: heap inserts and index inserts
//! made directly, without the executor.
//!
//! Capture runs inside every write to a tracked table, so this is the hottest path
//! livesync has. Going through SPI cost an executor start-up, a plan-cache check, a
//! user switch and array packing per statement — more than the inserts themselves.
//! The log table is livesync's own, with no triggers, constraints or rules, so a
//! direct insert does everything Postgres would. Every index on the table is kept up
//! to date; one with expressions or a predicate is refused rather than skipped.

use crate::catalog::{index_oids, livesync_relation};
use crate::error::LivesyncError;
use pgrx::pg_sys;

/// One change, ready to be appended.
pub struct ChangeRow {
    pub op: u8,
    pub key: Option<pg_sys::Datum>,
    pub old: Option<pg_sys::Datum>,
    pub new: Option<pg_sys::Datum>,
    pub version: Option<i64>,
}

/// The columns of `livesync.changes`, in table order.
const COLUMNS: usize = 11;

/// Appends `rows` as the changes `first_ordinal`, `first_ordinal + 1`, ... of the
/// transaction `fxid`, made to `relation` by `actor` (for the client mutation
/// `origin`, when `livesync.write` made them).
///
/// # Safety
/// Must run inside a transaction; the datums in `rows` must be valid jsonb values.
pub unsafe fn append(
    relation: pg_sys::Oid,
    fxid: u64,
    first_ordinal: i32,
    actor: &str,
    origin: Option<&(String, i64)>,
    rows: &[ChangeRow],
) {
    unsafe {
        let Some(table_oid) = livesync_relation(c"changes") else {
            LivesyncError::NotInstalled.raise();
        };
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let table = pg_sys::table_open(table_oid, lock);
        let tupdesc = (*table).rd_att;
        if (*tupdesc).natts as usize != COLUMNS {
            LivesyncError::LogTableChanged.raise();
        }
        let indexes = open_indexes(table, lock);

        let actor_text = pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            actor.as_ptr().cast(),
            actor.len() as i32,
        ));
        let null = pg_sys::Datum::from(0usize);
        let (client_id, mutation_id) = match origin {
            Some((client_id, mutation_id)) => (
                Some(pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                    client_id.as_ptr().cast(),
                    client_id.len() as i32,
                ))),
                Some(pg_sys::Datum::from(*mutation_id)),
            ),
            None => (None, None),
        };
        for (i, row) in rows.iter().enumerate() {
            let mut values = [
                pg_sys::Datum::from(fxid),
                pg_sys::Datum::from(first_ordinal + i as i32),
                pg_sys::Datum::from(relation),
                pg_sys::Datum::from(row.op),
                row.key.unwrap_or(null),
                row.old.unwrap_or(null),
                row.new.unwrap_or(null),
                pg_sys::Datum::from(row.version.unwrap_or(0)),
                actor_text,
                client_id.unwrap_or(null),
                mutation_id.unwrap_or(null),
            ];
            let mut nulls = [
                false,
                false,
                false,
                false,
                row.key.is_none(),
                row.old.is_none(),
                row.new.is_none(),
                row.version.is_none(),
                false,
                client_id.is_none(),
                mutation_id.is_none(),
            ];
            let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::simple_heap_insert(table, tuple);
            for index in &indexes {
                index.insert(&values, &nulls, tuple, table);
            }
            pg_sys::heap_freetuple(tuple);
        }

        for index in indexes {
            pg_sys::index_close(index.relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        // Locks are kept until the end of the transaction, as for any insert.
        pg_sys::table_close(table, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

struct OpenIndex {
    relation: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
}

impl OpenIndex {
    unsafe fn insert(
        &self,
        values: &[pg_sys::Datum; COLUMNS],
        nulls: &[bool; COLUMNS],
        tuple: pg_sys::HeapTuple,
        table: pg_sys::Relation,
    ) {
        unsafe {
            let info = &*self.info;
            let keys = info.ii_NumIndexAttrs as usize;
            let mut key_values = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
            let mut key_nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
            for k in 0..keys {
                let column = info.ii_IndexAttrNumbers[k] as usize - 1;
                key_values[k] = values[column];
                key_nulls[k] = nulls[column];
            }
            let check = if info.ii_Unique {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
            } else {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
            };
            pg_sys::index_insert(
                self.relation,
                key_values.as_mut_ptr(),
                key_nulls.as_mut_ptr(),
                &mut (*tuple).t_self,
                table,
                check,
                false,
                self.info,
            );
        }
    }
}

unsafe fn open_indexes(table: pg_sys::Relation, lock: pg_sys::LOCKMODE) -> Vec<OpenIndex> {
    unsafe {
        let mut indexes = Vec::new();
        for oid in index_oids(table) {
            let relation = pg_sys::index_open(oid, lock);
            let info = pg_sys::BuildIndexInfo(relation);
            let plain = (*info).ii_Expressions.is_null()
                && (*info).ii_Predicate.is_null()
                && (0..(*info).ii_NumIndexAttrs as usize)
                    .all(|k| (*info).ii_IndexAttrNumbers[k] > 0);
            if !plain {
                LivesyncError::LogTableChanged.raise();
            }
            indexes.push(OpenIndex { relation, info });
        }
        indexes
    }
}
