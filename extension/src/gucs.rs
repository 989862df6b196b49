//! The extension's settings, all in the `livesync.*` namespace.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

/// `livesync.actor`: who the change log records as the author of this session's
/// writes. The bridge sets it to the authenticated user it writes for; when it is
/// unset or empty, the log records `current_user`.
pub static ACTOR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// `livesync.sequencer`: who gives this session's commits their positions.
/// `auto` hands them to the database's sequencer worker when one runs (needs
/// `shared_preload_libraries = 'livesync'`) and sequences at commit otherwise;
/// `commit` always sequences at commit (positions visible when COMMIT returns).
pub static SEQUENCER: GucSetting<SequencerMode> =
    GucSetting::<SequencerMode>::new(SequencerMode::Auto);

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SequencerMode {
    #[name = c"auto"]
    Auto,
    #[name = c"commit"]
    Commit,
}

/// `livesync.tick_interval` (ms): under load (about 1,500 commits/s and more, at the
/// default), the worker waits this long after a tick that sequenced something, so
/// commits are sequenced (and rung) in batches rather than one tick per commit. At
/// lower rates it ticks as soon as a commit wakes it. 0 never waits.
pub static TICK_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(10);

/// `livesync.max_batch_mutations`: the most mutations one `write_batch` call takes
/// (54000 beyond it). A batch is one transaction, holding its row locks to the end.
pub static MAX_BATCH_MUTATIONS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// `livesync.max_clock_skew` (ms): how far ahead of the server's clock a client's
/// hlc may be; a later wall time is clamped to now plus this.
pub static MAX_CLOCK_SKEW_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);

pub fn sequencer_mode() -> SequencerMode {
    SEQUENCER.get()
}

pub fn init() {
    GucRegistry::define_int_guc(
        c"livesync.tick_interval",
        c"Milliseconds the sequencer worker waits after a productive tick under load (batches commits).",
        c"Only under load: adds at most this much to the delay between a commit and its ring; 0 disables batching.",
        &TICK_INTERVAL_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"livesync.max_batch_mutations",
        c"The most mutations one livesync.write_batch call takes.",
        c"A larger batch is refused with SQLSTATE 54000; split it.",
        &MAX_BATCH_MUTATIONS,
        1,
        1_000_000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"livesync.max_clock_skew",
        c"How far (ms) a client's hlc may be ahead of the server's clock; later ones are clamped.",
        c"Bounds how long a client with a fast clock wins last-writer-wins merges.",
        &MAX_CLOCK_SKEW_MS,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"livesync.sequencer",
        c"Who assigns positions to this session's commits: auto (worker when running) or commit.",
        c"auto hands sequencing to the per-database worker when shared_preload_libraries includes livesync; commit sequences in the committing transaction.",
        &SEQUENCER,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"livesync.actor",
        c"Actor recorded in the change log for this session's writes.",
        c"Empty means current_user. The bridge sets it per request to the authenticated user.",
        &ACTOR,
        GucContext::Userset,
        GucFlags::default(),
    );
}
