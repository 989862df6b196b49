//! livesync's error registry.
//!
//! [`SqlState`] is every SQLSTATE livesync raises, from Rust or from its SQL
//! functions; the table "Error codes" in `docs/sql.md` lists the same codes (a test
//! below holds the two, and the SQL files' `ERRCODE`s, together). Each error type
//! maps its variants onto it with an exhaustive match, so a new variant must be
//! given its code.
//!
//! [`LivesyncError`] is the engine's own errors (capture, the log, ticks), and those
//! the write path raises where they happen (a list value that is not an array, JSON
//! nested too deep). `write::WriteError` is what a write returns, engine errors
//! among them.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::PgSqlErrorCode;

/// Declares [`SqlState`] from one table of `Variant = "CODE"`: the enum, `ALL` (in
/// the table's order) and `code()`, so no list can miss a code another has.
macro_rules! sqlstates {
    ($($(#[$doc:meta])* $variant:ident = $code:literal,)*) => {
        /// A SQLSTATE livesync raises.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        // Some codes are raised only by the SQL functions (`sql/*.sql`); they are
        // listed here all the same, and the tests check the SQL against this list.
        #[cfg_attr(not(test), allow(dead_code))]
        pub enum SqlState {
            $($(#[$doc])* $variant,)*
        }

        impl SqlState {
            /// Every code, in the order of the table in `docs/sql.md`.
            #[cfg_attr(not(test), allow(dead_code))]
            pub const ALL: &'static [SqlState] = &[$(SqlState::$variant,)*];

            /// The five-character code.
            pub const fn code(self) -> &'static str {
                match self {
                    $(SqlState::$variant => $code,)*
                }
            }
        }
    };
}

sqlstates! {
    /// The position is outside the retained log; resync.
    ResyncRequired = "LS001",
    /// The table is not tracked.
    NotTracked = "LS002",
    /// The table has no primary key.
    NoPrimaryKey = "LS003",
    /// A key does not name exactly the primary-key columns.
    KeyMismatch = "LS004",
    /// A schema change would break the capture of a tracked table.
    CaptureWouldBreak = "LS005",
    /// No such open conflict.
    ConflictNotOpen = "LS006",
    /// An all-or-nothing batch had a mutation rejected or failing.
    BatchAborted = "LS007",
    /// The write's statement had no effect.
    NoEffect = "LS008",
    InsufficientPrivilege = "42501",
    UndefinedColumn = "42703",
    UndefinedTable = "42P01",
    UndefinedObject = "42704",
    DatatypeMismatch = "42804",
    WrongObjectType = "42809",
    SerializationFailure = "40001",
    ProgramLimitExceeded = "54000",
    NullValueNotAllowed = "22004",
    InvalidParameterValue = "22023",
    FeatureNotSupported = "0A000",
    ObjectNotInPrerequisiteState = "55000",
    TriggerProtocolViolated = "39P01",
    DataCorrupted = "XX001",
    /// livesync met a state it does not expect (a bug).
    InternalError = "XX000",
}

impl SqlState {
    /// The code as Postgres encodes it (`MAKE_SQLSTATE`).
    pub fn encoded(self) -> i32 {
        self.code()
            .bytes()
            .enumerate()
            .map(|(i, c)| (i32::from(c.wrapping_sub(b'0')) & 0x3F) << (6 * i))
            .sum()
    }

    /// The code as pgrx knows it, or `None` for livesync's own `LSnnn` codes, which
    /// pgrx cannot carry: those are raised from an unguarded frame (`raise.rs`).
    pub fn pgrx_code(self) -> Option<PgSqlErrorCode> {
        (!self.code().starts_with("LS")).then(|| PgSqlErrorCode::from(self.encoded()))
    }
}

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
    #[error("{0} must be called as a trigger")]
    NotCalledAsTrigger(&'static str),
    #[error("column \"{column}\" has policy {policy}, which merges arrays, but its value {value} is not an array")]
    NotAList {
        column: String,
        policy: String,
        value: String,
    },
    #[error("a JSON value nested {depth} levels deep is deeper than livesync handles ({max})")]
    NestedTooDeep { depth: usize, max: usize },
    /// A step that cannot fail unless livesync itself is wrong: what it was doing.
    #[error("livesync: {0}")]
    Internal(String),
}

impl LivesyncError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            LivesyncError::PrepareNotSupported => SqlState::FeatureNotSupported,
            LivesyncError::NoPrimaryKey(_) => SqlState::NoPrimaryKey,
            LivesyncError::NoVersionColumn(_)
            | LivesyncError::LogTableChanged
            | LivesyncError::NotRegistered(_) => SqlState::ObjectNotInPrerequisiteState,
            LivesyncError::NotInstalled => SqlState::UndefinedObject,
            LivesyncError::InsertOvertaken(_) => SqlState::SerializationFailure,
            LivesyncError::MalformedRun => SqlState::DataCorrupted,
            LivesyncError::NotCalledAsTrigger(_) => SqlState::TriggerProtocolViolated,
            LivesyncError::NotAList { .. } => SqlState::InvalidParameterValue,
            LivesyncError::NestedTooDeep { .. } => SqlState::ProgramLimitExceeded,
            LivesyncError::Internal(_) => SqlState::InternalError,
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        Some(match self {
            LivesyncError::PrepareNotSupported => {
                "Commit the transaction directly; livesync assigns change positions at commit."
            }
            // Possible only with livesync's event trigger disabled; track refuses a
            // table without a key, so untrack/track is no repair.
            LivesyncError::NoPrimaryKey(_) => {
                "Add the primary key back (ALTER TABLE ... ADD PRIMARY KEY), or untrack the table."
            }
            LivesyncError::NoVersionColumn(_) => {
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
            LivesyncError::NestedTooDeep { .. } => {
                "Store such documents in a column the write does not send, or flatten them."
            }
            LivesyncError::Internal(_) => {
                "This is a bug in livesync: please report it with this message."
            }
            LivesyncError::NotCalledAsTrigger(_) | LivesyncError::NotAList { .. } => return None,
        })
    }

    /// Raises this error as a Postgres ERROR; does not return. For errors with a
    /// code pgrx knows: an `LSnnn` error must travel back as a value to an unguarded
    /// frame and be raised there (`raise.rs`), or pgrx reports it as `XX000`.
    pub fn raise(self) -> ! {
        let sqlstate = self.sqlstate();
        let code = sqlstate.pgrx_code().unwrap_or_else(|| {
            panic!(
                "livesync bug: {} ({}) raised where pgrx would lose its SQLSTATE",
                self,
                sqlstate.code()
            )
        });
        let mut report = ErrorReport::new(code, self.to_string(), "livesync");
        if let Some(hint) = self.hint() {
            report = report.set_hint(hint);
        }
        report.report(pgrx::PgLogLevel::ERROR);
        unreachable!("ERROR-level reports do not return")
    }
}

/// Raises a step that cannot fail unless livesync itself is wrong (`XX000`): what
/// it was doing.
pub fn internal(what: impl Into<String>) -> ! {
    LivesyncError::Internal(what.into()).raise()
}

#[cfg(test)]
mod tests {
    use super::SqlState;
    use std::collections::BTreeSet;

    fn read(path: &str) -> String {
        let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {full}: {e}"))
    }

    fn registry() -> BTreeSet<&'static str> {
        SqlState::ALL.iter().map(|s| s.code()).collect()
    }

    #[test]
    fn every_code_is_listed_once_and_well_formed() {
        assert_eq!(
            registry().len(),
            SqlState::ALL.len(),
            "a code is listed twice in SqlState::ALL"
        );
        for &state in SqlState::ALL {
            let code = state.code();
            assert!(
                code.len() == 5
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()),
                "{code}"
            );
            // pgrx carries every code but livesync's own, as itself (pgrx turns a
            // code it does not know into XX000).
            match state.pgrx_code() {
                None => assert!(code.starts_with("LS"), "{code}"),
                Some(known) => assert_eq!(known as i32, state.encoded(), "{code}"),
            }
        }
    }

    /// The "Error codes" table of docs/sql.md lists exactly the registry's codes, in
    /// its order.
    #[test]
    fn docs_error_table_matches_the_registry() {
        let docs = read("../docs/sql.md");
        let section = docs
            .split("\n## Error codes\n")
            .nth(1)
            .expect("docs/sql.md has a section \"## Error codes\"");
        let section = section.split("\n## ").next().unwrap_or(section);
        let documented: Vec<&str> = section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split('`').next())
            .collect();
        let registered: Vec<&str> = SqlState::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(
            documented, registered,
            "docs/sql.md's error table and SqlState::ALL differ"
        );
    }

    /// Every `ERRCODE` the current SQL files raise is in the registry.
    #[test]
    fn sql_files_raise_only_registered_codes() {
        // The condition names the SQL files use, as PostgreSQL's errcodes.txt spells them.
        let names = [
            ("insufficient_privilege", "42501"),
            ("invalid_parameter_value", "22023"),
            ("wrong_object_type", "42809"),
            ("undefined_column", "42703"),
            ("datatype_mismatch", "42804"),
            ("program_limit_exceeded", "54000"),
            ("null_value_not_allowed", "22004"),
        ];
        let registry = registry();
        let mut seen = 0;
        // The current version's files; upgrade scripts (livesync--*) restate them.
        let dir = format!("{}/sql", env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .map(|entry| {
                entry
                    .expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name.ends_with(".sql") && !name.starts_with("livesync--"))
            .collect();
        files.sort();
        assert!(files.len() >= 4, "found only {files:?} in {dir}");
        for file in files {
            let text = read(&format!("sql/{file}"));
            for piece in text.split("ERRCODE = '").skip(1) {
                let raised = piece.split('\'').next().unwrap_or_default();
                let code = names
                    .iter()
                    .find(|(name, _)| *name == raised)
                    .map_or(raised, |(_, code)| code);
                assert!(
                    registry.contains(code),
                    "{file} raises {raised} ({code}), which is not in SqlState (error.rs) or docs/sql.md"
                );
                seen += 1;
            }
        }
        assert!(
            seen > 20,
            "found only {seen} ERRCODEs: has the SQL's spelling changed?"
        );
    }
}
