//! What every hand-written C-interface function declares besides its body: the
//! record telling Postgres it uses the version-1 calling convention.

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
