//! The body of one sequencing tick (what a tick is, and why it is correct, is in
//! `sequencer.rs`), done with direct index scans and heap writes.
//!
//! It was one SQL statement (a chain of CTEs) run through SPI. Under load the worker
//! ticks about a hundred times a second, and that statement cost ~0.5 ms of executor
//! start-up, plan-cache checks and tuplestores per tick plus ~3 us per transaction
//! sequenced: 12 us of worker CPU per committed transaction with
//! `synchronous_commit = on`, a third of what capture cost in all. Here a tick reads
//! the state row, walks the log's primary key over the new transactions, and writes
//! one `batches` row and the new state, nothing else.
//!
//! Everything is read with the tick's snapshot S, which the caller took under the
//! sequencer lock. livesync's tables are its own (no triggers, rules or
//! constraints but their keys), so direct writes do everything Postgres would.

use crate::catalog::livesync_relation;
use crate::error::LivesyncError;
use crate::index_entries;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::collections::HashMap;

/// `livesync._sequencer`'s columns: only_row, snapshot, sequenced.
const SEQUENCER_COLUMNS: usize = 3;
/// `livesync.batches`' columns: last_position, first_position, txs, firsts, committed_at.
const BATCH_COLUMNS: usize = 5;

/// Runs a tick's reads and writes with snapshot S. `own_bound` is one past the
/// ticking transaction's own xid when it has one (a commit-time tick includes its
/// own transaction, which S does not yet show as committed), else 0. Returns the
/// last position handed out and how many transactions got positions, or None when
/// no transaction became visible.
///
/// # Safety
/// Must run inside a transaction holding the sequencer lock; `snapshot` registered.
pub unsafe fn run(snapshot: pg_sys::Snapshot, own_bound: u64) -> Option<(i64, usize)> {
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let state_rel = pg_sys::table_open(relation(c"_sequencer"), lock);
        let previous = StateRow::read(state_rel, snapshot);

        // S as a pg_snapshot (full xids), which is also what gets stored.
        pg_sys::PushActiveSnapshot(snapshot);
        let current = pgrx::direct_function_call_as_datum(pg_sys::pg_current_snapshot, &[])
            .expect("pg_current_snapshot returns a value");
        pg_sys::PopActiveSnapshot();
        let current_xmax = snapshot_xmax_xip(current).0;

        let fresh = scan_new_transactions(snapshot, &previous, current_xmax.max(own_bound));
        if fresh.is_empty() {
            pg_sys::table_close(state_rel, pg_sys::NoLock as pg_sys::LOCKMODE);
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
        previous.replace(state_rel, current, xid8_array(&mut sequenced));
        pg_sys::table_close(state_rel, pg_sys::NoLock as pg_sys::LOCKMODE);
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
    unsafe fn read(rel: pg_sys::Relation, snapshot: pg_sys::Snapshot) -> StateRow {
        unsafe {
            if (*(*rel).rd_att).natts as usize != SEQUENCER_COLUMNS {
                LivesyncError::LogTableChanged.raise();
            }
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
    unsafe fn replace(
        &self,
        rel: pg_sys::Relation,
        snapshot: pg_sys::Datum,
        sequenced: pg_sys::Datum,
    ) {
        unsafe {
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

/// A `_sequencer` row's columns (the caller has checked the table's column count).
unsafe fn deform_state(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
) -> (
    [pg_sys::Datum; SEQUENCER_COLUMNS],
    [bool; SEQUENCER_COLUMNS],
) {
    let mut values = [pg_sys::Datum::from(0usize); SEQUENCER_COLUMNS];
    let mut nulls = [false; SEQUENCER_COLUMNS];
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
unsafe fn scan_new_transactions(
    snapshot: pg_sys::Snapshot,
    previous: &StateRow,
    upper: u64,
) -> Vec<Fresh> {
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let log = pg_sys::table_open(relation(c"changes"), lock);
        let index = pg_sys::index_open(relation(c"changes_pkey"), lock);
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
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(log, pg_sys::NoLock as pg_sys::LOCKMODE);
        let mut fresh: Vec<Fresh> = fresh.into_values().filter(|tx| tx.count > 0).collect();
        fresh.sort_unstable_by_key(|tx| (tx.commit_seq, tx.xid));
        fresh
    }
}

/// A key on the log index's first column (`tx`).
unsafe fn scan_key(strategy: u32, procedure: u32, tx: u64) -> pg_sys::ScanKeyData {
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
unsafe fn insert_batch(
    first: i64,
    last: i64,
    txs: &mut [pg_sys::Datum],
    firsts: &mut [pg_sys::Datum],
) {
    unsafe {
        let rel = pg_sys::table_open(
            relation(c"batches"),
            pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        );
        if (*(*rel).rd_att).natts as usize != BATCH_COLUMNS {
            LivesyncError::LogTableChanged.raise();
        }
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
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}

/// A `pg_snapshot` value's xmax and xip list (utils/adt/xid8funcs.c's layout:
/// varlena header, nxip, xmin, xmax, xip[]).
unsafe fn snapshot_xmax_xip(value: pg_sys::Datum) -> (u64, Vec<u64>) {
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

unsafe fn xid8_values(array: pg_sys::Datum) -> Vec<u64> {
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

unsafe fn xid8_array(values: &mut [pg_sys::Datum]) -> pg_sys::Datum {
    unsafe { array_of(values, pg_sys::XID8OID) }
}

unsafe fn int8_array(values: &mut [pg_sys::Datum]) -> pg_sys::Datum {
    unsafe { array_of(values, pg_sys::INT8OID) }
}

/// A one-dimensional array of 8-byte pass-by-value elements.
unsafe fn array_of(values: &mut [pg_sys::Datum], element_type: pg_sys::Oid) -> pg_sys::Datum {
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
