//! Appending a statement's changes to `livesync.changes`: collected into runs
//! (`StatementLog`), one log row per run, written with heap and index inserts made
//! directly, without the executor (`LogAppender`). A 100-row statement costs one
//! insert, not a hundred.
//!
//! Capture runs inside every write to a tracked table, so this is the hottest path
//! livesync has. Going through SPI cost an executor start-up, a plan-cache check, a
//! user switch and array packing per statement — more than the inserts themselves.
//! The log table is livesync's own, with no triggers, constraints or rules, so a
//! direct insert does everything Postgres would. Every index on the table is kept up
//! to date; one with expressions or a predicate is refused rather than skipped.

use crate::catalog::{index_oids, livesync_relation};
use crate::error::LivesyncError;
use crate::row_json::JsonbBuilder;
use crate::sequencer;
use pgrx::pg_sys;

/// The columns of `livesync.changes`, in table order.
const COLUMNS: usize = 9;

/// Limits on one log row: a run of changes longer than either continues in a new
/// row. They bound the memory a huge statement holds at once and keep every row far
/// below jsonb's 256 MB limit; past a few hundred changes a longer row saves nothing.
const MAX_CHANGES_PER_ROW: i32 = 1000;
const MAX_BYTES_PER_ROW: usize = 8 << 20;

/// One statement's changes on their way into the log. Consecutive changes of one
/// kind are collected into a single jsonb array (`[key, old, new, version]` per
/// change) and written as one log row, so a 100-row statement costs one heap insert
/// and one index insert, and TOAST compresses the batch as a whole.
pub struct StatementLog {
    relation: pg_sys::Oid,
    /// Opened at the first write: a statement that changed nothing opens nothing.
    appender: Option<LogAppender>,
    /// Holds the run being collected; reset after every row written.
    context: pg_sys::MemoryContext,
    run: Option<Run>,
}

struct Run {
    op: u8,
    entries: JsonbBuilder,
    count: i32,
}

impl StatementLog {
    pub fn new(relation: pg_sys::Oid) -> Self {
        let context = unsafe {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::CurrentMemoryContext,
                c"livesync capture".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        StatementLog {
            relation,
            appender: None,
            context,
            run: None,
        }
    }

    /// Adds one change: `fill` pushes its key, old and new values (objects, or
    /// nulls where a kind of change has none).
    pub fn change(&mut self, op: u8, version: Option<i64>, fill: impl FnOnce(&mut JsonbBuilder)) {
        if self.run.as_ref().is_some_and(|run| run.op != op) {
            self.write_run();
        }
        unsafe {
            let outer = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = self.context;
            let run = self.run.get_or_insert_with(|| {
                let mut entries = JsonbBuilder::new();
                entries.begin_array();
                Run {
                    op,
                    entries,
                    count: 0,
                }
            });
            run.entries.begin_array();
            fill(&mut run.entries);
            match version {
                Some(version) => run.entries.int_element(version),
                None => run.entries.null_element(),
            }
            run.entries.end_array();
            run.count += 1;
            pg_sys::CurrentMemoryContext = outer;
        }
        let run = self.run.as_ref().expect("a run was just extended");
        if run.count >= MAX_CHANGES_PER_ROW || run.entries.size() >= MAX_BYTES_PER_ROW {
            self.write_run();
        }
    }

    fn write_run(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        unsafe {
            let appender = self.appender.get_or_insert_with(|| {
                let actor = crate::gucs::current_actor();
                let origin = crate::write::origin::current();
                LogAppender::open(self.relation, &actor, origin.as_ref())
            });
            // Serialising, compressing and inserting all allocate in the run's
            // context too, so a statement of many runs holds one run's memory at a time.
            let outer = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = self.context;
            run.entries.end_array();
            let entries = run.entries.finish();
            appender.append(run.op, run.count, entries);
            pg_sys::CurrentMemoryContext = outer;
            pg_sys::MemoryContextReset(self.context);
        }
    }

    /// Writes what is left and closes the log.
    pub fn finish(mut self) {
        self.write_run();
        if let Some(appender) = self.appender.take() {
            appender.close();
        }
        unsafe { pg_sys::MemoryContextDelete(self.context) };
    }
}

/// Appends log rows for one statement's changes to one relation. Opens the log
/// table and its indexes once, however many rows the statement writes.
struct LogAppender {
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
    unsafe fn open(relation: pg_sys::Oid, actor: &str, origin: Option<&(String, i64)>) -> Self {
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
    unsafe fn append(&mut self, op: u8, count: i32, entries: pg_sys::Datum) {
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
    fn close(self) {
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
