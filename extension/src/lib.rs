//! livesync: versioned, commit-ordered change capture for real-time sync.
//!
//! - `capture`: the triggers that write every change of a tracked table to the log.
//! - `catalog`: finding livesync's own tables from triggers, callbacks and the worker.
//! - `row_json`: how a tuple becomes the key / row / delta jsonb the log stores.
//! - `index_entries`: index maintenance for livesync's own rows written directly.
//! - `log_writer`: a statement's changes collected into runs, appended to
//!   `livesync.changes` without the executor.
//! - `log_reader`: the runs read back one change per row (`changes_since`).
//! - `sequencer`: how commits get positions: a transaction's ordinals, its commit
//!   hook, and who ticks.
//! - `tick`: one tick (the sequencer lock, positions given out with direct index
//!   scans and heap writes, the `livesync` doorbell).
//! - `worker`: the per-database background worker that runs the ticks.
//! - `versions`: row versions, handed out in blocks from shared memory.
//! - `restamp`: fresh versions for inserts that a concurrent delete's tombstone overtook.
//! - `write`: conflict-aware writes (`livesync.write`, policies, conflicts).
//! - `actor`: who a change is recorded as made by.
//! - `owner`: running livesync's own reads and writes as the bootstrap superuser.
//! - `privileges`: who may call what; `entry`: the configuration and maintenance
//!   entry points, which check the caller and then run their bodies.
//! - `raise`: raising livesync's own SQLSTATEs from C-interface functions;
//!   `fmgr`: what those functions declare (the V1 info record, and
//!   `raising_c_function!`, the unguarded frame that raises a guarded body's error).
//! - `error`: the error registry (every SQLSTATE livesync raises) and the engine's
//!   errors; `gucs`: settings.
//! - `pg_resources`: open relations, buffer pins, registered snapshots, memory
//!   contexts and context switches held by values that release them when dropped.
//! - `pg_test_support`: for the `#[pg_test]`s, a query's row as raw datums.
//! - `sql/*.sql`: the SQL surface (log tables, changes_since, track/untrack, ...);
//!   `sql/privileges.sql`: the roles and grants.

use pgrx::prelude::*;

mod actor;
mod capture;
mod catalog;
mod entry;
mod error;
mod fmgr;
mod gucs;
mod index_entries;
mod log_reader;
mod log_writer;
mod owner;
mod pg_resources;
#[cfg(any(test, feature = "pg_test"))]
mod pg_test_support;
mod privileges;
mod raise;
mod restamp;
mod row_json;
mod sequencer;
mod tick;
mod versions;
mod worker;
mod write;

/// The system clock in milliseconds since the Unix epoch (0 before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/log.sql", name = "log");
// The version-stamping trigger is a plain C-interface function (see capture.rs).
extension_sql!(
    "CREATE FUNCTION livesync._stamp_version() RETURNS trigger
     LANGUAGE c AS 'MODULE_PATHNAME', 'livesync_stamp_version';",
    name = "stamp_version"
);
// The capture trigger too, under the symbol earlier versions declared (capture.rs).
extension_sql!(
    "CREATE FUNCTION livesync._capture() RETURNS trigger
     LANGUAGE c AS 'MODULE_PATHNAME', '_capture_wrapper';",
    name = "capture"
);
extension_sql_file!(
    "../sql/tracking.sql",
    name = "tracking",
    requires = [
        "log",
        "stamp_version",
        "capture",
        capture::_log_schema_change
    ]
);
extension_sql_file!(
    "../sql/writes.sql",
    name = "writes",
    requires = ["tracking"]
);
extension_sql_file!("../sql/privileges.sql", name = "privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    actor::init();
    capture::init();
    catalog::init();
    log_writer::init();
    row_json::init();
    worker::init();
    versions::init();
    sequencer::init();
    write::init();
}

/// What `cargo pgrx test` asks of the crate for its throwaway cluster
/// (`extension/run-tests`): no settings; the `#[pg_test]`s (in `row_json/pg_tests.rs`,
/// `tick/pg_tests.rs`) need no preloaded library.
#[cfg(test)]
pub mod pg_test {
    /// Runs before each `#[pg_test]`, before the harness installs the extension into
    /// the pg_config `$PGRX_HOME/config.toml` names. Unless `extension/run-tests`
    /// pointed that at its private PostgreSQL copy, it may name the system's, whose
    /// running server has livesync.so loaded: refuse rather than overwrite it (a
    /// plain `cargo test` reaches here too).
    pub fn setup(_options: Vec<&str>) {
        assert!(
            std::env::var_os("LIVESYNC_PG_TEST_COPY").is_some(),
            "run the #[pg_test]s with extension/run-tests (it installs the extension into a \
             private PostgreSQL copy); plain cargo test runs only the unit tests with \
             `-- --skip pg_tests::`"
        );
    }

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
