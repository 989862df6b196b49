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
//! to date (`index_entries.rs`).
//! What opening needs besides locks (the index list, each index's `IndexInfo`) is
//! kept per backend (`LogLayout`) and forgotten on any invalidation of the table or
//! its indexes, as the relcache itself would be.

use crate::catalog::{index_oids, livesync_relation, Lent};
use crate::error::LivesyncError;
use crate::index_entries;
use crate::pg_resources::{ContextSize, OpenRelation, OwnedMemoryContext, PinnedBuffer};
use crate::row_json::JsonbBuilder;
use crate::sequencer;
use pgrx::pg_sys;
use std::cell::RefCell;

/// The columns of `livesync.changes`, in table order.
const COLUMNS: usize = 10;
/// `commit_seq`'s attribute number.
const COMMIT_SEQ_ATTNUM: i32 = 4;

/// Limits on one log row: a run of changes longer than either continues in a new
/// row. They bound the memory a huge statement holds at once and keep every row far
/// below jsonb's 256 MB limit; past a few hundred changes a longer row saves nothing.
const MAX_CHANGES_PER_ROW: i32 = 1000;
const MAX_BYTES_PER_ROW: usize = 8 << 20;

/// One statement's changes on their way into the log. Consecutive changes of one
/// kind are collected into a single jsonb array (`[key, old, new, version]` per
/// change, updates of a table with filter columns a fifth element) and written as
/// one log row, so a 100-row statement costs one heap insert
/// and one index insert, and TOAST compresses the batch as a whole.
pub struct StatementLog {
    relation: pg_sys::Oid,
    /// Opened at the first write: a statement that changed nothing opens nothing.
    appender: Option<LogAppender>,
    /// Holds the run being collected; reset after every row written.
    context: OwnedMemoryContext,
    run: Option<Run>,
}

struct Run {
    op: u8,
    entries: JsonbBuilder,
    count: i32,
}

impl StatementLog {
    pub fn new(relation: pg_sys::Oid) -> Self {
        // SAFETY: the current context (the trigger call's) outlives the statement's
        // log, which capture finishes or drops before it returns.
        let context = unsafe {
            OwnedMemoryContext::new(
                pg_sys::CurrentMemoryContext,
                c"livesync capture",
                ContextSize::Default,
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
        self.change_with_tail(op, version, &mut (), |_, out| fill(out), |_, _| {});
    }

    /// Adds one change as `change` does, and after its version whatever `tail`
    /// pushes (an update's filter columns). Both get `context` (what they push from).
    pub fn change_with_tail<C: ?Sized>(
        &mut self,
        op: u8,
        version: Option<i64>,
        context: &mut C,
        fill: impl FnOnce(&mut C, &mut JsonbBuilder),
        tail: impl FnOnce(&mut C, &mut JsonbBuilder),
    ) {
        if self.run.as_ref().is_some_and(|run| run.op != op) {
            self.write_run();
        }
        {
            // What the run's builder copies and the fills allocate goes into the run's
            // context, also when they raise.
            let _in_run = self.context.switch_to();
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
            fill(context, &mut run.entries);
            match version {
                Some(version) => run.entries.int_element(version),
                None => run.entries.null_element(),
            }
            tail(context, &mut run.entries);
            run.entries.end_array();
            run.count += 1;
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
        let appender = self.appender.get_or_insert_with(|| {
            let origin = crate::write::origin::current();
            // SAFETY: capture runs inside the writing statement's transaction; the
            // appender is closed by `finish` (or dropped by an error) within it.
            unsafe { LogAppender::open(self.relation, origin.as_ref()) }
        });
        {
            // Serialising, compressing and inserting all allocate in the run's
            // context too, so a statement of many runs holds one run's memory at a time.
            let _in_run = self.context.switch_to();
            run.entries.end_array();
            let entries = run.entries.finish();
            // SAFETY: `entries` was just built by a jsonb builder, as jsonb.
            unsafe { appender.append(run.op, run.count, entries) };
        }
        self.context.reset();
    }

    /// Writes what is left and closes the log (and deletes the run's context).
    pub fn finish(mut self) {
        self.write_run();
        if let Some(appender) = self.appender.take() {
            appender.close();
        }
    }
}

/// Appends log rows for one statement's changes to one relation. Opens the log
/// table and its indexes once, however many rows the statement writes.
struct LogAppender {
    table: OpenRelation,
    /// The open indexes, in the layout's order.
    indexes: Vec<OpenRelation>,
    layout: Lent<LogLayout>,
    relation: pg_sys::Oid,
    fxid: u64,
    actor: pg_sys::Datum,
    /// The client mutation `livesync.write` is applying, if any.
    client_id: Option<pg_sys::Datum>,
    mutation_id: Option<pg_sys::Datum>,
}

impl LogAppender {
    /// Opens the log for appending changes made to `relation` in the current
    /// transaction (for the client mutation `origin`, when `livesync.write` made
    /// them).
    ///
    /// # Safety
    /// Must run inside a transaction, and the appender be closed (or dropped) in it.
    unsafe fn open(relation: pg_sys::Oid, origin: Option<&(String, i64)>) -> Self {
        let Some(table_oid) = livesync_relation(c"changes") else {
            LivesyncError::NotInstalled.raise();
        };
        // SAFETY: inside a transaction (the caller's contract). The layout is taken
        // for the table just opened and locked, and its indexes are opened in the
        // same lock mode.
        unsafe {
            let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
            // Locking first: any invalidation of the table or its index list is
            // processed here, before the layout is looked at.
            let table = OpenRelation::table(table_oid, lock);
            if table.natts() != COLUMNS {
                LivesyncError::LogTableChanged.raise();
            }
            let layout = LogLayout::take(table.as_ptr(), lock);
            let indexes = layout
                .indexes
                .iter()
                .map(|index| OpenRelation::index(index.oid, lock))
                .collect();
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
                layout,
                relation,
                fxid: pg_sys::GetTopFullTransactionId().value,
                actor: crate::actor::current_text(),
                client_id,
                mutation_id,
            }
        }
    }

    /// Appends one log row: `count` changes of kind `op`, given as the jsonb array
    /// `entries` (one `[key, old, new, version]` array per change). They take the
    /// transaction's next `count` ordinals, and the row becomes the transaction's
    /// tail (the row its commit sequence goes into).
    ///
    /// # Safety
    /// `entries` must be a valid jsonb value.
    unsafe fn append(&mut self, op: u8, count: i32, entries: pg_sys::Datum) {
        let first_ordinal = sequencer::reserve_ordinals(count);
        // SAFETY: `entries` is jsonb (the caller's contract).
        let tid = unsafe { self.insert(first_ordinal, count, 0, op, entries) };
        sequencer::note_tail(tid);
    }

    /// Inserts one log row and its index entries; returns where it went.
    ///
    /// # Safety
    /// `entries` must be a valid jsonb value.
    unsafe fn insert(
        &mut self,
        ordinal: i32,
        count: i32,
        commit_seq: i64,
        op: u8,
        entries: pg_sys::Datum,
    ) -> pg_sys::ItemPointerData {
        // SAFETY: the table is open and has the ten columns the row is formed for
        // (checked at open), with values of their types (`entries` jsonb by the
        // caller's contract); the indexes are the table's, described by the layout.
        unsafe {
            let null = pg_sys::Datum::from(0usize);
            let mut values = [
                pg_sys::Datum::from(self.fxid),
                pg_sys::Datum::from(ordinal),
                pg_sys::Datum::from(count),
                pg_sys::Datum::from(commit_seq),
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
                false,
                self.client_id.is_none(),
                self.mutation_id.is_none(),
            ];
            let table = self.table.as_ptr();
            let tuple = pg_sys::heap_form_tuple(
                self.table.tuple_desc(),
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            // Large batches are compressed and, past a page's worth, moved to TOAST
            // by the heap insert itself.
            pg_sys::simple_heap_insert(table, tuple);
            for (index, described) in self.indexes.iter().zip(&self.layout.indexes) {
                index_entries::insert(
                    index.as_ptr(),
                    described.info,
                    table,
                    tuple,
                    &values,
                    &nulls,
                );
            }
            let tid = (*tuple).t_self;
            pg_sys::heap_freetuple(tuple);
            tid
        }
    }

    /// Closes the log table and its indexes (their locks are kept until the end of
    /// the transaction, as for any insert), and keeps the layout for the next
    /// statement. An appender dropped instead (an error unwound) leaves the closing
    /// to the abort and its layout to be rebuilt.
    fn close(self) {
        let LogAppender { layout, .. } = self;
        LogLayout::give_back(layout);
    }
}

/// Appends one log row of a single change (`entries` holds one entry) made to
/// `relation` outside a statement's capture (a schema change).
///
/// # Safety
/// Must run inside a transaction; `entries` must be a valid jsonb array.
pub unsafe fn append_one(relation: pg_sys::Oid, op: u8, entries: pg_sys::Datum) {
    let origin = crate::write::origin::current();
    // SAFETY: inside a transaction, `entries` jsonb (the caller's contract); the
    // appender is closed right here.
    unsafe {
        let mut appender = LogAppender::open(relation, origin.as_ref());
        appender.append(op, 1, entries);
        appender.close();
    }
}

/// Seals the current transaction's log just before it commits: writes its commit
/// sequence (the WAL insert position now) into its tail row, or, when a rolled-back
/// savepoint took the tail with it, into a commit marker row of no changes.
///
/// The sequence goes into an existing row in place (same length, WAL-logged by
/// `heap_inplace_update`): cheaper than a row of its own, and the row is this
/// transaction's, invisible to everyone else until it commits.
///
/// # Safety
/// Must run at PRE_COMMIT of a transaction that appended log rows.
pub unsafe fn seal(tail: Option<pg_sys::ItemPointerData>) {
    // SAFETY: at PRE_COMMIT, inside the transaction (the caller's contract). The row
    // at `tid` is this transaction's own log row: fetched with its buffer pinned,
    // copied before the pin goes, and updated in place with a value of the same
    // length. The table's column count is checked before its layout is relied on.
    unsafe {
        let commit_seq = pg_sys::GetXLogInsertRecPtr() as i64;
        match tail {
            Some(tid) => {
                let Some(table_oid) = livesync_relation(c"changes") else {
                    LivesyncError::NotInstalled.raise();
                };
                let table =
                    OpenRelation::table(table_oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
                if table.natts() != COLUMNS {
                    LivesyncError::LogTableChanged.raise();
                }
                let mut found = pg_sys::HeapTupleData {
                    t_self: tid,
                    ..std::mem::zeroed()
                };
                let mut buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
                let fetched = pg_sys::heap_fetch(
                    table.as_ptr(),
                    &raw mut pg_sys::SnapshotAnyData,
                    &mut found,
                    &mut buffer,
                    true,
                );
                // Pinned (or invalid) whether or not the row was found.
                let pin = PinnedBuffer::adopt(buffer);
                if !fetched {
                    LivesyncError::LogTableChanged.raise();
                }
                let copy = pg_sys::heap_copytuple(&mut found);
                drop(pin);
                let sealed = crate::row_json::with_int8(
                    copy,
                    table.tuple_desc(),
                    COMMIT_SEQ_ATTNUM,
                    commit_seq,
                );
                pg_sys::heap_inplace_update(table.as_ptr(), sealed);
                pg_sys::heap_freetuple(sealed);
                pg_sys::heap_freetuple(copy);
            }
            None => {
                let origin = crate::write::origin::current();
                let mut appender = LogAppender::open(pg_sys::InvalidOid, origin.as_ref());
                let empty = pgrx::JsonB(serde_json::Value::Array(Vec::new()));
                let entries = pgrx::IntoDatum::into_datum(empty).expect("jsonb has a datum");
                // Ordinal 0 is never a change's: the marker takes no position.
                appender.insert(0, 0, commit_seq, b'c', entries);
                appender.close();
            }
        }
    }
}

fn text_datum(text: &str) -> pg_sys::Datum {
    // SAFETY: the pointer and length describe `text`'s bytes, which the call copies.
    unsafe {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
            text.as_ptr().cast(),
            text.len() as i32,
        ))
    }
}

/// How `livesync.changes` is laid out for appending: its indexes and what
/// `index_insert` needs to know of each. Building it (the index list, `BuildIndexInfo`
/// per index) cost more than the index inserts of a single-row statement, so it is
/// kept per backend and lent out to one appender at a time.
struct LogLayout {
    table: pg_sys::Oid,
    indexes: Vec<LogIndex>,
    /// Holds the `IndexInfo`s; deleted with the layout.
    context: OwnedMemoryContext,
}

struct LogIndex {
    oid: pg_sys::Oid,
    info: *mut pg_sys::IndexInfo,
}

thread_local! {
    static LAYOUT: RefCell<Option<LogLayout>> = const { RefCell::new(None) };
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    // SAFETY: `forget` is a guarded callback of the type the relcache calls, and
    // `_PG_init` registers it once per process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0usize)) };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    LAYOUT.with(|layout| {
        let mut layout = layout.borrow_mut();
        let stale = layout.as_ref().is_some_and(|l| {
            relid == pg_sys::InvalidOid
                || relid == l.table
                || l.indexes.iter().any(|index| index.oid == relid)
        });
        if stale {
            layout.take();
        }
    });
}

impl LogLayout {
    /// The backend's layout of `table` (open and locked in `lock` mode), built if
    /// there is none.
    ///
    /// # Safety
    /// `table` must be open, and locked in `lock` mode.
    unsafe fn take(table: pg_sys::Relation, lock: pg_sys::LOCKMODE) -> Lent<LogLayout> {
        let cached = LAYOUT.with(|layout| layout.borrow_mut().take());
        // SAFETY: `table` is open (the caller's contract).
        let relid = unsafe { (*table).rd_id };
        let layout = match cached {
            Some(layout) if layout.table == relid => layout,
            // SAFETY: `table` is open and locked in `lock` mode (the caller's contract).
            _ => unsafe { LogLayout::build(table, lock) },
        };
        Lent::new(layout)
    }

    /// Keeps a lent layout for the next statement, unless an invalidation arrived
    /// while it was out (it may describe indexes that have changed since).
    fn give_back(lent: Lent<LogLayout>) {
        if let Some(layout) = lent.give_back() {
            LAYOUT.with(|cached| *cached.borrow_mut() = Some(layout));
        }
    }

    /// # Safety
    /// `table` must be open, and locked in `lock` mode.
    unsafe fn build(table: pg_sys::Relation, lock: pg_sys::LOCKMODE) -> LogLayout {
        // SAFETY: CacheMemoryContext lives as long as the backend. Owned from here:
        // dropping the layout (also when a check below raises) deletes the context,
        // which no abort would.
        let context = unsafe {
            OwnedMemoryContext::new(
                pg_sys::CacheMemoryContext,
                c"livesync log layout",
                ContextSize::Small,
            )
        };
        let mut layout = LogLayout {
            // SAFETY: `table` is open (the caller's contract).
            table: unsafe { (*table).rd_id },
            indexes: Vec::new(),
            context,
        };
        // SAFETY: `table` is open (the caller's contract) and each of its indexes is
        // opened, in the table's lock mode, for as long as it is described.
        unsafe {
            for oid in index_oids(table) {
                let index = OpenRelation::index(oid, lock);
                let info = index_entries::plain_index_info(index.as_ptr(), layout.context.as_ptr());
                layout.indexes.push(LogIndex { oid, info });
            }
        }
        layout
    }
}
