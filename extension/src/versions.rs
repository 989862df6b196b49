//! Row versions: every write to a tracked row stamps a new version into its
//! `_livesync_version` column (and a delete's tombstone gets one too). Versions come
//! from the database's `livesync.version_seq` and only ever grow for a given row.
//!
//! Drawing each version with `nextval` locks, reads and dirties the sequence's page
//! for every row written. With livesync preloaded, versions are instead handed out
//! from shared memory, one block per database: the sequence's increment is the block
//! size (1000), so one `nextval` reserves a whole block, and the values in it are
//! handed out in order under a lightweight lock. Why a row's versions still grow:
//! - A row's next write waits for the previous writer to commit (its row lock), so
//!   it draws its version strictly later. The exception is an insert, stamped
//!   before it checks its key: one that waited for a delete of that key is
//!   re-stamped at the end of its statement (`restamp.rs`, using the tombstone mark
//!   kept here). Without preloading there is no mark and no re-stamping.
//! - Values of one block are handed out in increasing order, and any block drawn
//!   later starts past every value of the earlier ones (the sequence moves by a
//!   whole block per draw, and a block never outlives a newer one in its slot).
//! - Across a crash (shared memory is lost): a block's `nextval` is in the WAL before
//!   the commit of any transaction that used its values, so the sequence restarts
//!   past every version that survived.
//! - A slot remembers the sequence it drew from, so a re-created extension (a new
//!   sequence) never gets values of the old one.
//!
//! Without preloading, every version is a plain `nextval` (versions then step by the
//! block size, which nothing relies on).

use crate::catalog::{livesync_relation, nextval};
use crate::error::LivesyncError;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::sync::atomic::{AtomicBool, Ordering};

/// Databases with a block in shared memory at once; a database beyond that takes
/// over the least recently refilled slot (dropping a block only wastes its values).
const SLOTS: usize = 16;

#[derive(Copy, Clone, Default)]
struct Block {
    database: u32,
    /// The `version_seq` it was drawn from.
    sequence: u32,
    /// The next value to hand out, and one past the block's last.
    next: i64,
    end: i64,
    /// When it was drawn, in refills since start (picks the slot to take over).
    drawn: u64,
    /// The highest version given to a delete's tombstone in this database (or, after
    /// a slot was taken over, the first version of the new block: what happened
    /// before is unknown). An insert stamped below it may have waited for that
    /// delete, so capture re-stamps it (`restamp.rs`).
    tombstones: i64,
}

#[derive(Copy, Clone, Default)]
struct Blocks {
    slots: [Block; SLOTS],
    refills: u64,
}

// SAFETY: `Blocks` is plain data (integers only: no pointers, nothing that needs a
// drop), so it can live in shared memory and be copied between processes.
unsafe impl PGRXSharedMemory for Blocks {}

// SAFETY: the name is unique to this lock, which `init` registers with
// pg_shmem_init! before any process uses it.
static BLOCKS: PgLwLock<Blocks> = unsafe { PgLwLock::new(c"livesync_versions") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init`: reserves the shared blocks when livesync is preloaded.
pub fn init() {
    // SAFETY: a flag Postgres sets while it loads preloaded libraries, read here in
    // `_PG_init` by the single thread of the process.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(BLOCKS);
        PRELOADED.store(true, Ordering::Relaxed);
    }
}

/// The next version for a row of this database.
pub fn next() -> i64 {
    let Some(sequence) = livesync_relation(c"version_seq") else {
        LivesyncError::NotInstalled.raise();
    };
    if !PRELOADED.load(Ordering::Relaxed) {
        return nextval(sequence);
    }
    // SAFETY: the backend's database, set once it connected.
    let database = u32::from(unsafe { pg_sys::MyDatabaseId });
    let sequence_id = u32::from(sequence);
    {
        let mut blocks = BLOCKS.exclusive();
        if let Some(block) = blocks
            .slots
            .iter_mut()
            .find(|b| b.database == database && b.sequence == sequence_id && b.next < b.end)
        {
            block.next += 1;
            return block.next - 1;
        }
    }
    // Drawn without the lock held: nextval can wait on a lock of the sequence
    // (ALTER SEQUENCE in an open transaction), and must not stall every writer of
    // every database meanwhile.
    let first = nextval(sequence);
    let size = increment(sequence).max(1);
    let mut blocks = BLOCKS.exclusive();
    blocks.refills += 1;
    let drawn = blocks.refills;
    let mine = |b: &Block| b.database == database && b.sequence == sequence_id;
    let (index, tombstones) = match blocks.slots.iter().position(mine) {
        // Another backend drew a newer block meanwhile: keep it (values it handed
        // out may be above ours), use only our first value, itself newer than any
        // version handed out before this call began.
        Some(i) if blocks.slots[i].end > first => return first,
        Some(i) => (i, blocks.slots[i].tombstones),
        // Taking a slot over: which tombstones this database had is lost, so every
        // version before this block counts as possibly below one.
        None => (
            (0..SLOTS)
                .min_by_key(|&i| blocks.slots[i].drawn)
                .expect("there are slots"),
            first,
        ),
    };
    blocks.slots[index] = Block {
        database,
        sequence: sequence_id,
        next: first + 1,
        end: first.saturating_add(size),
        drawn,
        tombstones,
    };
    first
}

/// The next version, for a delete's tombstone: also raises the database's tombstone
/// mark (see `tombstone_mark`).
pub fn next_tombstone() -> i64 {
    let version = next();
    if PRELOADED.load(Ordering::Relaxed) {
        // SAFETY: the backend's database, set once it connected.
        let database = u32::from(unsafe { pg_sys::MyDatabaseId });
        let mut blocks = BLOCKS.exclusive();
        // No slot (taken over meanwhile): the next block's mark starts past this.
        if let Some(block) = blocks.slots.iter_mut().find(|b| b.database == database) {
            block.tombstones = block.tombstones.max(version);
        }
    }
    version
}

/// A version every tombstone handed out so far in this database is at or below,
/// or None when livesync is not preloaded (no shared memory to keep it in). An
/// insert whose version is below the mark may have been stamped before it waited
/// for a delete of its key that drew its tombstone later.
pub fn tombstone_mark() -> Option<i64> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: the backend's database, set once it connected.
    let database = u32::from(unsafe { pg_sys::MyDatabaseId });
    let blocks = BLOCKS.share();
    Some(
        blocks
            .slots
            .iter()
            .find(|b| b.database == database)
            .map_or(i64::MAX, |b| b.tombstones),
    )
}

/// `pg_sequence`'s row layout (catalog/pg_sequence.h; pgrx does not bind it).
#[repr(C)]
struct SequenceForm {
    seqrelid: pg_sys::Oid,
    seqtypid: pg_sys::Oid,
    seqstart: i64,
    seqincrement: i64,
}

/// The sequence's increment: how many values one `nextval` reserves.
fn increment(sequence: pg_sys::Oid) -> i64 {
    // SAFETY: a syscache lookup by oid; a found tuple is a pg_sequence row, whose
    // leading fields `SequenceForm` mirrors, read before the tuple is released.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::SEQRELID as i32,
            pg_sys::Datum::from(sequence),
        );
        if tuple.is_null() {
            return 1;
        }
        let form = pg_sys::heap_tuple_get_struct::<SequenceForm>(tuple);
        let increment = (*form).seqincrement;
        pg_sys::ReleaseSysCache(tuple);
        increment
    }
}
