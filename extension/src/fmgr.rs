//! What livesync's hand-written C-interface functions share besides their bodies:
//! the record telling Postgres they use the version-1 calling convention, and the
//! unguarded outer frame that raises what a guarded body reported.

/// Declares `pg_finfo_<function>`, the version-1 info record Postgres looks up
/// beside a C function's own symbol.
macro_rules! v1_function_info {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            const V1: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use v1_function_info;

/// Declares the C function `$name` (and its info record): it runs `$guarded`, a
/// `#[pg_guard]` body returning a `raise::Outcome`, and raises the error that reports
/// from its own frame, which owns nothing that needs dropping, so that livesync's
/// own SQLSTATEs survive (pgrx cannot carry them; see `raise.rs`).
macro_rules! raising_c_function {
    ($(#[$doc:meta])* $finfo:ident, $name:ident => $guarded:path) => {
        $crate::fmgr::v1_function_info!($finfo);

        $(#[$doc])*
        ///
        /// # Safety
        /// Called by Postgres's function manager only, with a valid `fcinfo`.
        #[unsafe(no_mangle)]
        pub unsafe extern "C-unwind" fn $name(
            fcinfo: ::pgrx::pg_sys::FunctionCallInfo,
        ) -> ::pgrx::pg_sys::Datum {
            // SAFETY: `fcinfo` is the function manager's call (the caller's contract),
            // which is what the body needs; the outcome is finished in this frame,
            // which owns nothing needing a drop.
            unsafe { $guarded(fcinfo).finish() }
        }
    };
}
pub(crate) use raising_c_function;
