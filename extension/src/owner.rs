//! Running livesync's own reads and writes as the bootstrap superuser, from
//! triggers, commit callbacks and `livesync.write`.
//!
//! A commit-time tick or a write runs inside the writer's transaction with the
//! writer's identity, but the writer must not need (or get) privileges on livesync's
//! tables: otherwise any role that can write a tracked table could also forge log
//! entries. What runs here is livesync's fixed code and statements, so running it as
//! the superuser hands the caller nothing.

use pgrx::pg_sys;

/// Runs `f` with the current user switched to the bootstrap superuser. An error
/// inside `f` aborts the (sub)transaction, which restores the user by itself.
pub fn as_bootstrap_superuser<R>(f: impl FnOnce() -> R) -> R {
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
