//! Running livesync's own statements (the sequencer's tick) from commit callbacks
//! and the worker: kept generic plans without JIT, executed as the bootstrap
//! superuser against a given snapshot.
//!
//! A commit-time tick runs inside the writer's transaction with the writer's
//! identity, but the writer must not need (or get) privileges on livesync's tables:
//! otherwise any role that can write a tracked table could also forge log entries.
//! The statements here are fixed, schema-qualified and parameterised, so running them
//! as the superuser hands the caller nothing.

use pgrx::pg_sys;
use std::cell::Cell;
use std::ffi::CStr;
use std::thread::LocalKey;

/// A plan prepared on first use and kept for the life of the backend. Postgres
/// revalidates kept plans itself when the objects they use change.
pub struct CachedPlan(Cell<pg_sys::SPIPlanPtr>);

impl CachedPlan {
    pub const fn new() -> Self {
        CachedPlan(Cell::new(std::ptr::null_mut()))
    }
}

/// Runs `f` with the current user switched to the bootstrap superuser. An error
/// inside `f` aborts the (sub)transaction, which restores the user by itself.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let result = f();
        pg_sys::SetUserIdAndSecContext(user, context);
        result
    }
}

/// Executes a kept plan whose arguments are all `xid8` against a given snapshot
/// (instead of the transaction's), returning the first column of the first row as int8.
///
/// # Safety
/// `snapshot` must be a registered snapshot that outlives the call.
pub unsafe fn execute_cached_with_snapshot(
    cache: &'static LocalKey<CachedPlan>,
    sql: &CStr,
    xid8_args: &mut [pg_sys::Datum],
    snapshot: pg_sys::Snapshot,
) -> Option<i64> {
    let types = vec![pg_sys::XID8OID; xid8_args.len()];
    let args = xid8_args;
    unsafe {
        // Applied like a function's SET clause, so planning inside this call (the
        // first execution, and re-planning after an invalidation) sees them too:
        // - no JIT: generic plans are costed pessimistically, which can cross
        //   jit_above_cost and compile expressions on every execution (tens of
        //   milliseconds for a statement that runs in microseconds);
        // - no sequential scans: a plan made while the statistics say the log is
        //   empty would scan the whole log on every tick for as long as it is kept,
        //   however large the log grows (seen in a benchmark run: 80 us of tick per
        //   sequenced transaction instead of 7).
        let guc_level = pg_sys::NewGUCNestLevel();
        for (name, value) in [(c"jit", c"off"), (c"enable_seqscan", c"off")] {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        pg_sys::SPI_connect();
        let plan = cache.with(|cached| {
            if cached.0.get().is_null() {
                // Generic plan: these statements run on every write or commit, and
                // re-planning them each time would cost more than running them.
                let plan = pg_sys::SPI_prepare_cursor(
                    sql.as_ptr(),
                    types.len() as i32,
                    types.as_ptr().cast_mut(),
                    pg_sys::CURSOR_OPT_GENERIC_PLAN as i32,
                );
                if plan.is_null() {
                    pgrx::error!("livesync: could not prepare an internal statement");
                }
                pg_sys::SPI_keepplan(plan);
                cached.0.set(plan);
            }
            cached.0.get()
        });
        let rc = pg_sys::SPI_execute_snapshot(
            plan,
            args.as_mut_ptr(),
            std::ptr::null(),
            snapshot,
            std::ptr::null_mut(),
            false,
            false,
            0,
        );
        if rc < 0 {
            pgrx::error!("livesync: internal statement failed (SPI code {rc})");
        }
        let mut result = None;
        let table = pg_sys::SPI_tuptable;
        if pg_sys::SPI_processed > 0 && !table.is_null() {
            let mut is_null = false;
            let value = pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut is_null);
            if !is_null {
                result = Some(value.value() as i64);
            }
        }
        pg_sys::SPI_finish();
        pg_sys::AtEOXact_GUC(true, guc_level);
        result
    }
}
