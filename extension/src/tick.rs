//! One sequencing tick (what a tick is, and why it is correct, is in
//! `sequencer.rs`; who runs it is decided there and in `worker.rs`): the sequencer
//! lock, the snapshot, the positions given out with direct index scans and heap
//! writes, and the doorbell.
//!
//! It was one SQL statement (a chain of CTEs) run through SPI. Under load the worker
//! ticks about a hundred times a second, and that statement cost ~0.5 ms of executor
//! start-up, plan-cache checks and tuplestores per tick plus ~3 us per transaction
//! sequenced: 12 us of worker CPU per committed transaction with
//! `synchronous_commit = on`, a third of what capture cost in all. Here a tick reads
//! the state row, walks the log's primary key over the new transactions, and writes
//! one `batches` row and the new state, nothing else.
//!
//! Everything is read with the tick's snapshot S, taken under the sequencer lock.
//! livesync's tables are its own (no triggers, rules or constraints but their
//! keys), so direct writes do everything Postgres would.

use crate::catalog::livesync_relation;
use crate::error::LivesyncError;
use crate::index_entries;
use crate::pg_resources::{OpenRelation, RegisteredSnapshot};
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::collections::HashMap;

/// `livesync._sequencer`'s columns: only_row, snapshot, sequenced.
const SEQUENCER_COLUMNS: usize = 3;
/// `livesync.batches`' columns: last_position, first_position, txs, firsts, committed_at.
const BATCH_COLUMNS: usize = 5;

/// What a tick that gave out positions did.
pub struct Ticked {
    /// How many transactions it sequenced.
    pub transactions: usize,
}

/// Runs one tick in the current transaction: takes the sequencer lock and the
/// snapshot S, gives out positions, and queues the doorbell if it gave any.
///
/// # Safety
/// Must run inside a transaction, in a database where livesync is installed.
pub unsafe fn run() -> Option<Ticked> {
    // SAFETY: inside a transaction (the caller's contract); the positions are given
    // out with the sequencer lock held and the snapshot registered, as
    // `assign_positions` requires.
    unsafe {
        let Some(batches) = livesync_relation(c"batches") else {
            // The extension was dropped in this very transaction: nothing to sequence.
            return None;
        };
        // A committing transaction waits for the lock whatever its lock_timeout:
        // failing here would fail the COMMIT of work that is already done.
        {
            let _no_timeout = NoLockTimeout::set();
            pg_sys::LockRelationOid(batches, pg_sys::ExclusiveLock as pg_sys::LOCKMODE);
        }
        // Taking the lock read the invalidations, which forget livesync's relations:
        // the extension may have been dropped while this waited (the worker, mid-tick,
        // behind a DROP EXTENSION). Nothing to sequence then.
        if livesync_relation(c"batches") != Some(batches) {
            return None;
        }
        // Our own changes must be visible to the tick's snapshot, and the snapshot must
        // be newer than the previous tick's whatever this transaction's isolation level.
        pg_sys::CommandCounterIncrement();
        let snapshot = RegisteredSnapshot::latest();
        // One past our own xid when we have one (the commit-time tick includes its own
        // transaction), else 0.
        let own = pg_sys::GetTopFullTransactionIdIfAny().value;
        let bound = if own == 0 { 0 } else { own + 1 };
        let ticked =
            crate::owner::as_bootstrap_superuser(|| assign_positions(snapshot.as_ptr(), bound));
        drop(snapshot);
        let (position, transactions) = ticked?;
        // Delivered by Postgres only if this transaction commits, in commit order.
        let payload = position.to_string();
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &["livesync".into_datum(), payload.as_str().into_datum()],
        );
        Some(Ticked { transactions })
    }
}

/// Sets `lock_timeout` to 0 until dropped (also when an error unwinds past it).
struct NoLockTimeout {
    saved: i32,
}

impl NoLockTimeout {
    fn set() -> Self {
        // SAFETY: the backend's lock_timeout variable, read and written only by this
        // (single-threaded) process; 0 is a valid setting (no timeout).
        let saved = unsafe {
            let saved = pg_sys::LockTimeout;
            pg_sys::LockTimeout = 0;
            saved
        };
        NoLockTimeout { saved }
    }
}

impl Drop for NoLockTimeout {
    fn drop(&mut self) {
        // Restored while a panic unwinds too: it is a plain store, no Postgres call,
        // and the abort does not restore a variable set behind the GUC machinery.
        // SAFETY: as in `set`; `saved` was the setting's value.
        unsafe { pg_sys::LockTimeout = self.saved };
    }
}

/// Runs a tick's reads and writes with snapshot S. `own_bound` is one past the
/// ticking transaction's own xid when it has one (a commit-time tick includes its
/// own transaction, which S does not yet show as committed), else 0. Returns the
/// last position handed out and how many transactions got positions, or None when
/// no transaction became visible.
///
/// # Safety
/// Must run inside a transaction holding the sequencer lock; `snapshot` registered.
unsafe fn assign_positions(snapshot: pg_sys::Snapshot, own_bound: u64) -> Option<(i64, usize)> {
    // SAFETY: in a transaction holding the sequencer lock, with `snapshot` registered
    // (the caller's contract): what every read and write below needs. The relations
    // opened are livesync's own, whose layout is checked before it is relied on.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let state_rel = OpenRelation::table(relation(c"_sequencer"), lock);
        let previous = StateRow::read(&state_rel, snapshot);

        // S as a pg_snapshot (full xids), which is also what gets stored.
        pg_sys::PushActiveSnapshot(snapshot);
        let current = pgrx::direct_function_call_as_datum(pg_sys::pg_current_snapshot, &[])
            .expect("pg_current_snapshot returns a value");
        pg_sys::PopActiveSnapshot();
        let current_xmax = snapshot_xmax_xip(current).0;

        let fresh = scan_new_transactions(snapshot, &previous, current_xmax.max(own_bound));
        if fresh.is_empty() {
            return None;
        }

        let total: i64 = fresh.iter().map(|tx| tx.count).sum();
        let sequence = relation(c"position_seq");
        let first = crate::catalog::nextval(sequence);
        let last = first + total - 1;
        pgrx::direct_function_call_as_datum(
            pg_sys::setval_oid,
            &[sequence.into_datum(), last.into_datum()],
        );

        let mut txs = Vec::with_capacity(fresh.len());
        let mut firsts = Vec::with_capacity(fresh.len());
        let mut next = first;
        for tx in &fresh {
            txs.push(pg_sys::Datum::from(tx.xid));
            firsts.push(pg_sys::Datum::from(next));
            next += tx.count;
        }
        insert_batch(first, last, &mut txs, &mut firsts);

        // Only a transaction at or past S's xmax could be found again by the next
        // tick: the ticking transaction itself (every other one is committed in S).
        let mut sequenced: Vec<pg_sys::Datum> = fresh
            .iter()
            .filter(|tx| tx.xid >= current_xmax)
            .map(|tx| pg_sys::Datum::from(tx.xid))
            .collect();
        previous.replace(&state_rel, current, xid8_array(&mut sequenced));
        drop(state_rel);
        pg_sys::CommandCounterIncrement();
        Some((last, fresh.len()))
    }
}

fn relation(name: &'static std::ffi::CStr) -> pg_sys::Oid {
    livesync_relation(name).unwrap_or_else(|| LivesyncError::NotInstalled.raise())
}

/// The state the previous tick left: `livesync._sequencer`'s only row.
struct StateRow {
    tuple: pg_sys::HeapTuple,
    /// xmax and xip list of the snapshot the previous tick ran with.
    xmax: u64,
    xip: Vec<u64>,
    /// What the previous tick sequenced at or past that xmax.
    sequenced: Vec<u64>,
}

impl StateRow {
    /// # Safety
    /// `snapshot` must be registered, in the transaction `rel` was opened in.
    unsafe fn read(rel: &OpenRelation, snapshot: pg_sys::Snapshot) -> StateRow {
        if rel.natts() != SEQUENCER_COLUMNS {
            LivesyncError::LogTableChanged.raise();
        }
        // SAFETY: `rel` is open with the columns checked above and `snapshot` is
        // registered; the tuple found is copied before its scan (and buffer) ends.
        unsafe {
            let rel = rel.as_ptr();
            let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
            let found = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if found.is_null() {
                LivesyncError::LogTableChanged.raise();
            }
            // A copy: the scan's buffer is released when it ends.
            let tuple = pg_sys::heap_copytuple(found);
            pg_sys::heap_endscan(scan);
            let (values, nulls) = deform_state(rel, tuple);
            if nulls[1] || nulls[2] {
                LivesyncError::LogTableChanged.raise();
            }
            let (xmax, xip) = snapshot_xmax_xip(values[1]);
            let sequenced = xid8_values(values[2]);
            StateRow {
                tuple,
                xmax,
                xip,
                sequenced,
            }
        }
    }

    /// Stores the new snapshot and what this tick sequenced at or past its xmax.
    ///
    /// # Safety
    /// `rel` is the `_sequencer` table this row was read from, opened in
    /// RowExclusiveLock mode; `snapshot` a `pg_snapshot` value, `sequenced` an
    /// `xid8[]`.
    unsafe fn replace(
        &self,
        rel: &OpenRelation,
        snapshot: pg_sys::Datum,
        sequenced: pg_sys::Datum,
    ) {
        // SAFETY: `self.tuple` is a copy of the row `rel` holds at `t_self`, and the
        // new values have the types of columns 2 and 3 (the caller's contract).
        unsafe {
            let rel = rel.as_ptr();
            let mut columns = [2, 3];
            let mut values = [snapshot, sequenced];
            let mut nulls = [false, false];
            let tuple = pg_sys::heap_modify_tuple_by_cols(
                self.tuple,
                (*rel).rd_att,
                2,
                columns.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            pg_sys::simple_heap_update(rel, &mut (*self.tuple).t_self, tuple);
            let heap_only = (*(*tuple).t_data).t_infomask2 as u32 & pg_sys::HEAP_ONLY_TUPLE != 0;
            if !heap_only {
                let (all, all_nulls) = deform_state(rel, tuple);
                index_entries::insert_into_all(rel, tuple, &all, &all_nulls);
            }
        }
    }
}

/// A `_sequencer` row's columns.
///
/// # Safety
/// `tuple` is a row of `rel`, whose column count the caller has checked is
/// `SEQUENCER_COLUMNS`.
unsafe fn deform_state(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
) -> (
    [pg_sys::Datum; SEQUENCER_COLUMNS],
    [bool; SEQUENCER_COLUMNS],
) {
    let mut values = [pg_sys::Datum::from(0usize); SEQUENCER_COLUMNS];
    let mut nulls = [false; SEQUENCER_COLUMNS];
    // SAFETY: the arrays hold as many columns as `rel` has (the caller's contract).
    unsafe {
        pg_sys::heap_deform_tuple(
            tuple,
            (*rel).rd_att,
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        )
    };
    (values, nulls)
}

/// A transaction a tick gives positions to.
struct Fresh {
    xid: u64,
    /// Its number of changes: its largest `ordinal + count - 1`.
    count: i64,
    /// The WAL insert position just before it committed (its tail row's).
    commit_seq: i64,
}

/// The transactions whose log rows are visible in the tick's snapshot but were not
/// to the previous tick's (at or past its xmax, below `upper`; or in its xip list),
/// less those it sequenced itself and those left with no change (a rolled-back
/// savepoint took them all), in commit order.
///
/// Commit order: by commit sequence, which every dependency between two of them
/// respects (one that waited for the other's lock, or began after it committed,
/// took its sequence after the other's commit record); ties, which only unrelated
/// transactions can have, by xid.
///
/// # Safety
/// Must run inside a transaction; `snapshot` registered.
unsafe fn scan_new_transactions(
    snapshot: pg_sys::Snapshot,
    previous: &StateRow,
    upper: u64,
) -> Vec<Fresh> {
    // SAFETY: the log and its primary key are open for the whole scan, and the slot
    // is made for the log's rows, whose first four columns (tx, ordinal, count,
    // commit_seq: xid8, int4, int4, int8, all NOT NULL) are read by value.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let log_table = OpenRelation::table(relation(c"changes"), lock);
        let log_key = OpenRelation::index(relation(c"changes_pkey"), lock);
        let (log, index) = (log_table.as_ptr(), log_key.as_ptr());
        let slot = pg_sys::table_slot_create(log, std::ptr::null_mut());
        let mut fresh: HashMap<u64, Fresh> = HashMap::new();
        // One index scan per set of keys: a scan keeps the number of keys it began
        // with, and rescanning it with fewer would leave stale ones in force.
        let mut collect = |keys: &mut [pg_sys::ScanKeyData]| {
            let scan = pg_sys::index_beginscan(log, index, snapshot, keys.len() as i32, 0);
            pg_sys::index_rescan(
                scan,
                keys.as_mut_ptr(),
                keys.len() as i32,
                std::ptr::null_mut(),
                0,
            );
            while pg_sys::index_getnext_slot(
                scan,
                pg_sys::ScanDirection::ForwardScanDirection,
                slot,
            ) {
                pg_sys::slot_getsomeattrs_int(slot, 4);
                let values = (*slot).tts_values;
                let xid = (*values).value() as u64;
                let ordinal = (*values.add(1)).value() as i32 as i64;
                let count = (*values.add(2)).value() as i32 as i64;
                let commit_seq = (*values.add(3)).value() as i64;
                if !previous.sequenced.contains(&xid) {
                    let tx = fresh.entry(xid).or_insert(Fresh {
                        xid,
                        count: 0,
                        commit_seq: 0,
                    });
                    tx.count = tx.count.max(ordinal + count - 1);
                    tx.commit_seq = tx.commit_seq.max(commit_seq);
                }
            }
            pg_sys::index_endscan(scan);
        };
        if previous.xmax < upper {
            let mut keys = [
                scan_key(
                    pg_sys::BTGreaterEqualStrategyNumber,
                    pg_sys::F_XID8GE,
                    previous.xmax,
                ),
                scan_key(pg_sys::BTLessStrategyNumber, pg_sys::F_XID8LT, upper),
            ];
            collect(&mut keys);
        }
        for &tx in &previous.xip {
            let mut keys = [scan_key(
                pg_sys::BTEqualStrategyNumber,
                pg_sys::F_XID8EQ,
                tx,
            )];
            collect(&mut keys);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        drop(log_key);
        drop(log_table);
        let mut fresh: Vec<Fresh> = fresh.into_values().filter(|tx| tx.count > 0).collect();
        fresh.sort_unstable_by_key(|tx| (tx.commit_seq, tx.xid));
        fresh
    }
}

/// A key on the log index's first column (`tx`).
///
/// # Safety
/// `procedure` must be a comparison function of two `xid8` values, matching
/// `strategy`.
unsafe fn scan_key(strategy: u32, procedure: u32, tx: u64) -> pg_sys::ScanKeyData {
    // SAFETY: ScanKeyInit fills the zeroed key; `tx` is an xid8 by value, what
    // `procedure` compares (the caller's contract).
    unsafe {
        let mut key = std::mem::zeroed::<pg_sys::ScanKeyData>();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            strategy as pg_sys::StrategyNumber,
            pg_sys::Oid::from(procedure),
            pg_sys::Datum::from(tx),
        );
        key
    }
}

/// Appends the tick's `livesync.batches` row.
///
/// # Safety
/// Must run inside a transaction holding the sequencer lock; `txs` holds xid8 and
/// `firsts` int8 values.
unsafe fn insert_batch(
    first: i64,
    last: i64,
    txs: &mut [pg_sys::Datum],
    firsts: &mut [pg_sys::Datum],
) {
    // SAFETY: the table is open and has the five columns the row is formed for
    // (checked), with values of their types; its indexes get the row's entries.
    unsafe {
        let table = OpenRelation::table(
            relation(c"batches"),
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
        if table.natts() != BATCH_COLUMNS {
            LivesyncError::LogTableChanged.raise();
        }
        let rel = table.as_ptr();
        let mut values = [
            pg_sys::Datum::from(last),
            pg_sys::Datum::from(first),
            xid8_array(txs),
            int8_array(firsts),
            pg_sys::Datum::from(pg_sys::GetCurrentTimestamp()),
        ];
        let mut nulls = [false; BATCH_COLUMNS];
        let tuple = pg_sys::heap_form_tuple((*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(rel, tuple);
        index_entries::insert_into_all(rel, tuple, &values, &nulls);
    }
}

/// A `pg_snapshot` value's xmax and xip list (utils/adt/xid8funcs.c's layout:
/// varlena header, nxip, xmin, xmax, xip[]).
///
/// # Safety
/// `value` must be a non-null `pg_snapshot`.
unsafe fn snapshot_xmax_xip(value: pg_sys::Datum) -> (u64, Vec<u64>) {
    // SAFETY: a detoasted pg_snapshot holds the header and `nxip` xids after it, at
    // the offsets read (unaligned reads: the layout's alignment is not relied on).
    unsafe {
        let raw = pg_sys::pg_detoast_datum(value.cast_mut_ptr()).cast::<u8>();
        let nxip = raw.add(4).cast::<u32>().read_unaligned() as usize;
        let xmax = raw.add(16).cast::<u64>().read_unaligned();
        let xip = (0..nxip)
            .map(|i| raw.add(24 + 8 * i).cast::<u64>().read_unaligned())
            .collect();
        (xmax, xip)
    }
}

/// The elements of an `xid8[]`.
///
/// # Safety
/// `array` must be a non-null one-dimensional `xid8[]` without nulls.
unsafe fn xid8_values(array: pg_sys::Datum) -> Vec<u64> {
    // SAFETY: deconstruct_array is given xid8's storage (8 bytes, by value, double
    // aligned) and returns `count` elements (the caller's contract: no nulls).
    unsafe {
        let array = pg_sys::pg_detoast_datum(array.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let mut elements = std::ptr::null_mut();
        let mut nulls = std::ptr::null_mut();
        let mut count = 0;
        pg_sys::deconstruct_array(
            array,
            pg_sys::XID8OID,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as std::ffi::c_char,
            &mut elements,
            &mut nulls,
            &mut count,
        );
        (0..count as usize)
            .map(|i| (*elements.add(i)).value() as u64)
            .collect()
    }
}

/// # Safety
/// `values` must be xid8 values.
unsafe fn xid8_array(values: &mut [pg_sys::Datum]) -> pg_sys::Datum {
    // SAFETY: xid8 is 8 bytes, by value (the caller's contract for the values).
    unsafe { array_of(values, pg_sys::XID8OID) }
}

/// # Safety
/// `values` must be int8 values.
unsafe fn int8_array(values: &mut [pg_sys::Datum]) -> pg_sys::Datum {
    // SAFETY: int8 is 8 bytes, by value (the caller's contract for the values).
    unsafe { array_of(values, pg_sys::INT8OID) }
}

/// A one-dimensional array of 8-byte pass-by-value elements.
///
/// # Safety
/// `element_type` must be an 8-byte, pass-by-value, double-aligned type, and
/// `values` values of it.
unsafe fn array_of(values: &mut [pg_sys::Datum], element_type: pg_sys::Oid) -> pg_sys::Datum {
    // SAFETY: the storage passed matches `element_type` (the caller's contract), and
    // construct_array reads `values.len()` datums from the slice.
    unsafe {
        pg_sys::Datum::from(pg_sys::construct_array(
            values.as_mut_ptr(),
            values.len() as i32,
            element_type,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as std::ffi::c_char,
        ))
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;
