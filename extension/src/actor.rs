//! Who a change is recorded as made by: the `livesync.actor` setting when the
//! session sets it (the bridge sets it to the user it writes for), otherwise the
//! name of the current user.
//!
//! Capture records the actor with every statement it logs, so the `text` value is
//! kept per backend and rebuilt only when the setting or the user changes (or a
//! role is renamed): reading the setting through pgrx and the user's name through
//! the syscache cost more than the rest of a single-row log row's fields together.

use crate::pg_resources::SwitchedMemoryContext;
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::CStr;

struct Cached {
    /// The setting it was built for (empty: unset, the user's name was used).
    setting: Vec<u8>,
    /// The user it was built for, when the setting was empty.
    user: pg_sys::Oid,
    /// The actor as a `text` value in `TopMemoryContext`.
    text: *mut pg_sys::varlena,
}

thread_local! {
    static CACHED: RefCell<Option<Cached>> = const { RefCell::new(None) };
}

/// Registers the role-rename callback; called once per process from `_PG_init`.
pub fn init() {
    // SAFETY: `forget` is a guarded callback of the type the syscache calls,
    // registered once per process from `_PG_init` for the roles cache.
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::AUTHOID as i32,
            Some(forget),
            pg_sys::Datum::from(0usize),
        )
    };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    CACHED.with(|cached| {
        if let Some(old) = cached.borrow_mut().take() {
            // SAFETY: the cached text was palloc'd in TopMemoryContext and is freed
            // once, as it leaves the cache.
            unsafe { pg_sys::pfree(old.text.cast()) };
        }
    });
}

/// The `livesync.actor` setting's bytes, without copying them (empty when unset).
fn setting<'a>() -> &'a [u8] {
    // SAFETY: the GUC's value is null or a NUL-terminated string owned by the GUC
    // machinery, which replaces it only when the setting changes (not while a
    // caller in this backend holds the slice).
    unsafe {
        let raw = *crate::gucs::ACTOR.as_ptr();
        if raw.is_null() {
            &[]
        } else {
            CStr::from_ptr(raw).to_bytes()
        }
    }
}

/// The actor to record for a write made now.
pub fn current() -> String {
    let setting = setting();
    if !setting.is_empty() {
        return String::from_utf8_lossy(setting).into_owned();
    }
    // SAFETY: the current user exists (noerr false raises otherwise), and its name
    // comes back as a palloc'd NUL-terminated string.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

/// The actor to record for a write made now, as a `text` value in the current
/// memory context (a copy of the backend's cached one).
pub fn current_text() -> pg_sys::Datum {
    let setting = setting();
    let user = if setting.is_empty() {
        // SAFETY: reads the backend's current user id.
        unsafe { pg_sys::GetUserId() }
    } else {
        pg_sys::InvalidOid
    };
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        let hit = cached
            .as_ref()
            .filter(|c| c.user == user && c.setting == setting)
            .map(|c| c.text);
        let text = hit.unwrap_or_else(|| {
            let actor = current();
            // SAFETY: TopMemoryContext lives as long as the backend; the pointer and
            // length describe `actor`'s bytes, which the call copies.
            let text = unsafe {
                let _in_top = SwitchedMemoryContext::to(pg_sys::TopMemoryContext);
                pg_sys::cstring_to_text_with_len(actor.as_ptr().cast(), actor.len() as i32)
            };
            let fresh = Cached {
                setting: setting.to_vec(),
                user,
                text,
            };
            if let Some(old) = cached.replace(fresh) {
                // SAFETY: as in `forget`: freed once, as it leaves the cache.
                unsafe { pg_sys::pfree(old.text.cast()) };
            }
            text
        });
        // SAFETY: `text` is the cached text value (a varlena, alive while cached);
        // the copy has room for all of its `len` bytes.
        unsafe {
            let len = pgrx::varlena::varsize_any(text);
            let copy = pg_sys::palloc(len);
            std::ptr::copy_nonoverlapping(text.cast::<u8>(), copy.cast::<u8>(), len);
            pg_sys::Datum::from(copy)
        }
    })
}
