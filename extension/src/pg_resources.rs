//! Postgres resources held by Rust values that release them when dropped, so an
//! early return or a `?` cannot leak one: an open relation (`OpenRelation`), a
//! buffer pin (`PinnedBuffer`), a registered snapshot (`RegisteredSnapshot`), a
//! memory context livesync made (`OwnedMemoryContext`) and a switch of the current
//! memory context (`SwitchedMemoryContext`).
//!
//! While a panic unwinds (pgrx turns a Postgres ERROR into one), a relation, a pin or
//! a snapshot is left as it is: the (sub)transaction abort that follows the
//! unwinding releases relcache references, locks, buffer pins and snapshots through
//! its resource owner, and a Postgres call made from a destructor mid-unwind could
//! itself raise, which would abort the process (a panic while panicking). Memory
//! contexts are the exception, see `OwnedMemoryContext`.

use pgrx::pg_sys;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A relation opened by this code, closed when dropped. The lock taken when it was
/// opened is kept until the transaction ends (as for any relation a transaction
/// read or wrote), unless `unlocking_at_close` asks for it to go with the relation.
pub struct OpenRelation {
    relation: NonNull<pg_sys::RelationData>,
    /// The lock to release at close: `NoLock` keeps it to the end of the transaction.
    unlock: pg_sys::LOCKMODE,
}

impl OpenRelation {
    /// Opens table `oid` (`table_open`: not an index), taking `lock`.
    ///
    /// # Safety
    /// Must run inside a transaction, and the value must be dropped in it.
    pub unsafe fn table(oid: pg_sys::Oid, lock: pg_sys::LOCKMODE) -> Self {
        // SAFETY: inside a transaction (the caller's contract); table_open raises an
        // ERROR rather than return null.
        Self::adopt(unsafe { pg_sys::table_open(oid, lock) })
    }

    /// Opens index `oid` (`index_open`), taking `lock`.
    ///
    /// # Safety
    /// As for `table`.
    pub unsafe fn index(oid: pg_sys::Oid, lock: pg_sys::LOCKMODE) -> Self {
        // SAFETY: inside a transaction (the caller's contract); index_open raises an
        // ERROR rather than return null.
        Self::adopt(unsafe { pg_sys::index_open(oid, lock) })
    }

    /// Opens relation `oid` of any kind (`relation_open`), taking `lock`; with
    /// `NoLock`, the caller must hold a lock on it already.
    ///
    /// # Safety
    /// As for `table`.
    pub unsafe fn relation(oid: pg_sys::Oid, lock: pg_sys::LOCKMODE) -> Self {
        // SAFETY: inside a transaction (the caller's contract); relation_open raises
        // an ERROR rather than return null.
        Self::adopt(unsafe { pg_sys::relation_open(oid, lock) })
    }

    /// The relcache entry of relation `oid`, taking no lock (`RelationIdGetRelation`),
    /// for reading what a lock held on another relation keeps stable (an index of a
    /// locked table); None if there is no such relation.
    ///
    /// # Safety
    /// As for `table`.
    pub unsafe fn unlocked(oid: pg_sys::Oid) -> Option<Self> {
        // SAFETY: inside a transaction (the caller's contract); a null result (no
        // such relation) is turned into None.
        let relation = unsafe { pg_sys::RelationIdGetRelation(oid) };
        NonNull::new(relation).map(|relation| OpenRelation {
            relation,
            unlock: pg_sys::NoLock as pg_sys::LOCKMODE,
        })
    }

    fn adopt(relation: pg_sys::Relation) -> Self {
        OpenRelation {
            relation: NonNull::new(relation).expect("relation_open returns a relation or raises"),
            unlock: pg_sys::NoLock as pg_sys::LOCKMODE,
        }
    }

    /// Releases the lock taken at open when the relation is closed, rather than at
    /// the end of the transaction: for reading a relation's description only.
    pub fn unlocking_at_close(mut self, lock: pg_sys::LOCKMODE) -> Self {
        self.unlock = lock;
        self
    }

    pub fn as_ptr(&self) -> pg_sys::Relation {
        self.relation.as_ptr()
    }

    pub fn tuple_desc(&self) -> pg_sys::TupleDesc {
        // SAFETY: an open relation's relcache entry stays valid until it is closed.
        unsafe { (*self.as_ptr()).rd_att }
    }

    /// The relation's number of columns, dropped ones included.
    pub fn natts(&self) -> usize {
        // SAFETY: an open relation's descriptor is valid while it is open.
        unsafe { (*self.tuple_desc()).natts as usize }
    }
}

impl Drop for OpenRelation {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The abort that ends this unwinding closes it (see the module comment).
            return;
        }
        // SAFETY: opened by a constructor and closed only here, inside the
        // transaction that opened it (the constructors' contract).
        unsafe { pg_sys::relation_close(self.as_ptr(), self.unlock) };
    }
}

/// A buffer pin, released when dropped.
pub struct PinnedBuffer(pg_sys::Buffer);

impl PinnedBuffer {
    /// Takes over the pin on `buffer` (`InvalidBuffer`: none, nothing to release).
    ///
    /// # Safety
    /// `buffer` must be pinned by this backend and released by nothing else.
    pub unsafe fn adopt(buffer: pg_sys::Buffer) -> Self {
        PinnedBuffer(buffer)
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.0 == pg_sys::InvalidBuffer as pg_sys::Buffer || std::thread::panicking() {
            // While unwinding: the abort's resource owner releases the pin.
            return;
        }
        // SAFETY: a pin this value owns (`adopt`'s contract), released once.
        unsafe { pg_sys::ReleaseBuffer(self.0) };
    }
}

/// A snapshot registered with the current resource owner, unregistered when dropped.
pub struct RegisteredSnapshot(NonNull<pg_sys::SnapshotData>);

impl RegisteredSnapshot {
    /// A snapshot taken now (`GetLatestSnapshot`), registered so that it stays valid
    /// while later calls take snapshots of their own.
    ///
    /// # Safety
    /// Must run inside a transaction, and the value must be dropped in it.
    pub unsafe fn latest() -> Self {
        // SAFETY: inside a transaction (the caller's contract); registering copies
        // the static snapshot GetLatestSnapshot returns.
        let snapshot = unsafe { pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot()) };
        RegisteredSnapshot(NonNull::new(snapshot).expect("a registered snapshot"))
    }

    pub fn as_ptr(&self) -> pg_sys::Snapshot {
        self.0.as_ptr()
    }
}

impl Drop for RegisteredSnapshot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The abort's resource owner unregisters it (see the module comment).
            return;
        }
        // SAFETY: registered by `latest` in this transaction and unregistered once.
        unsafe { pg_sys::UnregisterSnapshot(self.as_ptr()) };
    }
}

/// How much memory a new context sets aside (Postgres's `ALLOCSET_*_SIZES`).
#[derive(Clone, Copy)]
pub enum ContextSize {
    /// For a few small, long-lived allocations (descriptions, caches).
    Small,
    /// For working memory that grows and is reset.
    Default,
}

/// A memory context livesync created, deleted (with everything allocated in it)
/// when dropped.
///
/// Deleting is the one Postgres call these wrappers make even while a panic unwinds,
/// as pgrx's own owned contexts do: a context under `CacheMemoryContext` (a row
/// encoder's, the log layout's) is freed by nothing else, since an abort resets
/// transaction memory only, and `MemoryContextDelete` raises no error (it runs the
/// context's reset callbacks and frees its blocks).
pub struct OwnedMemoryContext {
    context: NonNull<pg_sys::MemoryContextData>,
}

impl OwnedMemoryContext {
    /// A new context named `name` under `parent`.
    ///
    /// # Safety
    /// `parent` must be a valid context that outlives the new one (or deletes it
    /// with itself, in which case this value must not be dropped after that).
    pub unsafe fn new(
        parent: pg_sys::MemoryContext,
        name: &'static CStr,
        size: ContextSize,
    ) -> Self {
        let (min, init, max) = match size {
            ContextSize::Small => (
                pg_sys::ALLOCSET_SMALL_MINSIZE,
                pg_sys::ALLOCSET_SMALL_INITSIZE,
                pg_sys::ALLOCSET_SMALL_MAXSIZE,
            ),
            ContextSize::Default => (
                pg_sys::ALLOCSET_DEFAULT_MINSIZE,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE,
            ),
        };
        // SAFETY: `parent` is valid (the caller's contract) and `name` is static, as
        // Postgres keeps the pointer; creation raises an ERROR rather than return null.
        let context = unsafe {
            pg_sys::AllocSetContextCreateInternal(
                parent,
                name.as_ptr(),
                min as usize,
                init as usize,
                max as usize,
            )
        };
        OwnedMemoryContext {
            context: NonNull::new(context).expect("a new memory context"),
        }
    }

    pub fn as_ptr(&self) -> pg_sys::MemoryContext {
        self.context.as_ptr()
    }

    /// Frees everything allocated in the context, keeping the context.
    pub fn reset(&mut self) {
        // SAFETY: the context is alive while this value is; `&mut self` means no
        // switch into it (which borrows it) is in force.
        unsafe { pg_sys::MemoryContextReset(self.as_ptr()) };
    }

    /// Makes this context current until the returned guard is dropped.
    pub fn switch_to(&self) -> SwitchedMemoryContext<'_> {
        // SAFETY: the guard borrows `self`, so the context outlives the switch.
        unsafe { SwitchedMemoryContext::to(self.as_ptr()) }
    }
}

impl Drop for OwnedMemoryContext {
    fn drop(&mut self) {
        // SAFETY: the context is this value's alone (`new`'s contract) and is deleted
        // once. A switch made through `switch_to` has ended (its guard borrowed this
        // value); one made another way and left in force would make
        // CurrentMemoryContext dangle, so that is undone first.
        unsafe {
            if std::ptr::eq(pg_sys::CurrentMemoryContext, self.as_ptr()) {
                pg_sys::CurrentMemoryContext = (*self.as_ptr()).parent;
            }
            pg_sys::MemoryContextDelete(self.as_ptr());
        }
    }
}

/// A memory context made current, until dropped: then the one current before is
/// again. Restored while a panic unwinds too, which is no Postgres call: the context
/// switched to may be deleted by that same unwinding (an `OwnedMemoryContext`
/// dropped after the guard), and must not stay current.
pub struct SwitchedMemoryContext<'a> {
    previous: pg_sys::MemoryContext,
    /// Borrows the context switched to, when it is an `OwnedMemoryContext`.
    _context: PhantomData<&'a OwnedMemoryContext>,
}

impl SwitchedMemoryContext<'_> {
    /// Makes `context` current.
    ///
    /// # Safety
    /// `context` must stay valid until the guard is dropped.
    pub unsafe fn to(context: pg_sys::MemoryContext) -> Self {
        // SAFETY: `context` is valid for the guard's life (the caller's contract);
        // switching is a store to the global, as MemoryContextSwitchTo does.
        let previous = unsafe {
            let previous = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = context;
            previous
        };
        SwitchedMemoryContext {
            previous,
            _context: PhantomData,
        }
    }
}

impl Drop for SwitchedMemoryContext<'_> {
    fn drop(&mut self) {
        // SAFETY: `previous` was current when the guard was made, in an outer scope
        // whose contexts outlive this one.
        unsafe { pg_sys::CurrentMemoryContext = self.previous };
    }
}
