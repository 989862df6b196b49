//! The configuration and maintenance entry points (`livesync.track`, `untrack`,
//! `set_policy`, `set_conflict_rules`, `set_filter_columns`, `compact`): C-interface
//! functions that check the caller's privilege, then run the function's steps
//! (PL/pgSQL functions named with a leading `_`): those that write livesync's own
//! tables as the bootstrap
//! superuser (no ordinary role may execute them), the DDL on the caller's table
//! (`track`'s columns and triggers) as the caller, so that every event trigger
//! fires as the table's owner, as for the owner's own ALTER TABLE.
//!
//! Why not SECURITY DEFINER: inside such a function the caller's identity is gone,
//! so it cannot ask whether the caller owns the table. Why not SPI through pgrx: an
//! error a step raises would lose its SQLSTATE (LS002 and the like) on the way
//! back. So the steps run through raw SPI calls from a frame that owns nothing to
//! drop: their errors and notices reach the client exactly as raised, and an error
//! aborts the (sub)transaction, which restores the caller's identity by itself.

use crate::error::{LivesyncError, SqlState};
use crate::privileges::{self, Denied};
use crate::raise::{raise, ErrorToRaise};
use pgrx::pg_sys;
use std::ffi::{c_char, c_int, c_long, CStr};

/// Who may call an entry point.
#[derive(Clone, Copy)]
enum Needs {
    /// The owner of the table in the first argument.
    Ownership,
    /// The owner of the table in the first argument and of every table inheriting
    /// from it (whose columns change with the table's).
    OwnershipOfTree,
    /// The extension's owner or a member of `livesync_maintainer`.
    Maintenance,
}

struct Entry {
    /// As the caller wrote it, for messages.
    name: &'static str,
    /// What it runs, in order, each with the entry point's arguments as $1, $2, ...
    steps: &'static [Step],
    /// The arguments' types, in order.
    arg_types: &'static [pg_sys::Oid],
    needs: Needs,
    /// Whether the last step's single result is the entry point's (else void).
    returns_value: bool,
}

/// One statement of an entry point.
struct Step {
    sql: &'static CStr,
    /// As the bootstrap superuser (livesync's own tables), else as the caller (DDL
    /// on the caller's table, which fires event triggers as the caller).
    elevated: bool,
    /// The statement returns a bool: false ends the entry point there.
    gate: bool,
}

const fn elevated(sql: &'static CStr) -> Step {
    Step {
        sql,
        elevated: true,
        gate: false,
    }
}

const REGCLASS: pg_sys::Oid = pg_sys::REGCLASSOID;
const TEXT: pg_sys::Oid = pg_sys::TEXTOID;
const TEXT_ARRAY: pg_sys::Oid = pg_sys::TEXTARRAYOID;

const TRACK: Entry = Entry {
    name: "livesync.track",
    steps: &[
        Step {
            sql: c"SELECT livesync._track_table($1)",
            elevated: false,
            gate: true,
        },
        elevated(c"SELECT livesync._track_register($1)"),
    ],
    arg_types: &[REGCLASS],
    needs: Needs::OwnershipOfTree,
    returns_value: false,
};
const UNTRACK: Entry = Entry {
    name: "livesync.untrack",
    steps: &[
        elevated(c"SELECT livesync._untrack_register($1)"),
        Step {
            sql: c"SELECT livesync._untrack_table($1)",
            elevated: false,
            gate: false,
        },
    ],
    arg_types: &[REGCLASS],
    needs: Needs::OwnershipOfTree,
    returns_value: false,
};
const SET_COLUMN_POLICY: Entry = Entry {
    name: "livesync.set_policy",
    steps: &[elevated(c"SELECT livesync._set_policy($1, $2, $3)")],
    arg_types: &[REGCLASS, TEXT, TEXT],
    needs: Needs::Ownership,
    returns_value: false,
};
const SET_TABLE_POLICY: Entry = Entry {
    name: "livesync.set_policy",
    steps: &[elevated(c"SELECT livesync._set_policy($1, $2)")],
    arg_types: &[REGCLASS, TEXT],
    needs: Needs::Ownership,
    returns_value: false,
};
const SET_CONFLICT_RULES: Entry = Entry {
    name: "livesync.set_conflict_rules",
    steps: &[elevated(c"SELECT livesync._set_conflict_rules($1, $2, $3)")],
    arg_types: &[REGCLASS, TEXT, TEXT],
    needs: Needs::Ownership,
    returns_value: false,
};
const SET_FILTER_COLUMNS: Entry = Entry {
    name: "livesync.set_filter_columns",
    steps: &[elevated(c"SELECT livesync._set_filter_columns($1, $2)")],
    arg_types: &[REGCLASS, TEXT_ARRAY],
    needs: Needs::Ownership,
    returns_value: false,
};
const COMPACT: Entry = Entry {
    name: "livesync.compact",
    steps: &[elevated(c"SELECT livesync._compact($1)")],
    arg_types: &[pg_sys::INTERVALOID],
    needs: Needs::Maintenance,
    returns_value: true,
};

/// Declares the C symbols of one entry point (`pg_finfo_<name>` and `<name>`).
macro_rules! entry_point {
    ($finfo:ident, $function:ident, $entry:expr) => {
        crate::fmgr::v1_function_info!($finfo);

        /// # Safety
        /// Called by Postgres's function manager only, with a valid `fcinfo`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C-unwind" fn $function(
            fcinfo: pg_sys::FunctionCallInfo,
        ) -> pg_sys::Datum {
            // SAFETY: `fcinfo` is the function manager's call of the SQL function
            // declared for this entry, with its argument types (the caller's contract).
            unsafe { run(fcinfo, &$entry) }
        }
    };
}

entry_point!(pg_finfo_livesync_track, livesync_track, TRACK);
entry_point!(pg_finfo_livesync_untrack, livesync_untrack, UNTRACK);
entry_point!(
    pg_finfo_livesync_set_column_policy,
    livesync_set_column_policy,
    SET_COLUMN_POLICY
);
entry_point!(
    pg_finfo_livesync_set_table_policy,
    livesync_set_table_policy,
    SET_TABLE_POLICY
);
entry_point!(
    pg_finfo_livesync_set_conflict_rules,
    livesync_set_conflict_rules,
    SET_CONFLICT_RULES
);
entry_point!(
    pg_finfo_livesync_set_filter_columns,
    livesync_set_filter_columns,
    SET_FILTER_COLUMNS
);
entry_point!(pg_finfo_livesync_compact, livesync_compact, COMPACT);

unsafe extern "C-unwind" {
    // The SPI and identity calls, unguarded: an error inside the body must pass
    // through this frame untouched (see the module comment).
    fn SPI_connect() -> c_int;
    fn SPI_finish() -> c_int;
    fn SPI_execute_with_args(
        src: *const c_char,
        nargs: c_int,
        argtypes: *mut pg_sys::Oid,
        values: *mut pg_sys::Datum,
        nulls: *const c_char,
        read_only: bool,
        tcount: c_long,
    ) -> c_int;
    fn SPI_getbinval(
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
        fnumber: c_int,
        isnull: *mut bool,
    ) -> pg_sys::Datum;
    fn GetUserIdAndSecContext(userid: *mut pg_sys::Oid, sec_context: *mut c_int);
    fn SetUserIdAndSecContext(userid: pg_sys::Oid, sec_context: c_int);
}

/// The most arguments an entry point has.
const MAX_ARGS: usize = 3;

/// # Safety
/// `fcinfo` must be a call of the SQL function `entry` describes (its arguments of
/// `entry.arg_types`). Runs unguarded: nothing here may need a drop (see the module
/// comment).
unsafe fn run(fcinfo: pg_sys::FunctionCallInfo, entry: &Entry) -> pg_sys::Datum {
    // SAFETY: `fcinfo` has `entry.arg_types.len()` (at most MAX_ARGS) arguments of
    // those types (the caller's contract), copied into arrays of MAX_ARGS. This frame
    // owns nothing that needs a drop, so an error a step raises may longjmp through
    // it; the caller's identity is restored after every step, and by the abort when
    // one raises. Only by-value results are read, before SPI_finish.
    unsafe {
        let denied = check_caller(fcinfo, entry);
        if !denied.is_null() {
            raise(&*denied);
        }
        let nargs = entry.arg_types.len();
        let mut types = [pg_sys::InvalidOid; MAX_ARGS];
        let mut values = [pg_sys::Datum::from(0usize); MAX_ARGS];
        let mut nulls = [b' ' as c_char; MAX_ARGS];
        let args = (*fcinfo).args.as_slice(nargs);
        for (i, arg) in args.iter().enumerate() {
            types[i] = entry.arg_types[i];
            values[i] = arg.value;
            if arg.isnull {
                nulls[i] = b'n' as c_char;
            }
        }

        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        GetUserIdAndSecContext(&mut user, &mut context);
        if SPI_connect() < 0 {
            let failed = ErrorToRaise::of(&LivesyncError::Internal(format!(
                "{} could not connect to SPI",
                entry.name
            )));
            raise(&*failed);
        }
        let mut isnull = true;
        let mut result = pg_sys::Datum::from(0usize);
        for step in entry.steps {
            if step.elevated {
                SetUserIdAndSecContext(
                    pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
                    context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as c_int,
                );
            }
            let status = SPI_execute_with_args(
                step.sql.as_ptr(),
                nargs as c_int,
                types.as_mut_ptr(),
                values.as_mut_ptr(),
                nulls.as_ptr(),
                false,
                0,
            );
            SetUserIdAndSecContext(user, context);
            if status < 0 {
                let failed = ErrorToRaise::of(&LivesyncError::Internal(format!(
                    "{} failed to run a step (SPI code {status})",
                    entry.name
                )));
                raise(&*failed);
            }
            let table = pg_sys::SPI_tuptable;
            isnull = true;
            if status == pg_sys::SPI_OK_SELECT as c_int
                && !table.is_null()
                && pg_sys::SPI_processed == 1
            {
                // By-value results only (a bool, compact's bigint): they outlive SPI_finish.
                result = SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
            }
            if step.gate && (isnull || result.value() == 0) {
                break;
            }
        }
        SPI_finish();
        if entry.returns_value {
            (*fcinfo).isnull = isnull;
        }
        result
    }
}

/// Checks the caller's privilege; returns the error to raise, or null. Under
/// pgrx's guard: a missing relation raises here, with its own (known) SQLSTATE.
///
/// # Safety
/// As for `run`.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_caller(
    fcinfo: pg_sys::FunctionCallInfo,
    entry: &Entry,
) -> *mut ErrorToRaise {
    // SAFETY: every entry has at least one argument (the table, or compact's
    // interval), so the first argument exists (the caller's contract); for the
    // ownership checks it is a regclass, an oid by value.
    unsafe {
        let display = crate::catalog::relation_display;
        let verdict: Result<(), Denied> = match entry.needs {
            Needs::Maintenance => privileges::require_maintenance(entry.name),
            ownership => {
                // The table is the first argument; a NULL one the steps refuse
                // before they touch anything.
                let first = (*fcinfo).args.as_slice(1)[0];
                if first.isnull {
                    Ok(())
                } else {
                    let relid = pg_sys::Oid::from(first.value.value() as u32);
                    match ownership {
                        Needs::OwnershipOfTree => {
                            privileges::require_ownership_of_tree(relid, entry.name, display)
                        }
                        _ => privileges::require_ownership(relid, entry.name, || display(relid)),
                    }
                }
            }
        };
        match verdict {
            Ok(()) => std::ptr::null_mut(),
            Err(denied) => ErrorToRaise::palloc(
                SqlState::InsufficientPrivilege,
                &denied.message,
                Some(&denied.hint),
            ),
        }
    }
}
