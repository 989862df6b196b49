//! Capture: the triggers `livesync.track()` installs on a table.
//!
//! - `_stamp_version` (BEFORE INSERT OR UPDATE, per row) stamps the row's next version.
//! - `_capture` (AFTER INSERT / UPDATE / DELETE per statement, with transition
//!   tables; AFTER TRUNCATE) writes the statement's changes to `livesync.changes`,
//!   up to a thousand changes per log row (`log_writer::StatementLog`).
//!
//! Updates are paired old-to-new by primary key. Postgres fills the two transition
//! tables in step, so the pairs normally line up and are checked cheaply; when a
//! statement changed primary keys they are re-paired by key, and a row whose key
//! changed is logged as the delete of the old key and the insert of the new one,
//! which is what a subscriber keyed by primary key needs to apply.
//!
//! An update logs `[key, old, new, version]` with only the columns it changed; on a
//! table with filter columns (`livesync.set_filter_columns`) a fifth element holds
//! the current value of each filter column the update left unchanged, so a reader
//! can tell whether the row matches a filter on it either way.

use crate::error::LivesyncError;
use crate::log_writer::StatementLog;
use crate::row_json::{attr, is_version_column, JsonbBuilder, RowEncoder};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

/// The capture trigger raises its errors directly (`LivesyncError::raise`); this
/// uninhabited type only satisfies `#[pg_trigger]`'s signature.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {}

/// `livesync._stamp_version()`: BEFORE INSERT OR UPDATE, per row. Written against
/// the C trigger interface (declared in `lib.rs`) because it runs for every row
/// written: it replaces the one column (one tuple copy, not pgrx's two) and looks
/// nothing up in the catalogs.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_livesync_stamp_version() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn livesync_stamp_version(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            pgrx::error!("livesync._stamp_version() must be called as a trigger");
        }
        let td = &*context.cast::<pg_sys::TriggerData>();
        let event = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
        let tuple = if event == pg_sys::TRIGGER_EVENT_UPDATE {
            td.tg_newtuple
        } else {
            td.tg_trigtuple
        };
        let rel = td.tg_relation;
        let Some(attnum) = version_attnum(rel) else {
            let name = std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr());
            LivesyncError::NoVersionColumn(name.to_string_lossy().into_owned()).raise();
        };
        let stamped =
            crate::row_json::with_int8(tuple, (*rel).rd_att, attnum, crate::versions::next());
        pg_sys::Datum::from(stamped)
    }
}

thread_local! {
    /// Where the last stamped table keeps its version column: checked against the
    /// tuple descriptor on every use, so it is only ever a hint.
    static VERSION_ATTNUM: Cell<(pg_sys::Oid, i32)> = const { Cell::new((pg_sys::InvalidOid, 0)) };
}

/// The 1-based attribute number of `_livesync_version` in `rel`, found from its
/// tuple descriptor (no catalog lookup: this runs for every row written).
unsafe fn version_attnum(rel: pg_sys::Relation) -> Option<i32> {
    unsafe {
        let tupdesc = (*rel).rd_att;
        let natts = (*tupdesc).natts;
        let is_version = |attnum: i32| is_version_column(attr(tupdesc, attnum as usize - 1));
        let (relid, hint) = VERSION_ATTNUM.get();
        if relid == (*rel).rd_id && (1..=natts).contains(&hint) && is_version(hint) {
            return Some(hint);
        }
        // Added by track(), so usually among the last columns.
        let attnum = (1..=natts).rev().find(|&attnum| is_version(attnum))?;
        VERSION_ATTNUM.set(((*rel).rd_id, attnum));
        Some(attnum)
    }
}

/// Logs a change of a tracked table's columns (from the DDL event trigger, which
/// passes the column lists before and after) as one change of op `s`, in commit
/// order with the table's row changes: a reader reloads the table when it sees one.
#[pg_extern(volatile, parallel_unsafe)]
fn _log_schema_change(rel: pg_sys::Oid, before: pgrx::JsonB, after: pgrx::JsonB) {
    let entry = serde_json::json!([[
        null,
        { "columns": before.0 },
        { "columns": after.0 },
        null
    ]]);
    let entries = pgrx::IntoDatum::into_datum(pgrx::JsonB(entry)).expect("jsonb has a datum");
    crate::owner::as_bootstrap_superuser(|| unsafe {
        crate::log_writer::append_one(rel, b's', entries)
    });
}

thread_local! {
    /// What `livesync._tracked` says of a relation, per backend; an entry goes with
    /// the relation's next invalidation (track's and untrack's DDL cause one, and so
    /// does set_filter_columns).
    static REGISTERED: std::cell::RefCell<HashMap<pg_sys::Oid, Registration>> =
        std::cell::RefCell::new(HashMap::new());
}

/// A relation's entry in `livesync._tracked`, as capture needs it.
#[derive(Clone)]
enum Registration {
    /// Not listed: `livesync.track` did not register it.
    Unregistered,
    /// Listed, with its filter columns (`_tracked.filter_columns`) as 0-based
    /// indexes into its tuples: None when it has none, the common case, which costs
    /// the capture path nothing.
    Tracked(Option<Rc<[usize]>>),
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(forget_registered), pg_sys::Datum::from(0usize))
    };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_registered(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    REGISTERED.with(|known| crate::catalog::forget_relation(known, relid));
}

/// The table's registration. `_capture` is executable by every role (track creates
/// the triggers as the table's owner), so it refuses to log a table that carries its
/// triggers without having been tracked.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn registration(rel: pg_sys::Relation) -> Registration {
    let relid = unsafe { (*rel).rd_id };
    if let Some(known) = REGISTERED.with(|known| known.borrow().get(&relid).cloned()) {
        return known;
    }
    let found = unsafe { look_up_registration(rel) };
    REGISTERED.with(|known| known.borrow_mut().insert(relid, found.clone()));
    found
}

/// Looks `rel` up in `livesync._tracked` by its primary key, with the latest
/// snapshot, as the catalogs are read: the transaction's own snapshot (REPEATABLE
/// READ) could predate a track, an untrack or a set_filter_columns whose
/// invalidation this statement has already processed, and its stale answer would
/// then be cached past it.
unsafe fn look_up_registration(rel: pg_sys::Relation) -> Registration {
    let (Some(tracked), Some(primary_key)) = (
        crate::catalog::livesync_relation(c"_tracked"),
        crate::catalog::livesync_relation(c"_tracked_pkey"),
    ) else {
        return Registration::Unregistered;
    };
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let registry = pg_sys::table_open(tracked, lock);
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::RegProcedure::from(pg_sys::F_OIDEQ),
            pg_sys::Datum::from((*rel).rd_id),
        );
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let scan = pg_sys::systable_beginscan(registry, primary_key, true, snapshot, 1, &mut key);
        let tuple = pg_sys::systable_getnext(scan);
        let found = if tuple.is_null() {
            Registration::Unregistered
        } else {
            Registration::Tracked(filter_columns(tuple, (*registry).rd_att, (*rel).rd_att))
        };
        pg_sys::systable_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(registry, lock);
        found
    }
}

/// The filter columns a `livesync._tracked` row lists, as indexes into the tracked
/// table's tuples (`table`): by name, so they are right whatever attribute numbers
/// a restored dump gave the columns (the DDL trigger keeps the names in step with
/// renames). None when there are none, or when the database's update to 0.4.0 has
/// not run (no such column yet). A name that is not a column of the table now is
/// passed over.
unsafe fn filter_columns(
    tuple: pg_sys::HeapTuple,
    registry: pg_sys::TupleDesc,
    table: pg_sys::TupleDesc,
) -> Option<Rc<[usize]>> {
    unsafe {
        let position = (0..(*registry).natts as usize).find(|&i| {
            let att = attr(registry, i);
            !att.attisdropped
                && att.atttypid == pg_sys::TEXTARRAYOID
                && CStr::from_ptr(att.attname.data.as_ptr()) == c"filter_columns"
        })?;
        let mut isnull = false;
        let datum = pg_sys::heap_getattr(tuple, position as i32 + 1, registry, &mut isnull);
        if isnull {
            return None;
        }
        // Names compared as bytes (in the database's encoding, as attnames are).
        let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
        let mut names = std::ptr::null_mut();
        let mut nulls = std::ptr::null_mut();
        let mut count = 0;
        pg_sys::deconstruct_array_builtin(
            array,
            pg_sys::TEXTOID,
            &mut names,
            &mut nulls,
            &mut count,
        );
        let mut columns = Vec::new();
        for k in 0..count.max(0) as usize {
            if *nulls.add(k) {
                continue;
            }
            let text = pg_sys::pg_detoast_datum_packed((*names.add(k)).cast_mut_ptr());
            let name = pgrx::varlena::varlena_to_byte_slice(text);
            let found = (0..(*table).natts as usize).find(|&i| {
                let att = attr(table, i);
                !att.attisdropped && CStr::from_ptr(att.attname.data.as_ptr()).to_bytes() == name
            });
            columns.extend(found);
        }
        (!columns.is_empty()).then(|| columns.into())
    }
}

#[pg_trigger]
fn _capture<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, CaptureError> {
    unsafe { capture_statement(trigger.trigger_data()) };
    Ok(None)
}

unsafe fn capture_statement(td: &pg_sys::TriggerData) {
    unsafe {
        let rel = td.tg_relation;
        // Only as track installs it: AFTER, per statement (fired per row, with a
        // transition table, it would log the statement's rows once per row).
        let as_installed = td.tg_event & pg_sys::TRIGGER_EVENT_ROW == 0
            && td.tg_event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER;
        let filters = match registration(rel) {
            Registration::Tracked(filters) if as_installed => filters,
            _ => {
                LivesyncError::NotRegistered(crate::write::settings::relation_display(
                    (*rel).rd_id,
                ))
                .raise();
            }
        };
        let event = td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
        let mut log = StatementLog::new((*rel).rd_id);

        if event == pg_sys::TRIGGER_EVENT_TRUNCATE {
            log.change(b't', None, |out| {
                for _ in 0..3 {
                    out.null_element();
                }
            });
        } else {
            let mut encoder = RowEncoder::take(rel).unwrap_or_else(|e| e.raise());
            // Read once: every wait of this statement is over by now.
            let mark = crate::versions::tombstone_mark();
            let [first, second] = encoder.slots();
            match event {
                pg_sys::TRIGGER_EVENT_INSERT => {
                    let mut rows = TransitionReader::new(td.tg_newtable, first);
                    while rows.next() {
                        log_whole(&mut log, &mut encoder, b'i', rows.slot, mark);
                    }
                }
                pg_sys::TRIGGER_EVENT_DELETE => {
                    let mut rows = TransitionReader::new(td.tg_oldtable, first);
                    while rows.next() {
                        log_whole(&mut log, &mut encoder, b'd', rows.slot, mark);
                    }
                }
                _ => {
                    let olds = TransitionReader::new(td.tg_oldtable, first);
                    let news = TransitionReader::new(td.tg_newtable, second);
                    let filters = filters.as_deref();
                    capture_updates(olds, news, &mut encoder, &mut log, mark, filters);
                }
            }
            RowEncoder::give_back(encoder);
        }
        log.finish();
    }
}

/// Logs an insert or delete: the key and the whole row.
/// `mark` is the database's tombstone mark as this statement ended (see `restamp.rs`).
unsafe fn log_whole(
    log: &mut StatementLog,
    encoder: &mut RowEncoder,
    op: u8,
    slot: *mut pg_sys::TupleTableSlot,
    mark: Option<i64>,
) {
    unsafe {
        if op == b'i' {
            let version = encoder
                .version(slot)
                .map(|stamped| crate::restamp::if_overtaken(encoder, slot, stamped, mark));
            log.change(op, version, |out| {
                encoder.push_key(out, slot);
                out.null_element();
                encoder.push_row(out, slot);
            });
        } else {
            // The row is gone, but its key gets a new version all the same: the
            // tombstone is newer than anything a client holds for that key.
            log.change(op, Some(crate::versions::next_tombstone()), |out| {
                encoder.push_key(out, slot);
                encoder.push_row(out, slot);
                out.null_element();
            });
        }
    }
}

/// `filters`: the table's filter columns (0-based indexes), if it has any.
unsafe fn capture_updates(
    mut olds: TransitionReader,
    mut news: TransitionReader,
    encoder: &mut RowEncoder,
    log: &mut StatementLog,
    mark: Option<i64>,
    filters: Option<&[usize]>,
) {
    unsafe {
        // Postgres fills both transition tables in step: read them side by side, and
        // only when some pair does not share a key (the statement changed primary
        // keys) fall back to pairing by key.
        let in_step = loop {
            match (olds.next(), news.next()) {
                (true, true) if encoder.same_key(olds.slot, news.slot) => {}
                (false, false) => break true,
                _ => break false,
            }
        };
        olds.rewind();
        news.rewind();
        if in_step {
            while olds.next() && news.next() {
                log_update(log, encoder, olds.slot, news.slot, filters);
            }
        } else {
            let (olds, news) = (olds.copy_all(), news.copy_all());
            capture_rekeyed_updates(encoder, log, olds, news, mark, filters);
        }
    }
}

/// Updates that changed primary keys: old and new rows are paired by key; an old row
/// with no partner is a delete and a new one an insert.
unsafe fn capture_rekeyed_updates(
    encoder: &mut RowEncoder,
    log: &mut StatementLog,
    olds: Vec<*mut pg_sys::TupleTableSlot>,
    news: Vec<*mut pg_sys::TupleTableSlot>,
    mark: Option<i64>,
    filters: Option<&[usize]>,
) {
    unsafe {
        let mut old_by_key: HashMap<Vec<u8>, usize> = HashMap::new();
        for (i, &old) in olds.iter().enumerate() {
            old_by_key.insert(jsonb_bytes(encoder.key(old)), i);
        }
        let mut pairs = Vec::with_capacity(news.len());
        let mut paired = vec![false; olds.len()];
        for &new in &news {
            let old = old_by_key.get(&jsonb_bytes(encoder.key(new))).copied();
            if let Some(i) = old {
                paired[i] = true;
            }
            pairs.push((old, new));
        }
        for (i, &old) in olds.iter().enumerate() {
            if !paired[i] {
                log_whole(log, encoder, b'd', old, mark);
            }
        }
        for (old, new) in pairs {
            match old {
                Some(i) => log_update(log, encoder, olds[i], new, filters),
                None => log_whole(log, encoder, b'i', new, mark),
            }
        }
        for slot in olds.into_iter().chain(news) {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
    }
}

/// Logs an update: `[key, old, new, version]`, old and new holding the columns it
/// changed; with `filters` (the table's filter columns), a fifth element holding
/// those of them it did not change, with their current value.
unsafe fn log_update(
    log: &mut StatementLog,
    encoder: &mut RowEncoder,
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
    filters: Option<&[usize]>,
) {
    unsafe {
        let version = encoder.version(new);
        let fill = |encoder: &mut RowEncoder, out: &mut JsonbBuilder| {
            encoder.push_key(out, new);
            encoder.push_changed(out, old, new);
        };
        match filters {
            None => log.change(b'u', version, |out| fill(encoder, out)),
            Some(filters) => log.change_with_tail(b'u', version, encoder, fill, |encoder, out| {
                encoder.push_unchanged(out, new, filters)
            }),
        }
    }
}

/// Reads a transition table through a read pointer of its own, so other triggers
/// reading the same tuplestore are not disturbed, into a slot it borrows (the row
/// encoder's, made once per relation rather than per statement).
struct TransitionReader {
    store: *mut pg_sys::Tuplestorestate,
    /// The current tuple, after `next()` returned true.
    slot: *mut pg_sys::TupleTableSlot,
}

impl TransitionReader {
    /// # Safety
    /// `store` is a transition table of the firing trigger (or null: no rows);
    /// `slot` an empty minimal-tuple slot for its relation's rows.
    unsafe fn new(store: *mut pg_sys::Tuplestorestate, slot: *mut pg_sys::TupleTableSlot) -> Self {
        unsafe {
            if !store.is_null() {
                let pointer =
                    pg_sys::tuplestore_alloc_read_pointer(store, pg_sys::EXEC_FLAG_REWIND as i32);
                pg_sys::tuplestore_select_read_pointer(store, pointer);
                pg_sys::tuplestore_rescan(store);
            }
            TransitionReader { store, slot }
        }
    }

    fn next(&mut self) -> bool {
        !self.store.is_null()
            && unsafe { pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot) }
    }

    fn rewind(&mut self) {
        if !self.store.is_null() {
            unsafe { pg_sys::tuplestore_rescan(self.store) };
        }
    }

    /// Every remaining tuple, each in a slot of its own.
    unsafe fn copy_all(&mut self) -> Vec<*mut pg_sys::TupleTableSlot> {
        let mut slots = Vec::new();
        while self.next() {
            unsafe {
                let copy = pg_sys::MakeSingleTupleTableSlot(
                    (*self.slot).tts_tupleDescriptor,
                    &pg_sys::TTSOpsMinimalTuple,
                );
                pg_sys::ExecCopySlot(copy, self.slot);
                slots.push(copy);
            }
        }
        slots
    }
}

impl Drop for TransitionReader {
    fn drop(&mut self) {
        unsafe {
            if !self.store.is_null() {
                pg_sys::tuplestore_select_read_pointer(self.store, 0);
            }
            // The slot outlives the statement; the tuple it points to does not.
            pg_sys::ExecClearTuple(self.slot);
        }
    }
}

unsafe fn jsonb_bytes(jsonb: pg_sys::Datum) -> Vec<u8> {
    unsafe {
        let value = pg_sys::pg_detoast_datum_packed(jsonb.cast_mut_ptr());
        pgrx::varlena::varlena_to_byte_slice(value).to_vec()
    }
}
