//! Appending rows to `livesync.changes`: heap inserts and index inserts made
//! directly, without the executor. One log row carries a run of changes (see
//! `capture.rs`), so a 100-row statement costs one insert, not a hundred.
//!
//! Capture runs inside every write to a tracked table, so this is the hottest path
//! livesync has. Going through SPI cost an executor start-up, a plan-cache check, a
//! user switch and array packing per statement — more than the inserts themselves.
//! The log table is livesync's own, with no triggers, constraints or rules, so a
//! direct insert does everything Postgres would. Every index on the table is kept up
//! to date; one with expressions or a predicate is refused rather than skipped.

use crate::catalog::{index_oids, livesync_relation};
use crate::error::LivesyncError;
use crate::sequencer;
use pgrx::pg_sys;

/// The columns of `livesync.changes`, in table order.
const COLUMNS: usize = 9;

/// Appends log rows for one statement's changes to one relation. Opens the log
/// table and its indexes once, however many rows the statement writes.
pub struct LogAppender {
    table: pg_sys::Relation,
    indexes: Vec<OpenIndex>,
    relation: pg_sys::Oid,
    fxid: u64,
    actor: pg_sys::Datum,
    /// The client mutation `livesync.write` is applying, if any.
    client_id: Option<pg_sys::Datum>,
    mutation_id: Option<pg_sys::Datum>,
}

impl LogAppender {
    /// Opens the log for appending changes made to `relation` by `actor` in the
    /// current transaction (for the client mutation `origin`, when
    /// `livesync.write` made them).
    ///
    /// # Safety
    /// Must run inside a transaction; call `close` when done.
    pub unsafe fn open(relation: pg_sys::Oid, actor: &str, origin: Option<&(String, i64)>) -> Self {
        unsafe {
            let Some(table_oid) = livesync_relation(c"changes") else {
                LivesyncError::NotInstalled.raise();
            };
            let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
            let table = pg_sys::table_open(table_oid, lock);
            if (*(*table).rd_att).natts as usize != COLUMNS {
                LivesyncError::LogTableChanged.raise();
            }
            let indexes = open_indexes(table, lock);
            let (client_id, mutation_id) = match origin {
                Some((client_id, mutation_id)) => (
                    Some(text_datum(client_id)),
                    Some(pg_sys::Datum::from(*mutation_id)),
                ),
                None => (None, None),
            };
            LogAppender {
                table,
                indexes,
                relation,
                fxid: pg_sys::GetTopFullTransactionId().value,
                actor: text_datum(actor),
                client_id,
                mutation_id,
            }
        }
    }

    /// Appends one log row: `count` changes of kind `op`, given as the jsonb array
    /// `entries` (one `[key, old, new, version]` array per change). They take the
    /// transaction's next `count` ordinals.
    ///
    /// # Safety
    /// `entries` must be a valid jsonb value.
    pub unsafe fn append(&mut self, op: u8, count: i32, entries: pg_sys::Datum) {
        unsafe {
            let first_ordinal = sequencer::reserve_ordinals(count);
            let null = pg_sys::Datum::from(0usize);
            let mut values = [
                pg_sys::Datum::from(self.fxid),
                pg_sys::Datum::from(first_ordinal),
                pg_sys::Datum::from(count),
                pg_sys::Datum::from(self.relation),
                pg_sys::Datum::from(op),
                entries,
                self.actor,
                self.client_id.unwrap_or(null),
                self.mutation_id.unwrap_or(null),
            ];
            let mut nulls = [
                false,
                false,
                false,
                false,
                false,
                false,
                false,
                self.client_id.is_none(),
                self.mutation_id.is_none(),
            ];
            let tupdesc = (*self.table).rd_att;
            let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
            // Large batches are compressed and, past a page's worth, moved to TOAST
            // by the heap insert itself.
            pg_sys::simple_heap_insert(self.table, tuple);
            for index in &self.indexes {
                index.insert(&values, &nulls, tuple, self.table);
            }
            pg_sys::heap_freetuple(tuple);
        }
    }

    /// Closes the log table; its lock is kept until the end of the transaction, as
    /// for any insert.
    pub fn close(self) {
        unsafe {
            for index in self.indexes {
                pg_sys::index_close(index.relation, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
            pg_sys::table_close(self.table, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
    }
}

fn text_datum(text: &str) -> pg_sys::Datum {
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            text.as_ptr().cast(),
            text.len() as i32,
        ))
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
