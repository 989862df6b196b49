//! The extension's one error type. Every variant maps to a stable SQLSTATE so clients
//! (and the bridge) can branch on the code, not on message text.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum LivesyncError {
    #[error("PREPARE TRANSACTION is not supported for transactions that change tracked tables")]
    PrepareNotSupported,
    #[error("tracked table {0} has no primary key")]
    NoPrimaryKey(String),
    #[error("tracked table {0} has no _livesync_version bigint column")]
    NoVersionColumn(String),
    #[error("livesync is not installed in this database")]
    NotInstalled,
    #[error("livesync's log tables do not have the layout this version of livesync writes")]
    LogTableChanged,
    #[error("an insert into {0} waited for a concurrent delete of its key, and its _livesync_version is indexed, so it cannot be given a newer version in place")]
    InsertOvertaken(String),
    #[error("livesync's capture trigger fired on {0} other than as livesync.track installs it (on a table it tracks, AFTER, per statement)")]
    NotRegistered(String),
    #[error("livesync.changes holds a run that capture would not write (each change an array [key, old, new, version], old and new objects or null)")]
    MalformedRun,
}

impl LivesyncError {
    fn code(&self) -> PgSqlErrorCode {
        match self {
            LivesyncError::PrepareNotSupported => PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            LivesyncError::NoPrimaryKey(_) | LivesyncError::NoVersionColumn(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            LivesyncError::NotInstalled => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            LivesyncError::LogTableChanged => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            LivesyncError::InsertOvertaken(_) => PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            LivesyncError::NotRegistered(_) => {
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE
            }
            LivesyncError::MalformedRun => PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            LivesyncError::PrepareNotSupported => {
                "Commit the transaction directly; livesync assigns change positions at commit."
            }
            LivesyncError::NoPrimaryKey(_) | LivesyncError::NoVersionColumn(_) => {
                "Call livesync.untrack() and livesync.track() on the table to repair its capture."
            }
            LivesyncError::NotInstalled => "Run CREATE EXTENSION livesync in this database.",
            LivesyncError::NotRegistered(_) => {
                "Capture triggers are livesync.track's to install: call livesync.track on the table, or drop the triggers."
            }
            LivesyncError::InsertOvertaken(_) => {
                "Retry the transaction: the delete has committed, so the retry's row gets a version after its tombstone. Dropping the index on _livesync_version avoids this."
            }
            LivesyncError::LogTableChanged => {
                "The extension's tables are from another livesync version: run ALTER EXTENSION livesync UPDATE in this database. Indexes added to livesync.changes must be plain column indexes."
            }
            LivesyncError::MalformedRun => {
                "Only livesync's capture writes livesync.changes: delete the run, and have readers that read past it resync."
            }
        }
    }

    /// Raises this error as a Postgres ERROR; does not return.
    pub fn raise(self) -> ! {
        let hint = self.hint();
        ErrorReport::new(self.code(), self.to_string(), "livesync")
            .set_hint(hint)
            .report(pgrx::PgLogLevel::ERROR);
        unreachable!("ERROR-level reports do not return")
    }
}
