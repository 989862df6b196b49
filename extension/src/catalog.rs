//! Finding livesync's own tables and sequences from C-level code paths (triggers,
//! commit callbacks, the worker). Looked up by name on each use — two syscache
//! probes — so a dropped and re-created extension is always found afresh.

use pgrx::pg_sys;
use std::ffi::CStr;

/// The oid of `livesync.<name>`, if the extension is installed in this database.
pub fn livesync_relation(name: &CStr) -> Option<pg_sys::Oid> {
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"livesync".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let oid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
        (oid != pg_sys::InvalidOid).then_some(oid)
    }
}
