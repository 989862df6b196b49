//! The sequencer worker: one background worker per database that uses livesync,
//! running the sequencer's ticks so that committing transactions do not.
//!
//! Needs `shared_preload_libraries = 'livesync'` (for the shared registry below).
//! Workers are started on demand: by the first commit that finds none running for
//! its database (that commit sequences itself meanwhile), and by
//! `livesync.changes_since()`, so a reader after a server restart also gets one.
//! A worker ticks at start-up, whenever a commit sets its latch, and on a safety
//! poll; it exits cleanly when the extension is dropped from its database, and is
//! restarted by the postmaster within a second if it fails or is terminated.
//! It waits with WaitLatch, and SIGTERM (a shutdown, `pg_terminate_backend`,
//! `DROP DATABASE ... WITH (FORCE)`) has Postgres's own handler, so the worker ends
//! at once wherever the signal finds it: waiting, ticking, or waiting for a lock in
//! a tick (within 10 ms during a pacing pause).

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How many databases can have a sequencer worker at once.
const MAX_DATABASES: usize = 16;
/// The safety poll: a tick at least this often even if no latch is set.
const POLL: Duration = Duration::from_secs(1);
/// A worker that was asked for but has not registered itself is asked for again
/// after this long.
const START_RETRY_MS: u64 = 5_000;
/// Starts that never connect before the worker gives up and unregisters itself.
const MAX_FAILED_STARTS: i32 = 3;

enum Tick {
    Sequenced(usize),
    Idle,
    Uninstalled,
}

/// Decides when the worker ticks, batching as group commit does: at low load it
/// ticks as soon as a commit wakes it (a ring within about a millisecond of the
/// commit); once commits arrive faster than one tick per commit can keep up with
/// cheaply, it waits `livesync.tick_interval` after each productive tick so the
/// commits arriving meanwhile share one tick and one ring.
///
/// Measured on 2 cores: ticking on every wake-up under saturation cost a quarter of
/// the single-row UPDATE throughput (each tick is a transaction of its own, competing
/// with the writers for the CPU and the WAL flush), while pacing at 10 ms kept it
/// within a few points of untracked. The load is judged over windows of
/// `WINDOW`, with hysteresis so a rate near the threshold does not flap.
struct Pacer {
    paced: bool,
    window_start: std::time::Instant,
    in_window: usize,
}

/// The window over which the commit rate is measured.
const WINDOW: Duration = Duration::from_millis(100);
/// Start pacing at this many commits per tick interval (1,500/s at 10 ms) ...
const PACED_BATCH: usize = 15;
/// ... and stop below this many (800/s at 10 ms).
const UNPACED_BATCH: usize = 8;

impl Pacer {
    fn new() -> Self {
        Pacer {
            paced: false,
            window_start: std::time::Instant::now(),
            in_window: 0,
        }
    }

    /// Records a tick's transactions; returns how long to wait before the next tick.
    fn after_tick(&mut self, transactions: usize, interval_ms: i32) -> Duration {
        self.in_window += transactions;
        let elapsed = self.window_start.elapsed();
        if elapsed >= WINDOW {
            let interval = Duration::from_millis(interval_ms.max(1) as u64);
            // Commits per tick interval over the window just ended.
            let per_interval =
                self.in_window as f64 * interval.as_secs_f64() / elapsed.as_secs_f64();
            if !self.paced && per_interval >= PACED_BATCH as f64 {
                self.paced = true;
            } else if self.paced && per_interval < UNPACED_BATCH as f64 {
                self.paced = false;
            }
            self.window_start = std::time::Instant::now();
            self.in_window = 0;
        }
        if self.paced && transactions > 0 && interval_ms > 0 {
            Duration::from_millis(interval_ms as u64)
        } else {
            Duration::ZERO
        }
    }
}

#[derive(Copy, Clone, Default)]
struct Slot {
    /// The database this slot belongs to; 0 when free.
    database: u32,
    /// The worker's pid, 0 while none runs.
    pid: i32,
    /// The worker's PGPROC number, to reach its latch.
    procno: i32,
    /// When a worker was last requested (ms since the Unix epoch).
    requested_at_ms: u64,
    /// Starts since the last successful connection: a worker whose database was
    /// dropped fails to connect (FATAL, exit 1) and would be restarted forever.
    failed_starts: i32,
}

#[derive(Copy, Clone, Default)]
struct Registry {
    slots: [Slot; MAX_DATABASES],
}

// SAFETY: `Registry` is plain data (integers only: no pointers, nothing that needs
// a drop), so it can live in shared memory and be copied between processes.
unsafe impl PGRXSharedMemory for Registry {}

impl Registry {
    /// The index of this database's slot, else of a free one.
    fn slot_index(&self, database: u32) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.database == database)
            .or_else(|| self.slots.iter().position(|s| s.database == 0))
    }
}

// SAFETY: the name is unique to this lock, which `init` registers with
// pg_shmem_init! before any process uses it.
static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"livesync_sequencers") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init`: reserves the shared registry when livesync is preloaded.
pub fn init() {
    // SAFETY: a flag Postgres sets while it loads preloaded libraries, read here in
    // `_PG_init` by the single thread of the process.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(REGISTRY);
        PRELOADED.store(true, Ordering::Relaxed);
    }
}

/// A handle to wake a running worker.
#[derive(Clone, Copy)]
pub struct Waker {
    procno: i32,
}

impl Waker {
    pub fn wake(self) {
        // If the worker exited since, this PGPROC's latch belongs to another process
        // or none: a spurious wake-up is harmless to any latch user.
        // SAFETY: `procno` was a worker's PGPROC number, below the number of
        // PGPROCs, whose array (and latches) live in shared memory for the server's
        // life; SetLatch may be called on any process's latch.
        unsafe {
            let proc_ = (*pg_sys::ProcGlobal).allProcs.add(self.procno as usize);
            pg_sys::SetLatch(&mut (*proc_).procLatch);
        }
    }
}

/// The running worker for the current database, if any. When none runs (and livesync
/// is preloaded), asks the postmaster to start one.
pub fn running_for_this_database() -> Option<Waker> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: the backend's database, set once it connected.
    let database = u32::from(unsafe { pg_sys::MyDatabaseId });
    {
        let registry = REGISTRY.share();
        if let Some(slot) = registry
            .slots
            .iter()
            .find(|s| s.database == database && s.pid != 0)
        {
            return Some(Waker {
                procno: slot.procno,
            });
        }
    }
    request_start(database);
    None
}

#[pg_extern(volatile, parallel_unsafe)]
/// Starts the current database's sequencer worker if livesync is preloaded and none
/// runs. Returns whether a worker is running now (false while one is starting).
fn _ensure_sequencer() -> bool {
    running_for_this_database().is_some()
}

fn request_start(database: u32) {
    let now = crate::now_ms();
    {
        let mut registry = REGISTRY.exclusive();
        // This database's slot, else a free one, else one whose worker was asked for
        // long ago and never came (its database may be gone).
        let stale =
            |s: &Slot| s.pid == 0 && now.saturating_sub(s.requested_at_ms) >= START_RETRY_MS;
        let index = registry
            .slot_index(database)
            .or_else(|| registry.slots.iter().position(stale));
        let Some(index) = index else {
            return; // every slot in use: this database sequences at commit
        };
        let slot = &mut registry.slots[index];
        if slot.pid != 0 || now.saturating_sub(slot.requested_at_ms) < START_RETRY_MS {
            return;
        }
        // A request comes from a session connected to the database: it exists.
        *slot = Slot {
            database,
            requested_at_ms: now,
            ..Slot::default()
        };
    }
    let started = BackgroundWorkerBuilder::new("livesync sequencer")
        .set_type("livesync sequencer")
        .set_library("livesync")
        .set_function("livesync_sequencer_main")
        .set_argument(Some(pg_sys::Datum::from(database)))
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(1)))
        .load_dynamic();
    if started.is_err() {
        warning!("livesync: could not start a sequencer worker (max_worker_processes reached?); commits sequence themselves");
    }
}

/// Counts a start for this database before connecting to it; false when the last
/// starts never got connected (the database is gone), so this one should give up.
fn note_start(database: u32) -> bool {
    let mut registry = REGISTRY.exclusive();
    let Some(index) = registry.slot_index(database) else {
        return true;
    };
    let slot = &mut registry.slots[index];
    slot.database = database;
    // A restart after the worker was terminated (DROP DATABASE terminates it) finds
    // its slot freed and claims one: stamp it so request_start() does not take it as
    // stale and reset the count, or a dropped database's worker restarts forever.
    slot.requested_at_ms = crate::now_ms();
    slot.failed_starts += 1;
    if slot.failed_starts > MAX_FAILED_STARTS {
        *slot = Slot::default();
        return false;
    }
    true
}

/// Registers this process as the database's worker; false if another one already is.
fn publish(database: u32) -> bool {
    let mut registry = REGISTRY.exclusive();
    let Some(index) = registry.slot_index(database) else {
        return false;
    };
    let slot = &mut registry.slots[index];
    // SAFETY: this process's pid and PGPROC, set before any extension code runs.
    let me = unsafe { pg_sys::MyProcPid };
    if slot.pid != 0 && slot.pid != me {
        return false;
    }
    slot.database = database;
    slot.pid = me;
    // SAFETY: as above: a connected worker has its PGPROC.
    slot.procno = unsafe { (*pg_sys::MyProc).pgprocno };
    slot.failed_starts = 0;
    true
}

/// # Safety
/// Called by Postgres at process exit only (registered with `on_shmem_exit`).
#[pg_guard]
unsafe extern "C-unwind" fn unpublish(_code: i32, arg: pg_sys::Datum) {
    let database = arg.value() as u32;
    // SAFETY: this process's pid, set at its start.
    let me = unsafe { pg_sys::MyProcPid };
    let mut registry = REGISTRY.exclusive();
    if let Some(slot) = registry
        .slots
        .iter_mut()
        .find(|s| s.database == database && s.pid == me)
    {
        // Free the slot: the next commit or reader of this database (if it still
        // exists) asks for a successor straight away.
        *slot = Slot::default();
    }
}

unsafe extern "C-unwind" {
    /// Postgres's SIGTERM handler (tcop/tcopprot.h); pgrx binds it only as a Rust
    /// wrapper, which cannot be a signal handler.
    fn die(postgres_signal_arg: std::ffi::c_int);
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn livesync_sequencer_main(arg: pg_sys::Datum) {
    let database = arg.value() as u32;
    if !note_start(database) {
        return; // exit 0: unregistered, not restarted
    }
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM gets Postgres's own handler, not pgrx's (which only sets a flag this
    // loop reads between waits): `die` makes the next CHECK_FOR_INTERRUPTS end the
    // process, including one inside a lock wait in the middle of a tick, which a
    // flag would leave waiting for the lock.
    // SAFETY: `die` is the handler Postgres itself installs for SIGTERM in backends
    // and background workers; it only sets interrupt flags and the latch.
    unsafe { pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(die)) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(database)), None);
    if !publish(database) {
        return; // another worker serves this database; exit 0 so we are not restarted
    }
    // SAFETY: `unpublish` is a guarded callback of the type Postgres calls at exit,
    // and its argument is a plain value.
    unsafe { pg_sys::on_shmem_exit(Some(unpublish), pg_sys::Datum::from(database)) };

    let mut pacer = Pacer::new();
    loop {
        // SAFETY: BackgroundWorker::transaction runs this inside a transaction, as
        // tick::run requires; livesync's presence is checked first.
        let outcome = BackgroundWorker::transaction(|| unsafe {
            if crate::catalog::livesync_relation(c"_sequencer").is_none() {
                return Tick::Uninstalled;
            }
            match crate::tick::run() {
                Some(ticked) => Tick::Sequenced(ticked.transactions),
                None => Tick::Idle,
            }
        });
        let transactions = match outcome {
            Tick::Uninstalled => return, // livesync was dropped from this database
            Tick::Sequenced(transactions) => transactions,
            Tick::Idle => 0,
        };
        let pause = pacer.after_tick(transactions, crate::gucs::TICK_INTERVAL_MS.get());
        if !pause.is_zero() {
            // Let the next commits gather into one batch (and one ring).
            pause_for(pause);
        }
        wait_for_wake_up(POLL);
        if BackgroundWorker::sighup_received() {
            // SAFETY: between transactions, where a process may re-read its
            // configuration (as every Postgres process does in its main loop).
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

/// The longest a SIGTERM goes unnoticed while the worker sleeps between ticks.
const SLEEP_SLICE: Duration = Duration::from_millis(10);

/// Waits until the latch is set (a commit's wake-up, a SIGHUP) or `timeout` has
/// passed. Ends the process when SIGTERM came (Postgres's `die` handler set
/// ProcDiePending; CHECK_FOR_INTERRUPTS then ends a background worker with exit
/// code 1, and the postmaster starts a successor after bgw_restart_time, whose first
/// tick sequences whatever was committed meanwhile; at shutdown nothing restarts).
/// Looked at before waiting too: the signal's latch wake-up may have been used up
/// inside the tick that ran when it came (a lock wait resets the latch).
fn wait_for_wake_up(timeout: Duration) {
    pg_sys::check_for_interrupts!();
    wait_latch(pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT, timeout);
    // SAFETY: the worker's own latch, reset after the wait and before everything
    // that may have set it (commits, SIGTERM, SIGHUP) is looked at: the next tick,
    // the checks below, the caller's: so no wake-up is lost.
    unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
    pg_sys::check_for_interrupts!();
}

/// Sleeps `pause` without watching the latch, in slices of at most `SLEEP_SLICE`,
/// ending the process when SIGTERM came. Not on the latch: every commit meanwhile would wake
/// the worker (SetLatch signals a process that sleeps on its latch), and saving the
/// worker those wake-ups is what the pause is for. A latch set now stays set, so
/// the wait that follows the pause returns at once and the commits get their tick.
fn pause_for(pause: Duration) {
    let end = std::time::Instant::now() + pause;
    loop {
        pg_sys::check_for_interrupts!();
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        wait_latch(pg_sys::WL_TIMEOUT, left.min(SLEEP_SLICE));
        pg_sys::check_for_interrupts!();
    }
}

/// One wait on the worker's latch for `events` (WL_*); on postmaster death Postgres
/// ends the process.
fn wait_latch(events: u32, timeout: Duration) {
    let timeout_ms = timeout.as_millis().clamp(1, 1 << 30) as std::ffi::c_long;
    let events = (events | pg_sys::WL_EXIT_ON_PM_DEATH) as i32;
    // SAFETY: MyLatch is this process's own latch, set up before a worker's main
    // runs, and `events` asks for a timeout, so the wait ends.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            events,
            timeout_ms,
            pg_sys::PG_WAIT_EXTENSION,
        )
    };
}
