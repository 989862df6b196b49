//! Index entries for tuples livesync writes to its own tables without the executor
//! (the log rows in `log_writer.rs`, the tick's rows in `tick.rs`). livesync's
//! tables carry plain column indexes only; an index with expressions or a predicate
//! is refused rather than left out of date.

use crate::error::LivesyncError;
use crate::pg_resources::{OpenRelation, SwitchedMemoryContext};
use pgrx::pg_sys;

/// What `index_insert` needs to know of an open index, allocated in memory context
/// `into`. Raises `LogTableChanged` (back in the caller's context) for an index
/// that is not on plain columns.
///
/// # Safety
/// `index` must be an open index; `into` a valid memory context.
pub unsafe fn plain_index_info(
    index: pg_sys::Relation,
    into: pg_sys::MemoryContext,
) -> *mut pg_sys::IndexInfo {
    // SAFETY: `index` is open and `into` valid (the caller's contract); the switch
    // ends before this returns or unwinds, and BuildIndexInfo's result is a complete
    // IndexInfo whose attribute numbers fill `ii_NumIndexAttrs` entries.
    unsafe {
        let info = {
            let _in_into = SwitchedMemoryContext::to(into);
            pg_sys::BuildIndexInfo(index)
        };
        let plain = (*info).ii_Expressions.is_null()
            && (*info).ii_Predicate.is_null()
            && (0..(*info).ii_NumIndexAttrs as usize).all(|k| (*info).ii_IndexAttrNumbers[k] > 0);
        if !plain {
            LivesyncError::LogTableChanged.raise();
        }
        info
    }
}

/// Adds the entry for `tuple`, just written to `table` with these column values, to
/// `index` (described by `info`, from `plain_index_info`).
///
/// # Safety
/// `index` an open index of the open `table`; `values`/`nulls` are the tuple's
/// columns in table order.
pub unsafe fn insert(
    index: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
    table: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    values: &[pg_sys::Datum],
    nulls: &[bool],
) {
    // SAFETY: `index` is an open index of the open `table`, described by `info`,
    // whose key columns (plain, 1-based attribute numbers) index into the tuple's
    // `values`/`nulls` (the caller's contract); `tuple` has just been written, so
    // its t_self is set.
    unsafe {
        let keys = (*info).ii_NumIndexAttrs as usize;
        let mut key_values = [pg_sys::Datum::from(0usize); pg_sys::INDEX_MAX_KEYS as usize];
        let mut key_nulls = [false; pg_sys::INDEX_MAX_KEYS as usize];
        for k in 0..keys {
            let column = (*info).ii_IndexAttrNumbers[k] as usize - 1;
            key_values[k] = values[column];
            key_nulls[k] = nulls[column];
        }
        let check = if (*info).ii_Unique {
            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
        } else {
            pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
        };
        pg_sys::index_insert(
            index,
            key_values.as_mut_ptr(),
            key_nulls.as_mut_ptr(),
            &mut (*tuple).t_self,
            table,
            check,
            false,
            info,
        );
    }
}

/// Adds `tuple` to every index of `table`, opening and describing each on the way
/// (for rows written once in a while; the log keeps its indexes described).
///
/// # Safety
/// As for `insert`, for every index of `table`.
pub unsafe fn insert_into_all(
    table: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
    values: &[pg_sys::Datum],
    nulls: &[bool],
) {
    // SAFETY: as for `insert` (the caller's contract), with each index of `table`
    // opened for as long as it is used.
    unsafe {
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        for oid in crate::catalog::index_oids(table) {
            let index = OpenRelation::index(oid, lock);
            let info = plain_index_info(index.as_ptr(), pg_sys::CurrentMemoryContext);
            insert(index.as_ptr(), info, table, tuple, values, nulls);
        }
    }
}
