//! Catalog lookups for C-level code paths (triggers, commit callbacks, the worker):
//! livesync's own tables and sequences, and a relation's indexes.
//!
//! livesync's relations are looked up by name once per backend and remembered: the
//! version trigger needs the sequence for every row it stamps. A relcache
//! invalidation of a remembered relation (dropping it, or the whole extension, sends
//! one to every backend) or a full reset forgets them all, so a re-created
//! extension is found afresh.

use pgrx::pg_sys;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

thread_local! {
    static KNOWN: RefCell<Vec<(&'static CStr, pg_sys::Oid)>> = const { RefCell::new(Vec::new()) };
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0usize)) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    KNOWN.with(|known| {
        let mut known = known.borrow_mut();
        if relid == pg_sys::InvalidOid || known.iter().any(|&(_, oid)| oid == relid) {
            known.clear();
        }
    });
}

/// What a relcache invalidation means for a per-relation cache: drop the entry of
/// `relid`, or everything when Postgres resets all caches (`relid` is invalid).
pub fn forget_relation<V>(cache: &RefCell<HashMap<pg_sys::Oid, V>>, relid: pg_sys::Oid) {
    let mut cache = cache.borrow_mut();
    if relid == pg_sys::InvalidOid {
        cache.clear();
    } else {
        cache.remove(&relid);
    }
}

/// The oid of `livesync.<name>`, if the extension is installed in this database.
pub fn livesync_relation(name: &'static CStr) -> Option<pg_sys::Oid> {
    if let Some(oid) = KNOWN.with(|known| {
        known
            .borrow()
            .iter()
            .find(|&&(known_name, _)| known_name == name)
            .map(|&(_, oid)| oid)
    }) {
        return Some(oid);
    }
    let oid = look_up(name)?;
    KNOWN.with(|known| known.borrow_mut().push((name, oid)));
    Some(oid)
}

fn look_up(name: &CStr) -> Option<pg_sys::Oid> {
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
