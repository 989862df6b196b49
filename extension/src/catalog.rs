//! Catalog lookups for C-level code paths (triggers, commit callbacks, the worker):
//! livesync's own tables and sequences (and drawing from those), a relation's
//! indexes, and the lending rule of the per-backend relation caches.
//!
//! livesync's relations are looked up by name once per backend and remembered: the
//! version trigger needs the sequence for every row it stamps. A relcache
//! invalidation of a remembered relation (dropping it, or the whole extension, sends
//! one to every backend) or a full reset forgets them all, so a re-created
//! extension is found afresh.

use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;

thread_local! {
    static KNOWN: RefCell<Vec<(&'static CStr, pg_sys::Oid)>> = const { RefCell::new(Vec::new()) };
    /// Relcache invalidations this backend has processed (see `Lent`).
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    // SAFETY: `forget` is a guarded callback of the type the relcache calls, and
    // `_PG_init` registers it once per process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0usize)) };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    INVALIDATIONS.set(INVALIDATIONS.get() + 1);
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

/// A value taken out of a per-backend relation cache for one statement (a row
/// encoder, the log's layout). Invalidations can arrive while it is out (whenever a
/// lock is taken), and the cache's callback cannot drop what is not in the cache:
/// so it goes back only if no relcache invalidation arrived since it was lent.
pub struct Lent<T> {
    value: T,
    invalidations: u64,
}

impl<T> Lent<T> {
    pub fn new(value: T) -> Self {
        Lent {
            value,
            invalidations: INVALIDATIONS.get(),
        }
    }

    /// The value, for its cache to keep, unless it may be stale now.
    pub fn give_back(self) -> Option<T> {
        (INVALIDATIONS.get() == self.invalidations).then_some(self.value)
    }
}

impl<T> std::ops::Deref for Lent<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> std::ops::DerefMut for Lent<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
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
    // SAFETY: catalog lookups by NUL-terminated names, which raise no error for a
    // missing schema (missing_ok) and return InvalidOid for a missing relation.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"livesync".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let oid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
        (oid != pg_sys::InvalidOid).then_some(oid)
    }
}

unsafe extern "C-unwind" {
    /// Postgres's own nextval(), without the privilege check (declared in
    /// commands/sequence.h; pgrx does not bind it).
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// `nextval` of one of livesync's own sequences: writers need no privileges on them.
/// Called through pgrx's FFI guard, so an ERROR unwinds properly.
pub fn nextval(sequence: pg_sys::Oid) -> i64 {
    // SAFETY: the declaration above matches commands/sequence.h, and the closure
    // under the guard is the bare call, holding nothing that needs a drop.
    unsafe { pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false)) }
}

/// The oids of a relation's indexes.
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn index_oids(rel: pg_sys::Relation) -> Vec<pg_sys::Oid> {
    // SAFETY: `rel` is open (the caller's contract); RelationGetIndexList returns a
    // fresh OID list of `length` elements (or NIL), which is freed once read.
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

/// A relation's name as `regclass` prints it under the caller's search_path.
pub fn relation_display(relid: pg_sys::Oid) -> String {
    pgrx::spi::Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("relation {}", relid.to_u32()))
}
