//! Sequencing: how captured changes get commit-ordered positions, and the
//! `livesync` doorbell.
//!
//! While a transaction runs, capture numbers its changes 1, 2, 3, ... (the
//! *ordinal*) and files them under the transaction's `xid8`. Positions are handed out
//! later by a *tick*, in the manner of PgQ's ticks: under the sequencer lock
//! (ExclusiveLock on `livesync.batches`) a tick takes a fresh snapshot S and finds the
//! transactions whose changes are visible in S but were not visible in the previous
//! tick's snapshot P (those in P's xip list or at/after P's xmax). It gives each of
//! them a contiguous block of positions (in xid order), records them all in one
//! `livesync.batches` row, stores S as the new P, and queues one NOTIFY carrying the
//! last position — all in one transaction. Because ticks are serialised by the lock and each
//! one only adds transactions that became visible since the last, readers always see
//! a prefix of positions, and an open transaction (idle or still writing) holds
//! nothing back: it is simply not in any batch until it commits.
//!
//! Who ticks:
//! - with `shared_preload_libraries = 'livesync'`, a background worker per database
//!   (`worker.rs`); a committing transaction only sets the worker's latch after its
//!   commit, so nothing is added to the commit path and rings are coalesced per batch;
//! - otherwise, or when `livesync.sequencer = commit`, or while no worker runs, the
//!   committing transaction ticks itself at PRE_COMMIT. Its own changes are visible to
//!   its own snapshot, so its tick includes it, and it holds the lock through commit,
//!   so its block becomes visible before any later block.
//!
//! Both kinds of tick run the same statement and can interleave freely. The one
//! transaction a tick can see without its being committed in the tick's snapshot is
//! the ticking transaction itself; the next tick would find it again in the stored
//! snapshot, so `_sequencer.sequenced` remembers what the last tick sequenced and it is
//! left out. (Any other transaction a tick sequences is committed, hence visible in the
//! stored snapshot and never a candidate again.)

use crate::catalog::livesync_relation;
use crate::error::LivesyncError;
use crate::gucs::{self, SequencerMode};
use crate::internal_spi::{self, CachedPlan};
use crate::worker;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::cell::Cell;
use std::ffi::CStr;

/// The transaction whose changes are waiting for sequencing.
#[derive(Clone, Copy)]
struct Pending {
    /// Top-level FullTransactionId.
    fxid: u64,
    /// The next ordinal to hand out.
    next_ordinal: i32,
}

thread_local! {
    static PENDING: Cell<Option<Pending>> = const { Cell::new(None) };
    /// The worker to wake once this transaction has committed.
    static WAKE_AFTER_COMMIT: Cell<Option<worker::Waker>> = const { Cell::new(None) };
    static TICK_PLAN: CachedPlan = const { CachedPlan::new() };
}

/// Registers the transaction callback; called once from `_PG_init`.
pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

/// Reserves `count` consecutive ordinals in the current top-level transaction and
/// returns the first. Also arranges for the transaction to be sequenced.
pub fn reserve_ordinals(count: i32) -> i32 {
    let fxid = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    PENDING.with(|pending| {
        let first = match pending.get() {
            Some(p) if p.fxid == fxid => p.next_ordinal,
            _ => 1,
        };
        pending.set(Some(Pending {
            fxid,
            next_ordinal: first + count,
        }));
        first
    })
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT => unsafe { before_commit() },
        XACT_EVENT_PRE_PREPARE if PENDING.with(|p| p.get()).is_some() => {
            LivesyncError::PrepareNotSupported.raise();
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            PENDING.set(None);
            if let Some(waker) = WAKE_AFTER_COMMIT.take() {
                waker.wake();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            PENDING.set(None);
            WAKE_AFTER_COMMIT.set(None);
        }
        _ => {}
    }
}

/// At PRE_COMMIT of a transaction that captured changes: hand it to the worker
/// (woken once the commit is visible) or sequence it right here.
unsafe fn before_commit() {
    if PENDING.take().is_none() {
        return;
    }
    let waker = match gucs::sequencer_mode() {
        SequencerMode::Auto => worker::running_for_this_database(),
        SequencerMode::Commit => None,
    };
    match waker {
        Some(waker) => WAKE_AFTER_COMMIT.set(Some(waker)),
        None => unsafe {
            tick();
        },
    }
}

/// One tick, as a single statement so that `pg_current_snapshot()` is the very
/// snapshot the change rows are read with. Returns the new last position, or NULL
/// when no transaction became visible since the last tick.
const TICK: &CStr = c"
    WITH prev AS MATERIALIZED (
        SELECT snapshot, sequenced FROM livesync._sequencer
    ), fresh AS MATERIALIZED (
        -- Transactions not visible to the previous tick: those at or past its xmax
        -- (bounded by this snapshot's xmax, or past the ticking transaction's own
        -- xid, $1, which its own snapshot leaves out; a two-sided range also keeps the
        -- generic plan on the index), and those in its xip list (all below its xmax,
        -- so the two sets are disjoint) -- less the ones the previous tick sequenced:
        -- when a committing transaction ticked, its snapshot still shows it running.
        SELECT u.tx, pg_catalog.max(u.last)::int8 AS n
        FROM (
            SELECT c.tx, c.ordinal OPERATOR(pg_catalog.+) c.count OPERATOR(pg_catalog.-) 1 AS last
            FROM livesync.changes c
            WHERE c.tx OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax((SELECT snapshot FROM prev))
              AND c.tx OPERATOR(pg_catalog.<) GREATEST(pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()), $1)
            UNION ALL
            SELECT c.tx, c.ordinal OPERATOR(pg_catalog.+) c.count OPERATOR(pg_catalog.-) 1
            FROM livesync.changes c
            WHERE c.tx OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip((SELECT snapshot FROM prev))))
        ) AS u
        WHERE u.tx OPERATOR(pg_catalog.<>) ALL ((SELECT sequenced FROM prev)::pg_catalog.xid8[])
        GROUP BY u.tx
    ), numbered AS MATERIALIZED (
        SELECT f.tx, f.n, pg_catalog.sum(f.n) OVER (ORDER BY f.tx)::int8 AS upto FROM fresh f
    ), drawn AS MATERIALIZED (
        SELECT pg_catalog.nextval('livesync.position_seq'::pg_catalog.regclass) AS first, t.total
        FROM (SELECT pg_catalog.sum(n)::int8 AS total FROM fresh) AS t
        WHERE t.total OPERATOR(pg_catalog.>) 0
    ), block AS MATERIALIZED (
        SELECT d.first,
               pg_catalog.setval('livesync.position_seq'::pg_catalog.regclass,
                                 d.first OPERATOR(pg_catalog.+) d.total OPERATOR(pg_catalog.-) 1) AS last
        FROM drawn d
    ), recorded AS (
        -- One row for the whole batch, however many transactions it holds.
        INSERT INTO livesync.batches (first_position, last_position, txs, firsts, committed_at)
        SELECT b.first, b.last,
               ARRAY(SELECT nb.tx FROM numbered nb ORDER BY nb.tx),
               ARRAY(SELECT b.first OPERATOR(pg_catalog.+) nb.upto OPERATOR(pg_catalog.-) nb.n
                     FROM numbered nb ORDER BY nb.tx),
               pg_catalog.clock_timestamp()
        FROM block b
        RETURNING last_position
    ), advanced AS (
        UPDATE livesync._sequencer
        SET snapshot = pg_catalog.pg_current_snapshot(),
            -- Only a transaction at or past the stored xmax would be found again: the
            -- ticking transaction's own (every other one sequenced is committed).
            sequenced = ARRAY(SELECT f.tx FROM fresh f
                              WHERE f.tx OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()))
        WHERE EXISTS (SELECT FROM fresh)
    )
    SELECT pg_catalog.max(last_position) FROM recorded";

/// Runs one tick in the current transaction and queues the doorbell if it gave out
/// positions. Returns the new last position, if any.
///
/// # Safety
/// Must run inside a transaction, in a database where livesync is installed.
pub unsafe fn tick() -> Option<i64> {
    unsafe {
        let Some(batches) = livesync_relation(c"batches") else {
            // The extension was dropped in this very transaction: nothing to sequence.
            return None;
        };
        pg_sys::LockRelationOid(batches, pg_sys::ExclusiveLock as pg_sys::LOCKMODE);
        // Our own changes must be visible to the tick's snapshot, and the snapshot must
        // be newer than the previous tick's whatever this transaction's isolation level.
        pg_sys::CommandCounterIncrement();
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        // One past our own xid when we have one (the commit-time tick includes its own
        // transaction), else 0.
        let own = pg_sys::GetTopFullTransactionIdIfAny().value;
        let mut bound = [pg_sys::Datum::from(if own == 0 { 0 } else { own + 1 })];
        let last = internal_spi::as_extension_owner(|| {
            internal_spi::execute_cached_with_snapshot(&TICK_PLAN, TICK, &mut bound, snapshot)
        });
        pg_sys::UnregisterSnapshot(snapshot);
        if let Some(position) = last {
            // Delivered by Postgres only if this transaction commits, in commit order.
            let payload = position.to_string();
            pgrx::direct_function_call_as_datum(
                pg_sys::pg_notify,
                &["livesync".into_datum(), payload.as_str().into_datum()],
            );
        }
        last
    }
}
