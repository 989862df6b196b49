//! Sequencing: how captured changes get commit-ordered positions, and the
//! `livesync` doorbell.
//!
//! While a transaction runs, capture numbers its changes 1, 2, 3, ... (the
//! *ordinal*) and files them under the transaction's `xid8`. Positions are handed out
//! later by a *tick*, in the manner of PgQ's ticks: under the sequencer lock
//! (ExclusiveLock on `livesync.batches`) a tick takes a fresh snapshot S and finds the
//! transactions whose changes are visible in S but were not visible in the previous
//! tick's snapshot P (those in P's xip list or at/after P's xmax). It gives each of
//! them a contiguous block of positions, records them all in one `livesync.batches`
//! row, stores S as the new P, and queues one NOTIFY carrying the last position — all
//! in one transaction (the tick itself is `tick::run`). Because
//! ticks are serialised by the lock and each one only adds transactions that became
//! visible since the last, readers always see a prefix of positions, and an open
//! transaction (idle or still writing) holds nothing back: it is simply not in any
//! batch until it commits.
//!
//! Commit order inside a tick: just before it commits (PRE_COMMIT, while it still
//! holds its locks) a transaction writes its *commit sequence*, the WAL insert
//! position then, into its last log row (`log_writer::seal`). A transaction that
//! waited for another's row lock, or began after another committed, takes its
//! sequence after the other's commit record was inserted, so a larger one; a tick
//! orders its transactions by it (xid only breaks ties, which only unrelated
//! transactions can have). It is in the WAL with the row, so a crash between commit
//! and tick changes nothing. Across ticks the order holds by visibility: a
//! transaction depending on another became visible after it.

//! Who ticks:
//! - with `shared_preload_libraries = 'livesync'`, a background worker per database
//!   (`worker.rs`); a committing transaction only sets the worker's latch after its
//!   commit, so nothing is added to the commit path and rings are coalesced per batch;
//! - otherwise, or when `livesync.sequencer = commit`, or while no worker runs, the
//!   committing transaction ticks itself at PRE_COMMIT. Its own changes are visible to
//!   its own snapshot, so its tick includes it, and it holds the lock through commit,
//!   so its block becomes visible before any later block.
//!
//! Both kinds of tick run the same code and can interleave freely. The one
//! transaction a tick can see without its being committed in the tick's snapshot is
//! the ticking transaction itself; the next tick would find it again in the stored
//! snapshot, so `_sequencer.sequenced` remembers what the last tick sequenced and it is
//! left out. (Any other transaction a tick sequences is committed, hence visible in the
//! stored snapshot and never a candidate again.)

use crate::error::LivesyncError;
use crate::gucs::{self, SequencerMode};
use crate::worker;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};

/// The transaction whose changes are waiting for sequencing.
#[derive(Clone, Copy)]
struct Pending {
    /// Top-level FullTransactionId.
    fxid: u64,
    /// The next ordinal to hand out.
    next_ordinal: i32,
    /// The transaction's last log row and the subtransaction that wrote it; None
    /// once a rollback to a savepoint took it away.
    tail: Option<(pg_sys::ItemPointerData, pg_sys::SubTransactionId)>,
}

thread_local! {
    static PENDING: Cell<Option<Pending>> = const { Cell::new(None) };
    /// The (sub)transactions, in order, that wrote log rows still standing: a
    /// rollback to a savepoint removes its own and its children's. Empty at commit
    /// means every change was rolled back, and there is nothing to seal.
    static SURVIVING: RefCell<Vec<pg_sys::SubTransactionId>> = const { RefCell::new(Vec::new()) };
    /// The worker to wake once this transaction has committed.
    static WAKE_AFTER_COMMIT: Cell<Option<worker::Waker>> = const { Cell::new(None) };
}

/// Registers the transaction callback; called once from `_PG_init`.
pub fn init() {
    // SAFETY: both are guarded callbacks of the types Postgres calls, registered
    // once per process from `_PG_init`, with no argument to keep alive.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

/// Reserves `count` consecutive ordinals in the current top-level transaction and
/// returns the first. Also arranges for the transaction to be sequenced.
pub fn reserve_ordinals(count: i32) -> i32 {
    // SAFETY: capture calls this inside a transaction, which this assigns an xid if
    // it has none (a write needs one anyway).
    let fxid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    PENDING.with(|pending| {
        let first = match pending.get() {
            Some(p) if p.fxid == fxid => p.next_ordinal,
            _ => 1,
        };
        let tail = pending
            .get()
            .filter(|p| p.fxid == fxid)
            .and_then(|p| p.tail);
        pending.set(Some(Pending {
            fxid,
            next_ordinal: first + count,
            tail,
        }));
        first
    })
}

/// Records the log row just appended (after `reserve_ordinals`) as the
/// transaction's tail: its commit sequence goes there.
pub fn note_tail(tid: pg_sys::ItemPointerData) {
    // SAFETY: reads the current transaction state's id; capture runs in a transaction.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    SURVIVING.with(|surviving| {
        let mut surviving = surviving.borrow_mut();
        if surviving.last() != Some(&subxact) {
            surviving.push(subxact);
        }
    });
    PENDING.with(|pending| {
        if let Some(mut p) = pending.get() {
            p.tail = Some((tid, subxact));
            pending.set(Some(p));
        }
    });
}

/// A rollback to a savepoint removes the rows its subtransactions wrote: if the
/// tail is among them, the commit sequence needs a row of its own (a marker).
/// Subtransactions still open when one aborts were all started inside it, so they
/// are the ones with a larger or equal id.
///
/// # Safety
/// Called by Postgres's transaction machinery only (registered in `init`).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    subxact: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event != pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        return;
    }
    SURVIVING.with(|surviving| surviving.borrow_mut().retain(|&id| id < subxact));
    PENDING.with(|pending| {
        if let Some(mut p) = pending.get() {
            if p.tail.is_some_and(|(_, written_in)| written_in >= subxact) {
                p.tail = None;
                pending.set(Some(p));
            }
        }
    });
}

/// # Safety
/// Called by Postgres's transaction machinery only (registered in `init`).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        // SAFETY: this is PRE_COMMIT, still inside the committing transaction.
        XACT_EVENT_PRE_COMMIT => unsafe { before_commit() },
        XACT_EVENT_PRE_PREPARE if PENDING.with(|p| p.get()).is_some() => {
            LivesyncError::PrepareNotSupported.raise();
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            PENDING.set(None);
            SURVIVING.with(|surviving| surviving.borrow_mut().clear());
            if let Some(waker) = WAKE_AFTER_COMMIT.take() {
                waker.wake();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            PENDING.set(None);
            SURVIVING.with(|surviving| surviving.borrow_mut().clear());
            WAKE_AFTER_COMMIT.set(None);
        }
        _ => {}
    }
}

/// At PRE_COMMIT of a transaction that captured changes: hand it to the worker
/// (woken once the commit is visible) or sequence it right here.
///
/// # Safety
/// Must run at PRE_COMMIT.
unsafe fn before_commit() {
    let Some(pending) = PENDING.take() else {
        return;
    };
    // Every change rolled back with its savepoint: nothing to seal or sequence (a
    // marker for it would never be sequenced, nor compacted away).
    let nothing_left =
        SURVIVING.with(|surviving| std::mem::take(&mut *surviving.borrow_mut()).is_empty());
    if nothing_left {
        return;
    }
    if crate::catalog::livesync_relation(c"changes").is_none() {
        return; // the extension was dropped in this transaction
    }
    // SAFETY: at PRE_COMMIT of a transaction that appended log rows (it has a
    // pending entry and surviving rows), as seal requires.
    unsafe {
        crate::owner::as_bootstrap_superuser(|| crate::log_writer::seal(pending.tail.map(|t| t.0)))
    };
    let waker = match gucs::sequencer_mode() {
        SequencerMode::Auto => worker::running_for_this_database(),
        SequencerMode::Commit => None,
    };
    match waker {
        Some(waker) => WAKE_AFTER_COMMIT.set(Some(waker)),
        // SAFETY: still inside the committing transaction, and livesync is installed
        // (its log table was found above).
        None => unsafe {
            crate::tick::run();
        },
    }
}
