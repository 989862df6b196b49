//! Reading the change log one change per row: `livesync.changes_since(after,
//! max_changes)` (declared in sql/log.sql).
//!
//! It first runs the checks it shares with `change_runs` (`livesync._check_read`,
//! PL/pgSQL: membership in livesync_reader, the page size, LS001), called from a frame
//! that pgrx does not guard and that owns nothing, so that their errors reach the
//! caller as raised: an error passing through pgrx keeps its SQLSTATE only if pgrx
//! knows the code, and LS001 is livesync's own. A PL/pgSQL wrapper would do the same
//! at the price of copying every row once more (10-20% of the read).
//!
//! The log stores runs: one `livesync.changes` row holds up to a thousand changes as
//! a jsonb array of `[key, old, new, version]` (an update of a table with filter
//! columns has a fifth element, the filter columns it left unchanged, which the
//! delta leaves out: it holds what changed). `livesync._runs_since` picks the
//! runs of the whole transactions a page returns, in position order (the same runs
//! `livesync.change_runs` returns); this function walks each run's array in its
//! binary form and writes one result row per change: the key as stored, and the
//! delta built with Postgres's jsonb builder from the old and new values — exactly
//! what the SQL it replaces (`jsonb_array_elements` and a `_delta` SQL function per
//! change) returned, at several times its speed (bench/README.md, issue 12).
//!
//! A run is exploded with Postgres's jsonb and tuplestore calls made directly (`raw`),
//! under one pgrx error guard for the whole run: pgrx's own bindings set a guard up
//! around every call (a `sigsetjmp` each), which took a third of the time here. The
//! code under that guard must neither panic nor hold anything that needs a drop: an
//! ERROR raised inside it jumps straight back to the guard, which turns it into a
//! Rust panic there. So it reports a malformed run back as a value instead of raising.

use crate::error::LivesyncError;
use crate::pg_resources::{ContextSize, OwnedMemoryContext};
use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::c_char;

/// `livesync.changes_since`'s result columns, in order.
const COLUMNS: usize = 11;
/// `livesync._runs_since`'s columns as the query below selects them.
const RUN_COLUMNS: usize = 9;

const RUNS_QUERY: &std::ffi::CStr = c"SELECT first_position, relation, op, entries, actor, tx, \
    committed_at, client_id, mutation_id FROM livesync._runs_since($1, $2)";

thread_local! {
    /// `RUNS_QUERY`, prepared once per backend. A kept plan is re-checked by the plan
    /// cache before each use, so it follows `_runs_since` being replaced or dropped.
    static RUNS_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

crate::fmgr::v1_function_info!(pg_finfo_livesync_changes_since);

/// `livesync.changes_since(after bigint, max_changes int)`: STRICT, STABLE, a set
/// returned in materialize mode. The checks, then the rows.
///
/// # Safety
/// Called by Postgres's function manager only, with a valid `fcinfo`.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn livesync_changes_since(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: `fcinfo` is the function manager's (the caller's contract). The check
    // is an unguarded call from a frame that holds nothing needing a drop (see the
    // module comment); `check_call` set up a complete call of the function fmgr_info
    // looked up (which always sets fn_addr).
    unsafe {
        let check = check_call(fcinfo);
        if let Some(function) = (*(*check).flinfo).fn_addr {
            function(check);
        }
        read_changes(fcinfo)
    }
}

/// A call of `livesync._check_read('livesync.changes_since', after, max_changes)`,
/// ready to run (in the current memory context).
///
/// # Safety
/// `fcinfo` must be the call of `livesync.changes_since` (two arguments).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_call(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::FunctionCallInfo {
    // SAFETY: the call info is allocated zeroed with room for its three arguments,
    // which are set from `fcinfo`'s two (the caller's contract) and a text made here.
    unsafe {
        // Types qualified too: the caller's search_path is in force here.
        let signature = c"livesync._check_read(pg_catalog.text, pg_catalog.int8, pg_catalog.int4)";
        let Some(function) = pgrx::direct_function_call_as_datum(
            pg_sys::to_regprocedure,
            &[Some(pg_sys::Datum::from(pg_sys::cstring_to_text(
                signature.as_ptr(),
            )))],
        ) else {
            LivesyncError::NotInstalled.raise();
        };
        let flinfo =
            pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()).cast::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info(pg_sys::Oid::from(function.value() as u32), flinfo);
        let check = pg_sys::palloc0(
            std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>()
                + 3 * std::mem::size_of::<pg_sys::NullableDatum>(),
        )
        .cast::<pg_sys::FunctionCallInfoBaseData>();
        (*check).flinfo = flinfo;
        (*check).nargs = 3;
        (*check).fncollation = pg_sys::InvalidOid;
        let name = c"livesync.changes_since";
        let args = (*check).args.as_mut_slice(3);
        args[0].value = pg_sys::Datum::from(pg_sys::cstring_to_text(name.as_ptr()));
        args[1].value = (*fcinfo).args.as_slice(2)[0].value;
        args[2].value = (*fcinfo).args.as_slice(2)[1].value;
        check
    }
}

/// The rows of `livesync.changes_since`, once checked. Reads with the caller's
/// snapshot (read-only SPI), so it sees what the checks saw.
///
/// # Safety
/// `fcinfo` must be the call of `livesync.changes_since`, a set-returning call.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_changes(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: `fcinfo` is a set-returning call with two non-null arguments (the
    // caller's contract; the function is STRICT). The result descriptor's and the
    // runs' column counts are checked before rows are read or written by position,
    // and SPI's result is read before SPI_finish frees it.
    unsafe {
        // STRICT: neither argument is NULL.
        let after = pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 0).unwrap_or_default();
        let max_changes = pgrx::fcinfo::pg_getarg::<i32>(fcinfo, 1).unwrap_or_default();
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let rsinfo = (*fcinfo).resultinfo.cast::<pg_sys::ReturnSetInfo>();
        let out = Output {
            store: (*rsinfo).setResult,
            desc: (*rsinfo).setDesc,
            ops: OpNames::new(),
        };
        if (*out.desc).natts as usize != COLUMNS {
            LivesyncError::LogTableChanged.raise();
        }

        // What a run's rows are built in, emptied after each run. Made before SPI's
        // own context, in the function's call context, and deleted after SPI_finish.
        let mut scratch = OwnedMemoryContext::new(
            pg_sys::CurrentMemoryContext,
            c"livesync changes_since",
            ContextSize::Default,
        );
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            crate::error::internal("changes_since could not connect to SPI");
        }
        let mut args = [pg_sys::Datum::from(after), pg_sys::Datum::from(max_changes)];
        let status =
            pg_sys::SPI_execute_plan(runs_plan(), args.as_mut_ptr(), std::ptr::null(), true, 0);
        if status != pg_sys::SPI_OK_SELECT as i32 {
            crate::error::internal(format!(
                "changes_since failed to read the runs (SPI code {status})"
            ));
        }
        let table = pg_sys::SPI_tuptable;
        if (*(*table).tupdesc).natts as usize != RUN_COLUMNS {
            LivesyncError::LogTableChanged.raise();
        }
        for i in 0..pg_sys::SPI_processed as usize {
            let mut values = [pg_sys::Datum::from(0usize); RUN_COLUMNS];
            let mut nulls = [false; RUN_COLUMNS];
            pg_sys::heap_deform_tuple(
                *(*table).vals.add(i),
                (*table).tupdesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            // Every column but client_id and mutation_id is NOT NULL in the log.
            if nulls[..7].iter().any(|&null| null) {
                LivesyncError::MalformedRun.raise();
            }
            let run = Run {
                first_position: values[0].value() as i64,
                relation: values[1],
                op: values[2].value() as u8,
                entries: values[3],
                actor: values[4],
                tx: values[5],
                committed_at: values[6],
                client_id: (!nulls[7]).then_some(values[7]),
                mutation_id: (!nulls[8]).then_some(values[8]),
            };
            {
                let _in_scratch = scratch.switch_to();
                out.write_run(&run);
            }
            scratch.reset();
        }
        pg_sys::SPI_finish();
        drop(scratch);
        pg_sys::Datum::from(0usize)
    }
}

/// The kept plan of `RUNS_QUERY`, prepared on first use.
///
/// # Safety
/// Must be called with SPI connected.
unsafe fn runs_plan() -> pg_sys::SPIPlanPtr {
    RUNS_PLAN.with(|cached| {
        if cached.get().is_null() {
            // SAFETY: SPI is connected (the caller's contract); the argument types
            // match the query's two parameters, and a kept plan outlives the call.
            unsafe {
                let mut types = [pg_sys::INT8OID, pg_sys::INT4OID];
                let plan = pg_sys::SPI_prepare(RUNS_QUERY.as_ptr(), 2, types.as_mut_ptr());
                if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                    crate::error::internal("changes_since could not prepare the runs query");
                }
                cached.set(plan);
            }
        }
        cached.get()
    })
}

/// One `livesync.changes` row as `_runs_since` returns it: `entries` holds only the
/// changes after the position read from, the first of them at `first_position`.
struct Run {
    first_position: i64,
    relation: pg_sys::Datum,
    op: u8,
    entries: pg_sys::Datum,
    actor: pg_sys::Datum,
    tx: pg_sys::Datum,
    committed_at: pg_sys::Datum,
    client_id: Option<pg_sys::Datum>,
    mutation_id: Option<pg_sys::Datum>,
}

/// Where the rows go: the result tuplestore and its descriptor.
struct Output {
    store: *mut pg_sys::Tuplestorestate,
    desc: pg_sys::TupleDesc,
    ops: OpNames,
}

impl Output {
    /// Writes one row per change of `run`, under one error guard (see the module
    /// comment). Allocates in the current memory context (the tuplestore copies each
    /// row into its own).
    ///
    /// # Safety
    /// `run`'s datums must be a `livesync.changes` row's, as `_runs_since` returns
    /// them; the output's store and descriptor live.
    unsafe fn write_run(&self, run: &Run) {
        // SAFETY: `explode` calls Postgres only through `raw`, never panics, and holds
        // nothing that needs a drop, which is what the guard asks of its closure.
        let exploded = unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| self.explode(run)) };
        if exploded.is_err() {
            LivesyncError::MalformedRun.raise();
        }
    }

    /// The body of `write_run`: Postgres calls through `raw` only, no panics.
    ///
    /// # Safety
    /// As for `write_run`, and only under `pg_guard_ffi_boundary`.
    unsafe fn explode(&self, run: &Run) -> Result<(), Malformed> {
        // SAFETY: `entries` is jsonb (the caller's contract), checked to be an array
        // before it is iterated; each row written has the output's COLUMNS columns.
        unsafe {
            let entries = raw::pg_detoast_datum(run.entries.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
            let root = &raw mut (*entries).root;
            if (*root).header & pg_sys::JB_FARRAY == 0 || (*root).header & pg_sys::JB_FSCALAR != 0 {
                return Err(Malformed);
            }
            let mut values = [pg_sys::Datum::from(0usize); COLUMNS];
            let mut nulls = [false; COLUMNS];
            values[1] = run.relation;
            match self.ops.get(run.op) {
                Some(name) => values[2] = name,
                None => nulls[2] = true,
            }
            values[6] = run.actor;
            values[7] = run.tx;
            values[8] = run.committed_at;
            match run.client_id {
                Some(client_id) => values[9] = client_id,
                None => nulls[9] = true,
            }
            match run.mutation_id {
                Some(mutation_id) => values[10] = mutation_id,
                None => nulls[10] = true,
            }

            let mut position = run.first_position;
            let mut iterator = raw::JsonbIteratorInit(root);
            let mut element = std::mem::zeroed::<pg_sys::JsonbValue>();
            loop {
                match raw::JsonbIteratorNext(&mut iterator, &mut element, true) {
                    pg_sys::JsonbIteratorToken::WJB_DONE => break,
                    pg_sys::JsonbIteratorToken::WJB_ELEM => {}
                    _ => continue, // the array's begin and end
                }
                let change = Change::of(&element)?;
                values[0] = pg_sys::Datum::from(position);
                match change.key() {
                    Some(key) => {
                        values[3] = key;
                        nulls[3] = false;
                    }
                    None => nulls[3] = true,
                }
                values[4] = change.delta(run.op)?;
                match change.version()? {
                    Some(version) => {
                        values[5] = version;
                        nulls[5] = false;
                    }
                    None => nulls[5] = true,
                }
                raw::tuplestore_putvalues(
                    self.store,
                    self.desc,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                position += 1;
            }
            Ok(())
        }
    }
}

/// A run that is not what capture writes.
struct Malformed;

/// The `op` column's text for each kind of run, made once per call.
struct OpNames {
    names: [pg_sys::Datum; 5],
}

impl OpNames {
    const KINDS: [(u8, &'static str); 5] = [
        (b'i', "insert"),
        (b'u', "update"),
        (b'd', "delete"),
        (b't', "truncate"),
        (b's', "schema"),
    ];

    fn new() -> OpNames {
        OpNames {
            // SAFETY: the pointer and length describe a static str, which is copied.
            names: Self::KINDS.map(|(_, name)| unsafe {
                pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                    name.as_ptr().cast(),
                    name.len() as i32,
                ))
            }),
        }
    }

    /// NULL for a kind that is not a change (as the SQL `CASE` it replaces).
    fn get(&self, op: u8) -> Option<pg_sys::Datum> {
        Self::KINDS
            .iter()
            .position(|&(kind, _)| kind == op)
            .map(|i| self.names[i])
    }
}

/// One change, `[key, old, new, version]`, in its binary form; a missing element
/// reads as SQL NULL, as `->` gives it. Elements after the fourth (an update's
/// unchanged filter columns) are not read.
struct Change {
    parts: [*mut pg_sys::JsonbValue; 4],
}

impl Change {
    /// # Safety
    /// `element` must be an element of a jsonb array being iterated (its container
    /// alive while the change is used).
    unsafe fn of(element: &pg_sys::JsonbValue) -> Result<Change, Malformed> {
        // SAFETY: the binary container is read only once it is checked to be one, and
        // to be an array; getIth returns null past its end.
        unsafe {
            if element.type_ != pg_sys::jbvType::jbvBinary
                || (*element.val.binary.data).header & pg_sys::JB_FARRAY == 0
            {
                return Err(Malformed);
            }
            let container = element.val.binary.data;
            Ok(Change {
                parts: [0, 1, 2, 3].map(|i| raw::getIthJsonbValueFromContainer(container, i)),
            })
        }
    }

    /// `nullif(change -> 0, 'null')`.
    ///
    /// # Safety
    /// The change's container must be alive (`of`'s contract).
    unsafe fn key(&self) -> Option<pg_sys::Datum> {
        let key = self.parts[0];
        // SAFETY: a non-null part is a value getIth returned, alive with its container.
        unsafe {
            if key.is_null() || (*key).type_ == pg_sys::jbvType::jbvNull {
                return None;
            }
            Some(pg_sys::Datum::from(raw::JsonbValueToJsonb(key)))
        }
    }

    /// `(change ->> 3)::bigint`, as an int8 datum.
    ///
    /// # Safety
    /// As for `key`, and only under `pg_guard_ffi_boundary` (the cast can raise).
    unsafe fn version(&self) -> Result<Option<pg_sys::Datum>, Malformed> {
        let version = self.parts[3];
        // SAFETY: a non-null part is alive with its container; it is cast only once
        // checked to be a numeric.
        unsafe {
            if version.is_null() || (*version).type_ == pg_sys::jbvType::jbvNull {
                return Ok(None);
            }
            if (*version).type_ != pg_sys::jbvType::jbvNumeric {
                return Err(Malformed);
            }
            Ok(Some(raw::DirectFunctionCall1Coll(
                Some(raw::numeric_int8),
                pg_sys::InvalidOid,
                pg_sys::Datum::from((*version).val.numeric),
            )))
        }
    }

    /// The delta of one change, as `livesync._delta` (0.3.0) built it:
    /// - insert: `{column: {"new": value}}` for every column of new;
    /// - delete: `{column: {"old": value}}` for every column of old;
    /// - update: `{column: {"new": value, "old": old -> column}}` for every column of new;
    /// - schema: `{"columns": {"new": new -> 'columns', "old": old -> 'columns'}}`;
    /// - anything else (truncate): `{}`.
    ///
    /// # Safety
    /// As for `key`, and only under `pg_guard_ffi_boundary`.
    unsafe fn delta(&self, op: u8) -> Result<pg_sys::Datum, Malformed> {
        let [_, old, new, _] = self.parts;
        let mut delta = Builder::new();
        // SAFETY: old and new are null or values alive with their container, which
        // each_pair and field check before reading; the builder gets balanced tokens
        // (every begin_object is ended) and keys before values.
        unsafe {
            delta.begin_object();
            match op {
                b'i' => each_pair(new, |column, value| {
                    delta.key(column);
                    delta.begin_object();
                    delta.key_value(NEW, value);
                    delta.end_object();
                })?,
                b'd' => each_pair(old, |column, value| {
                    delta.key(column);
                    delta.begin_object();
                    delta.key_value(OLD, value);
                    delta.end_object();
                })?,
                b'u' => each_pair(new, |column, value| {
                    let mut found = std::mem::zeroed::<pg_sys::JsonbValue>();
                    let before = field(old, &column.val.string, &mut found);
                    delta.key(column);
                    delta.begin_object();
                    delta.key_value(NEW, value);
                    delta.key_value(OLD, before);
                    delta.end_object();
                })?,
                b's' => {
                    let mut found_new = std::mem::zeroed::<pg_sys::JsonbValue>();
                    let mut found_old = std::mem::zeroed::<pg_sys::JsonbValue>();
                    let columns = COLUMNS_KEY.as_jsonb_string();
                    let after = field(new, &columns, &mut found_new);
                    let before = field(old, &columns, &mut found_old);
                    delta.key(&mut COLUMNS_KEY.as_jsonb_value());
                    delta.begin_object();
                    delta.key_value(NEW, after);
                    delta.key_value(OLD, before);
                    delta.end_object();
                }
                _ => {}
            }
            delta.end_object();
            Ok(delta.finish())
        }
    }
}

/// A key the deltas use, as a jsonb string pointing at static bytes.
struct StaticKey(&'static str);

const NEW: &StaticKey = &StaticKey("new");
const OLD: &StaticKey = &StaticKey("old");
const COLUMNS_KEY: &StaticKey = &StaticKey("columns");

impl StaticKey {
    fn as_jsonb_string(&self) -> pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
        pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
            len: self.0.len() as i32,
            val: self.0.as_ptr().cast::<c_char>().cast_mut(),
        }
    }

    fn as_jsonb_value(&self) -> pg_sys::JsonbValue {
        // SAFETY: JsonbValue is a plain C struct, for which all zeroes is valid.
        let mut value = unsafe { std::mem::zeroed::<pg_sys::JsonbValue>() };
        value.type_ = pg_sys::jbvType::jbvString;
        value.val.string = self.as_jsonb_string();
        value
    }
}

/// Calls `f(key, value)` for each pair of an object (none for SQL NULL), in the
/// object's key order. Like `jsonb_each`, refuses any other JSON value.
///
/// # Safety
/// `object` must be null or a jsonb value alive while this runs; only under
/// `pg_guard_ffi_boundary`.
unsafe fn each_pair(
    object: *mut pg_sys::JsonbValue,
    mut f: impl FnMut(&mut pg_sys::JsonbValue, &mut pg_sys::JsonbValue),
) -> Result<(), Malformed> {
    // SAFETY: the container is iterated only once checked to be an object's, and
    // an object's keys are each followed by their value.
    unsafe {
        if object.is_null() {
            return Ok(());
        }
        if (*object).type_ != pg_sys::jbvType::jbvBinary
            || (*(*object).val.binary.data).header & pg_sys::JB_FOBJECT == 0
        {
            return Err(Malformed);
        }
        let mut iterator = raw::JsonbIteratorInit((*object).val.binary.data);
        let mut key = std::mem::zeroed::<pg_sys::JsonbValue>();
        let mut value = std::mem::zeroed::<pg_sys::JsonbValue>();
        loop {
            match raw::JsonbIteratorNext(&mut iterator, &mut key, true) {
                pg_sys::JsonbIteratorToken::WJB_DONE => return Ok(()),
                pg_sys::JsonbIteratorToken::WJB_KEY => {
                    raw::JsonbIteratorNext(&mut iterator, &mut value, true);
                    f(&mut key, &mut value);
                }
                _ => {} // the object's begin and end
            }
        }
    }
}

/// `object -> name` as a value to push: the field, or JSON null when `object` is SQL
/// NULL, not an object, or has no such field (`jsonb_build_object` turns the SQL
/// NULL that `->` gives into JSON null). `found` holds the field's value.
///
/// # Safety
/// As for `each_pair`; `name` must describe valid bytes.
unsafe fn field(
    object: *mut pg_sys::JsonbValue,
    name: &pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1,
    found: &mut pg_sys::JsonbValue,
) -> *mut pg_sys::JsonbValue {
    // SAFETY: the container is searched only once checked to be an object's; the
    // lookup writes its result into `found`.
    unsafe {
        let is_object = !object.is_null()
            && (*object).type_ == pg_sys::jbvType::jbvBinary
            && (*(*object).val.binary.data).header & pg_sys::JB_FOBJECT != 0;
        if !is_object
            || raw::getKeyJsonValueFromContainer(
                (*object).val.binary.data,
                name.val,
                name.len,
                found,
            )
            .is_null()
        {
            found.type_ = pg_sys::jbvType::jbvNull;
        }
        found
    }
}

/// Postgres's jsonb builder, one token at a time.
struct Builder {
    state: *mut pg_sys::JsonbParseState,
    last: *mut pg_sys::JsonbValue,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            state: std::ptr::null_mut(),
            last: std::ptr::null_mut(),
        }
    }

    /// # Safety
    /// Only under `pg_guard_ffi_boundary`; `value` null for begin/end tokens, a
    /// complete value otherwise.
    unsafe fn push(
        &mut self,
        token: pg_sys::JsonbIteratorToken::Type,
        value: *mut pg_sys::JsonbValue,
    ) {
        // SAFETY: `state` is this builder's own parse state, and `value` fits the
        // token (the caller's contract).
        self.last = unsafe { raw::pushJsonbValue(&mut self.state, token, value) };
    }

    /// # Safety
    /// Only under `pg_guard_ffi_boundary`.
    unsafe fn begin_object(&mut self) {
        // SAFETY: a begin token takes no value.
        unsafe {
            self.push(
                pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT,
                std::ptr::null_mut(),
            )
        };
    }

    /// # Safety
    /// Only under `pg_guard_ffi_boundary`, after a `begin_object`.
    unsafe fn end_object(&mut self) {
        // SAFETY: an end token takes no value.
        unsafe {
            self.push(
                pg_sys::JsonbIteratorToken::WJB_END_OBJECT,
                std::ptr::null_mut(),
            )
        };
    }

    /// # Safety
    /// Only under `pg_guard_ffi_boundary`, inside an object; `key` a string value.
    unsafe fn key(&mut self, key: &mut pg_sys::JsonbValue) {
        // SAFETY: `key` is a complete string value (the caller's contract).
        unsafe { self.push(pg_sys::JsonbIteratorToken::WJB_KEY, key) };
    }

    /// `key: value`; a nested container in `value` (jbvBinary) is copied in whole.
    ///
    /// # Safety
    /// Only under `pg_guard_ffi_boundary`, inside an object; `value` complete.
    unsafe fn key_value(&mut self, key: &StaticKey, value: *mut pg_sys::JsonbValue) {
        // SAFETY: the key is a string value of static bytes, and `value` complete
        // (the caller's contract).
        unsafe {
            self.key(&mut key.as_jsonb_value());
            self.push(pg_sys::JsonbIteratorToken::WJB_VALUE, value);
        }
    }

    /// The finished value, after the outermost `end_object`.
    ///
    /// # Safety
    /// Only under `pg_guard_ffi_boundary`, after the outermost `end_object`.
    unsafe fn finish(self) -> pg_sys::Datum {
        // SAFETY: after the outermost end token `last` is the whole value.
        unsafe { pg_sys::Datum::from(raw::JsonbValueToJsonb(self.last)) }
    }
}

/// The Postgres functions `explode` calls, declared without pgrx's per-call guard:
/// call them only under `pg_guard_ffi_boundary` (see the module comment).
#[allow(non_snake_case)]
mod raw {
    use pgrx::pg_sys::{
        Datum, FunctionCallInfo, Jsonb, JsonbContainer, JsonbIterator, JsonbIteratorToken,
        JsonbParseState, JsonbValue, Oid, PGFunction, TupleDesc, Tuplestorestate,
    };
    use std::ffi::{c_char, c_int};

    unsafe extern "C-unwind" {
        pub fn pg_detoast_datum(datum: *mut pgrx::pg_sys::varlena) -> *mut pgrx::pg_sys::varlena;
        pub fn JsonbIteratorInit(container: *mut JsonbContainer) -> *mut JsonbIterator;
        pub fn JsonbIteratorNext(
            it: *mut *mut JsonbIterator,
            val: *mut JsonbValue,
            skip_nested: bool,
        ) -> JsonbIteratorToken::Type;
        pub fn getIthJsonbValueFromContainer(
            container: *mut JsonbContainer,
            i: u32,
        ) -> *mut JsonbValue;
        pub fn getKeyJsonValueFromContainer(
            container: *mut JsonbContainer,
            key: *const c_char,
            key_len: c_int,
            res: *mut JsonbValue,
        ) -> *mut JsonbValue;
        pub fn pushJsonbValue(
            state: *mut *mut JsonbParseState,
            token: JsonbIteratorToken::Type,
            value: *mut JsonbValue,
        ) -> *mut JsonbValue;
        pub fn JsonbValueToJsonb(value: *mut JsonbValue) -> *mut Jsonb;
        pub fn tuplestore_putvalues(
            state: *mut Tuplestorestate,
            desc: TupleDesc,
            values: *mut Datum,
            nulls: *mut bool,
        );
        pub fn DirectFunctionCall1Coll(function: PGFunction, collation: Oid, arg: Datum) -> Datum;
        pub fn numeric_int8(fcinfo: FunctionCallInfo) -> Datum;
    }
}
