//! Running livesync's own reads and writes as the bootstrap superuser, from
//! triggers, commit callbacks and `livesync.write`.
//!
//! A commit-time tick or a write runs inside the writer's transaction with the
//! writer's identity, but the writer must not need (or get) privileges on livesync's
//! tables: otherwise any role that can write a tracked table could also forge log
//! entries. What runs here is livesync's fixed code and statements, so running it as
//! the superuser hands the caller nothing, provided nothing of the caller's runs
//! too: see `sql_as_bootstrap_superuser`.

use pgrx::pg_sys;

/// Runs `f` with the current user switched to the bootstrap superuser. For direct
/// heap and index work only (capture, ticks): `f` must not run SQL, whose names
/// would resolve through the caller's `search_path` (use
/// `sql_as_bootstrap_superuser`). An error inside `f` aborts the (sub)transaction,
/// which restores the user by itself.
pub fn as_bootstrap_superuser<R>(f: impl FnOnce() -> R) -> R {
    as_superuser_with(0, f)
}

/// Runs SQL statements in `f` as the bootstrap superuser, the way Postgres runs a
/// SECURITY DEFINER function with a pinned `search_path`: every name resolves in
/// `pg_catalog` (a caller's `search_path` could otherwise put its own `=` or
/// `hashtext` in front of the catalog's, and have it run as the superuser), and the
/// operation is security-restricted. Statements prepared earlier under another
/// `search_path` are re-analysed under this one before they run (plan cache).
/// The statements must touch only livesync's tables and the catalogs: values of a
/// user's table would bring the table owner's code (domain checks, casts) along.
pub fn sql_as_bootstrap_superuser<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: set_config_option is given NUL-terminated strings and a valid context
    // and source; the GUC nest level opened here is closed after `f`, or by the
    // (sub)transaction's abort when `f` raises.
    as_superuser_with(pg_sys::SECURITY_RESTRICTED_OPERATION as i32, || unsafe {
        // As fmgr_security_definer does for a function's SET clause: undone below,
        // or by the (sub)transaction's abort if `f` raises.
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = f();
        pg_sys::AtEOXact_GUC(true, nest_level);
        result
    })
}

/// Runs `f` as the bootstrap superuser, with `extra` added to the security context.
fn as_superuser_with<R>(extra: i32, f: impl FnOnce() -> R) -> R {
    // SAFETY: the user and security context are saved and restored around `f` (as
    // Postgres's own SECURITY DEFINER calls do); when `f` raises, the
    // (sub)transaction's abort restores them instead. The bootstrap superuser
    // always exists.
    unsafe {
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | extra,
        );
        let result = f();
        pg_sys::SetUserIdAndSecContext(user, context);
        result
    }
}
