//! Commit sequencing: how captured changes get commit-ordered positions, and the
//! `livesync` doorbell.
//!
//! While a transaction runs, capture numbers its changes 1, 2, 3, ... (the
//! *ordinal*). In the PRE_COMMIT callback the transaction takes the sequencer lock
//! (an ExclusiveLock on `livesync.commits`), draws one contiguous block of positions
//! from `livesync.position_seq`, records it as one `livesync.commits` row, and queues
//! one NOTIFY carrying its last position. The lock is held until the transaction has
//! fully committed — Postgres releases locks only after the commit is visible — so
//! blocks become visible in position order: a reader that has seen position P and
//! reads again never finds a new commit below P, and a transaction that is merely
//! open (idle in transaction, or still writing) holds nothing and stalls no one.
//!
//! Why this technique (see docs/architecture.md): it is exact, needs no
//! `shared_preload_libraries`, and costs one row per transaction rather than per
//! change. Its price is that tracked commits queue on one lock from pre-commit to
//! end of commit (as every NOTIFY in Postgres already does).

use crate::error::LivesyncError;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::cell::Cell;
use std::ffi::CStr;

/// The transaction whose changes are waiting for a position block.
#[derive(Clone, Copy)]
struct Pending {
    /// Top-level FullTransactionId.
    fxid: u64,
    /// The next ordinal to hand out; the transaction needs `next - 1` positions.
    next_ordinal: i32,
}

thread_local! {
    static PENDING: Cell<Option<Pending>> = const { Cell::new(None) };
}

/// Registers the transaction callback; called once from `_PG_init`.
pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

/// Reserves `count` consecutive ordinals in the current top-level transaction and
/// returns the first. Also arranges for the transaction to be sequenced at commit.
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
        XACT_EVENT_PRE_COMMIT => {
            if let Some(pending) = PENDING.take() {
                unsafe { assign_positions(pending) };
            }
        }
        XACT_EVENT_PRE_PREPARE if PENDING.with(|p| p.get()).is_some() => {
            LivesyncError::PrepareNotSupported.raise();
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => PENDING.set(None),
        _ => {}
    }
}

const RECORD_COMMIT: &CStr = c"
    INSERT INTO livesync.commits (first_position, last_position, tx, committed_at)
    SELECT p.first,
           pg_catalog.setval('livesync.position_seq'::pg_catalog.regclass,
                             p.first OPERATOR(pg_catalog.+) $2 OPERATOR(pg_catalog.-) 1),
           $1,
           pg_catalog.clock_timestamp()
    FROM (SELECT pg_catalog.nextval('livesync.position_seq'::pg_catalog.regclass) AS first) AS p
    RETURNING last_position";

unsafe fn assign_positions(pending: Pending) {
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"livesync".as_ptr(), true);
        let commits = pg_sys::get_relname_relid(c"commits".as_ptr(), namespace);
        if commits == pg_sys::InvalidOid {
            // The extension was dropped in this very transaction: nothing to record.
            return;
        }
        pg_sys::LockRelationOid(commits, pg_sys::ExclusiveLock as pg_sys::LOCKMODE);

        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let last_position = crate::internal_spi::as_extension_owner(|| {
            let count = (pending.next_ordinal - 1) as i64;
            let mut args = [
                pg_sys::Datum::from(pending.fxid),
                pg_sys::Datum::from(count),
            ];
            let types = [pg_sys::XID8OID, pg_sys::INT8OID];
            crate::internal_spi::execute_cached(
                &COMMIT_PLAN,
                RECORD_COMMIT,
                &types,
                &mut args,
                None,
            )
        })
        .expect("INSERT ... RETURNING returns the row it inserted");
        pg_sys::PopActiveSnapshot();

        // One ring per transaction, delivered by Postgres only if the commit succeeds.
        let payload = last_position.to_string();
        let channel = "livesync";
        pgrx::direct_function_call_as_datum(
            pg_sys::pg_notify,
            &[channel.into_datum(), payload.as_str().into_datum()],
        );
    }
}

thread_local! {
    static COMMIT_PLAN: crate::internal_spi::CachedPlan = const { crate::internal_spi::CachedPlan::new() };
}
