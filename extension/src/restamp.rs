//! Re-stamping inserts that were overtaken by a delete of their key.
//!
//! `_stamp_version` stamps a row's version in a BEFORE INSERT trigger, which runs
//! before the insert checks its key: an insert (plain or ON CONFLICT) can then wait
//! for a transaction that deletes that key, and that delete's tombstone, drawn at
//! the end of its statement, gets a *newer* version than the insert that follows it
//! in commit order. A reader that applied the tombstone would skip the insert.
//!
//! So at the end of an inserting statement, capture compares each inserted row's
//! version with the database's tombstone mark (`versions::tombstone_mark`): a row
//! stamped below it may have been overtaken, and is given a fresh version (newer
//! than every tombstone so far), written into the row in place. Rows stamped above
//! the mark, which is nearly all of them, cost one comparison.
//!
//! In place (`heap_inplace_update`, WAL-logged) because the row is this
//! transaction's own, invisible to others, and a second row version would be seen by
//! the statement's own later triggers as an update. An index that covers
//! `_livesync_version` would keep the old value, so then the insert is refused with
//! 40001 instead (a retry stamps after the delete has committed).

use crate::error::LivesyncError;
use crate::pg_resources::OpenRelation;
use crate::row_json::{column, RowEncoder};
use pgrx::pg_sys;

/// The version to log for an inserted row stamped `stamped`: the same, or, when a
/// delete's tombstone may have overtaken it (`mark` is above it), a fresh one now
/// stored in the row.
///
/// # Safety
/// `slot` holds a row the current statement inserted into the encoder's relation,
/// deformed.
pub unsafe fn if_overtaken(
    encoder: &RowEncoder,
    slot: *mut pg_sys::TupleTableSlot,
    stamped: i64,
    mark: Option<i64>,
) -> i64 {
    match mark {
        // SAFETY: `slot` holds a row the statement inserted (the caller's contract).
        Some(mark) if stamped < mark => unsafe { restamp(encoder, slot, stamped) },
        _ => stamped,
    }
}

/// # Safety
/// As for `if_overtaken`.
unsafe fn restamp(encoder: &RowEncoder, slot: *mut pg_sys::TupleTableSlot, stamped: i64) -> i64 {
    // SAFETY: the relation is the encoder's, locked by the statement that inserted
    // the row in `slot` (the caller's contract); its primary key is opened for the
    // scan, whose keys are built from the key columns' values in `slot` with the
    // index's own operator families and collations. The row found is this
    // transaction's, updated in place with a value of the same length.
    unsafe {
        // Locked by the statement that inserted the row.
        let table = OpenRelation::relation(encoder.relid(), pg_sys::NoLock as pg_sys::LOCKMODE);
        let rel = table.as_ptr();
        let version_attnum = encoder.version_column() as i32 + 1;
        let pk = pg_sys::RelationGetPrimaryKeyIndex(rel);
        if pk == pg_sys::InvalidOid {
            return stamped;
        }
        if version_is_indexed(rel, version_attnum) {
            let name = std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr());
            LivesyncError::InsertOvertaken(name.to_string_lossy().into_owned()).raise();
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let primary_key = OpenRelation::index(pk, lock).unlocking_at_close(lock);
        let index = primary_key.as_ptr();
        let nkeys = (*(*index).rd_index).indnkeyatts as usize;
        let mut keys: Vec<pg_sys::ScanKeyData> = Vec::with_capacity(nkeys);
        for i in 0..nkeys {
            let heap_attnum = *(*(*index).rd_index).indkey.values.as_ptr().add(i);
            let (value, null) = column(slot, heap_attnum as usize - 1);
            if null {
                return stamped; // a primary key has no nulls; nothing to find
            }
            let opfamily = *(*index).rd_opfamily.add(i);
            let input_type = *(*index).rd_opcintype.add(i);
            let operator = pg_sys::get_opfamily_member(
                opfamily,
                input_type,
                input_type,
                pg_sys::BTEqualStrategyNumber as i16,
            );
            let mut key = std::mem::zeroed::<pg_sys::ScanKeyData>();
            pg_sys::ScanKeyEntryInitialize(
                &mut key,
                0,
                (i + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                *(*index).rd_indcollation.add(i),
                pg_sys::get_opcode(operator),
                value,
            );
            keys.push(key);
        }
        // SnapshotSelf: the row is this transaction's, inserted by this very command.
        let snapshot = &raw mut pg_sys::SnapshotSelfData;
        let scan = pg_sys::index_beginscan(rel, index, snapshot, nkeys as i32, 0);
        pg_sys::index_rescan(
            scan,
            keys.as_mut_ptr(),
            nkeys as i32,
            std::ptr::null_mut(),
            0,
        );
        let found = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let mut version = stamped;
        if pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, found) {
            pg_sys::slot_getsomeattrs_int(found, version_attnum);
            let (current, null) = column(found, version_attnum as usize - 1);
            // A row updated since (by a trigger of this statement) already has a
            // version drawn after the wait.
            if !null && current.value() as i64 == stamped {
                version = crate::versions::next();
                let mut should_free = false;
                let tuple = pg_sys::ExecFetchSlotHeapTuple(found, false, &mut should_free);
                let restamped =
                    crate::row_json::with_int8(tuple, (*rel).rd_att, version_attnum, version);
                (*restamped).t_self = (*found).tts_tid;
                pg_sys::heap_inplace_update(rel, restamped);
                pg_sys::heap_freetuple(restamped);
                if should_free {
                    pg_sys::heap_freetuple(tuple);
                }
            }
        }
        pg_sys::index_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(found);
        version
    }
}

/// Whether any index of `rel` has `attnum` among its columns, expressions or
/// predicate.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn version_is_indexed(rel: pg_sys::Relation, attnum: i32) -> bool {
    // SAFETY: `rel` is open (the caller's contract); each index is open while its
    // pg_index row (`indnatts` columns) and expression trees are read.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let offset = attnum - pg_sys::FirstLowInvalidHeapAttributeNumber;
        crate::catalog::index_oids(rel).into_iter().any(|oid| {
            let opened = OpenRelation::index(oid, lock).unlocking_at_close(lock);
            let index = opened.as_ptr();
            let form = &*(*index).rd_index;
            let natts = form.indnatts as usize;
            let in_columns =
                (0..natts).any(|i| *form.indkey.values.as_ptr().add(i) as i32 == attnum);
            let mut referenced: *mut pg_sys::Bitmapset = std::ptr::null_mut();
            for tree in [
                pg_sys::RelationGetIndexExpressions(index),
                pg_sys::RelationGetIndexPredicate(index),
            ] {
                if !tree.is_null() {
                    pg_sys::pull_varattnos(tree.cast(), 1, &mut referenced);
                }
            }
            let in_trees = pg_sys::bms_is_member(offset, referenced);
            in_columns || in_trees
        })
    }
}
