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
use crate::pg_resources::{OpenRelation, RegisteredSnapshot};
use crate::raise::{ErrorToRaise, Outcome};
use crate::row_json::{attr, is_version_column, JsonbBuilder, RowEncoder};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

crate::fmgr::v1_function_info!(pg_finfo_livesync_stamp_version);

/// `livesync._stamp_version()`: BEFORE INSERT OR UPDATE, per row. Written against
/// the C trigger interface (declared in `lib.rs`) because it runs for every row
/// written: it replaces the one column (one tuple copy, not pgrx's two) and looks
/// nothing up in the catalogs.
///
/// # Safety
/// Called by Postgres's function manager only, with a valid `fcinfo`.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn livesync_stamp_version(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: `fcinfo` is the function manager's (the caller's contract); its
    // context is checked to be TriggerData before it is read as one, and the
    // trigger's relation and tuples are valid for the call. The tuple returned is a
    // modified copy, allocated in the trigger call's memory.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            LivesyncError::NotCalledAsTrigger("livesync._stamp_version()").raise();
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
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn version_attnum(rel: pg_sys::Relation) -> Option<i32> {
    // SAFETY: `rel` is open (the caller's contract), and only attribute numbers in
    // 1..=natts of its descriptor are read (a cached hint is checked against it).
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
    // SAFETY: a SQL-callable function runs inside a transaction, and `entries` was
    // just made as jsonb.
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
    // SAFETY: `forget_registered` is a guarded callback of the type the relcache
    // calls, and `_PG_init` registers it once per process.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(forget_registered), pg_sys::Datum::from(0usize))
    };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
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
    // SAFETY: `rel` is open (the caller's contract).
    let relid = unsafe { (*rel).rd_id };
    if let Some(known) = REGISTERED.with(|known| known.borrow().get(&relid).cloned()) {
        return known;
    }
    // SAFETY: `rel` is open (the caller's contract).
    let found = unsafe { look_up_registration(rel) };
    REGISTERED.with(|known| known.borrow_mut().insert(relid, found.clone()));
    found
}

/// Looks `rel` up in `livesync._tracked` by its primary key, with the latest
/// snapshot, as the catalogs are read: the transaction's own snapshot (REPEATABLE
/// READ) could predate a track, an untrack or a set_filter_columns whose
/// invalidation this statement has already processed, and its stale answer would
/// then be cached past it.
///
/// # Safety
/// `rel` must be an open relation.
unsafe fn look_up_registration(rel: pg_sys::Relation) -> Registration {
    let (Some(tracked), Some(primary_key)) = (
        crate::catalog::livesync_relation(c"_tracked"),
        crate::catalog::livesync_relation(c"_tracked_pkey"),
    ) else {
        return Registration::Unregistered;
    };
    // SAFETY: `rel` is open (the caller's contract); `_tracked` is opened for the
    // scan of its primary key (on the relation oid, compared with oideq), with a
    // snapshot registered for as long as the scan runs, and the row found is read
    // while the scan still holds it.
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let registry_table = OpenRelation::table(tracked, lock).unlocking_at_close(lock);
        let registry = registry_table.as_ptr();
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(
            &mut key,
            1,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::RegProcedure::from(pg_sys::F_OIDEQ),
            pg_sys::Datum::from((*rel).rd_id),
        );
        let snapshot = RegisteredSnapshot::latest();
        let scan =
            pg_sys::systable_beginscan(registry, primary_key, true, snapshot.as_ptr(), 1, &mut key);
        let tuple = pg_sys::systable_getnext(scan);
        let found = if tuple.is_null() {
            Registration::Unregistered
        } else {
            Registration::Tracked(filter_columns(tuple, (*registry).rd_att, (*rel).rd_att))
        };
        pg_sys::systable_endscan(scan);
        found
    }
}

/// The filter columns a `livesync._tracked` row lists, as indexes into the tracked
/// table's tuples (`table`): by name, so they are right whatever attribute numbers
/// a restored dump gave the columns (the DDL trigger keeps the names in step with
/// renames). None when there are none, or when the database's update to 0.4.0 has
/// not run (no such column yet). A name that is not a column of the table now is
/// passed over.
///
/// # Safety
/// `tuple` must be a `_tracked` row of descriptor `registry`; `table` a valid
/// descriptor.
unsafe fn filter_columns(
    tuple: pg_sys::HeapTuple,
    registry: pg_sys::TupleDesc,
    table: pg_sys::TupleDesc,
) -> Option<Rc<[usize]>> {
    // SAFETY: the column read is found by name and checked to be a text[] before
    // it is read as one; deconstruct_array_builtin returns `count` elements and
    // null flags, and each non-null element is a text varlena.
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

crate::fmgr::raising_c_function!(
    /// `livesync._capture()` (declared in `lib.rs`), under the C symbol pgrx's
    /// `#[pg_trigger]` gave it in earlier versions, which tables tracked then still
    /// fire. Written against the C interface so that capture's `LS003` keeps its
    /// SQLSTATE. (An AFTER ... FOR EACH STATEMENT trigger's result is ignored.)
    pg_finfo__capture_wrapper, _capture_wrapper => capture_guarded
);

/// # Safety
/// `fcinfo` must be the function manager's call of the capture trigger.
#[pg_guard]
unsafe extern "C-unwind" fn capture_guarded(fcinfo: pg_sys::FunctionCallInfo) -> Outcome {
    // SAFETY: the call's context is checked to be TriggerData before it is read as
    // one; the trigger manager keeps it valid for the call.
    unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            LivesyncError::NotCalledAsTrigger("livesync._capture()").raise();
        }
        match capture_statement(&*context.cast::<pg_sys::TriggerData>()) {
            Ok(()) => Outcome::done(pg_sys::Datum::from(0usize)),
            Err(e) => Outcome::failed(ErrorToRaise::of(&e)),
        }
    }
}

/// # Safety
/// `td` must be the TriggerData of the firing capture trigger.
unsafe fn capture_statement(td: &pg_sys::TriggerData) -> Result<(), LivesyncError> {
    // SAFETY: the trigger's relation is open and its transition tables (null when
    // the event has none) are valid for the call (the caller's contract); the
    // encoder is taken for that relation, so its slots fit the tables' rows.
    unsafe {
        let rel = td.tg_relation;
        // Only as track installs it: AFTER, per statement (fired per row, with a
        // transition table, it would log the statement's rows once per row).
        let as_installed = td.tg_event & pg_sys::TRIGGER_EVENT_ROW == 0
            && td.tg_event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER;
        let filters = match registration(rel) {
            Registration::Tracked(filters) if as_installed => filters,
            _ => {
                LivesyncError::NotRegistered(crate::catalog::relation_display((*rel).rd_id))
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
            let mut encoder = RowEncoder::take(rel)?;
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
        Ok(())
    }
}

/// Logs an insert or delete: the key and the whole row.
/// `mark` is the database's tombstone mark as this statement ended (see `restamp.rs`).
///
/// # Safety
/// `slot` must hold a row of the encoder's relation that the statement inserted
/// (`op` i) or deleted (`op` d).
unsafe fn log_whole(
    log: &mut StatementLog,
    encoder: &mut RowEncoder,
    op: u8,
    slot: *mut pg_sys::TupleTableSlot,
    mark: Option<i64>,
) {
    // SAFETY: `slot` holds a row of the encoder's relation (the caller's contract).
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
///
/// # Safety
/// The readers must read the statement's old and new transition tables into slots
/// of the encoder's relation.
unsafe fn capture_updates(
    mut olds: TransitionReader,
    mut news: TransitionReader,
    encoder: &mut RowEncoder,
    log: &mut StatementLog,
    mark: Option<i64>,
    filters: Option<&[usize]>,
) {
    // SAFETY: after `next()` returned true each reader's slot holds a row of the
    // encoder's relation (the caller's contract).
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
///
/// # Safety
/// `olds` and `news` must be slots of their own (dropped here) holding the
/// statement's old and new rows of the encoder's relation.
unsafe fn capture_rekeyed_updates(
    encoder: &mut RowEncoder,
    log: &mut StatementLog,
    olds: Vec<*mut pg_sys::TupleTableSlot>,
    news: Vec<*mut pg_sys::TupleTableSlot>,
    mark: Option<i64>,
    filters: Option<&[usize]>,
) {
    // SAFETY: every slot holds a row of the encoder's relation and is this
    // function's to drop (the caller's contract), which happens once, at the end.
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
///
/// # Safety
/// `old` and `new` must hold the old and new versions of one updated row of the
/// encoder's relation.
unsafe fn log_update(
    log: &mut StatementLog,
    encoder: &mut RowEncoder,
    old: *mut pg_sys::TupleTableSlot,
    new: *mut pg_sys::TupleTableSlot,
    filters: Option<&[usize]>,
) {
    // SAFETY: both slots hold rows of the encoder's relation (the caller's contract).
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
        // SAFETY: a non-null `store` is a live transition table (the caller's
        // contract), which supports rewinding read pointers.
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
            // SAFETY: the store is live and `slot` fits its rows (`new`'s contract);
            // the read pointer selected is this reader's.
            && unsafe { pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot) }
    }

    fn rewind(&mut self) {
        if !self.store.is_null() {
            // SAFETY: the store is live (`new`'s contract) and allows rewinding.
            unsafe { pg_sys::tuplestore_rescan(self.store) };
        }
    }

    /// Every remaining tuple, each in a slot of its own (the caller drops them).
    ///
    /// # Safety
    /// The reader's slot must have a valid descriptor (`new`'s contract).
    unsafe fn copy_all(&mut self) -> Vec<*mut pg_sys::TupleTableSlot> {
        let mut slots = Vec::new();
        while self.next() {
            // SAFETY: the reader's slot holds the row just read; the copy is made for
            // the same descriptor.
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
        if std::thread::panicking() {
            // The statement is being aborted: its transition tables go with it, and
            // so does the borrowed slot (the encoder it belongs to is dropped, not
            // given back).
            return;
        }
        // SAFETY: the store and slot are still live (`new`'s contract: the reader
        // does not outlive the trigger call); read pointer 0 is the store's own.
        unsafe {
            if !self.store.is_null() {
                pg_sys::tuplestore_select_read_pointer(self.store, 0);
            }
            // The slot outlives the statement; the tuple it points to does not.
            pg_sys::ExecClearTuple(self.slot);
        }
    }
}

/// # Safety
/// `jsonb` must be a non-null jsonb value.
unsafe fn jsonb_bytes(jsonb: pg_sys::Datum) -> Vec<u8> {
    // SAFETY: a non-null jsonb (the caller's contract) is a varlena.
    unsafe {
        let value = pg_sys::pg_detoast_datum_packed(jsonb.cast_mut_ptr());
        pgrx::varlena::varlena_to_byte_slice(value).to_vec()
    }
}
