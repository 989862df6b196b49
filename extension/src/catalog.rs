//! Catalog lookups for C-level code paths (triggers, commit callbacks, the worker):
//! livesync's own tables and sequences, and a relation's indexes. livesync's
//! relations are looked up by name on each use (two syscache probes), so a dropped
//! and re-created extension is always found afresh.

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

/// The oids of a relation's indexes.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn index_oids(rel: pg_sys::Relation) -> Vec<pg_sys::Oid> {
    unsafe {
        let list = pg_sys::RelationGetIndexList(rel);
        if list.is_null() {
            return Vec::new();
        }
        let oids = (0..(*list).length as usize)
            .map(|i| (*(*list).elements.add(i)).oid_value)
            .collect();
        pg_sys::list_free(list);
        oids
    }
}
