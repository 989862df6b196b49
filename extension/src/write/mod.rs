//! Conflict-aware writes: `livesync.write` and `livesync.resolve_conflict`
//! (C-interface functions, below) and the body of `livesync.write_batch`
//! (`_write_json`; the batch itself is PL/pgSQL in `sql/writes.sql`).
//!
//! - `mutation`: the arguments, checked for shape.
//! - `apply`: the decisions of one write (lock, merge, write, result); it calls
//!   down into `settings` and `rows`, which never call back.
//! - `settings`: a tracked table's key, columns and policies, cached per backend.
//! - `rows`: the table's rows read and locked, inserted, updated, deleted, and
//!   values typed as the table types them.
//! - `statements`: the text of the statements `rows` runs.
//! - `merge`, `policy`, `hlc`: the per-column three-way merge and its rules.
//! - `idempotency`, `conflicts`: the `(client_id, mutation_id)` records and the
//!   stored `manual` conflicts.
//! - `json`: jsonb read without serde_json's nesting limit.
//! - `origin`: tells capture which mutation the current changes belong to.
//! - `plans`: kept plans for every statement the modules above run.

mod apply;
mod conflicts;
mod hlc;
mod idempotency;
mod json;
mod merge;
mod mutation;
pub mod origin;
mod plans;
mod policy;
mod rows;
mod settings;
mod statements;

pub use settings::init;

use crate::error::{LivesyncError, SqlState};
use crate::raise::{ErrorToRaise, Outcome};
use mutation::{MutationArgs, Op};
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("unknown write operation \"{0}\"")]
    UnknownOp(String),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("{0} must be a JSON object")]
    NotAnObject(&'static str),
    #[error("unknown mutation field \"{0}\"")]
    UnknownField(String),
    #[error("mutation field {0} must be {1}")]
    WrongFieldType(&'static str, &'static str),
    #[error("client_id and mutation_id must be given together")]
    HalfMutationId,
    #[error("invalid hlc \"{0}\"")]
    BadHlc(String),
    #[error("relation \"{0}\" does not exist")]
    UnknownTable(String),
    #[error("table {0} is not tracked")]
    NotTracked(String),
    /// An engine error met on the write path (a tracked table without its key).
    #[error(transparent)]
    Engine(#[from] LivesyncError),
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
    #[error("key {key} does not name exactly the primary key columns of {table}")]
    BadKey {
        table: String,
        key: String,
        columns: String,
    },
    #[error("new_values changes primary key column \"{0}\"")]
    KeyChange(String),
    #[error("column \"{column}\" of {table} does not exist or is not writable")]
    UnknownColumn { table: String, column: String },
    #[error("another transaction keeps inserting and deleting this key of {0}")]
    InsertRace(String),
    #[error("conflict {0} does not exist")]
    NoConflict(i64),
    #[error("conflict {0} is already resolved")]
    ConflictResolved(i64),
    #[error("the row of conflict {0} no longer exists")]
    ConflictRowGone(i64),
    #[error("choice must be mine, theirs or value, got \"{0}\"")]
    BadChoice(String),
    #[error("choice value needs a value")]
    ValueMissing,
    #[error("client_id is {0} bytes long; at most 256 are accepted")]
    ClientIdTooLong(usize),
    #[error("the write to {0} changed nothing: a BEFORE trigger on the table skipped the row")]
    NoEffect(String),
    #[error(
        "the write to {0} had no effect: row-level security keeps this row from the current role (or a trigger skipped it)"
    )]
    Hidden(String),
    #[error("permission denied: livesync.write {op} needs {privileges} on table {table}")]
    NoPrivilege {
        op: &'static str,
        privileges: String,
        table: String,
    },
    #[error("permission denied: resolving a conflict of {table} needs {privileges} on it")]
    NoResolvePrivilege { table: String, privileges: String },
    #[error("permission denied: conflict {0} is on a table the current role may not read")]
    ConflictHidden(i64),
    #[error("mutation {mutation_id} of client \"{client_id}\" was applied to another table")]
    MutationOfAnotherTable { client_id: String, mutation_id: i64 },
}

impl WriteError {
    fn sqlstate(&self) -> SqlState {
        match self {
            WriteError::NotTracked(_) => SqlState::NotTracked,
            WriteError::Engine(e) => e.sqlstate(),
            WriteError::NullArgument(_) => SqlState::NullValueNotAllowed,
            WriteError::BadKey { .. } | WriteError::KeyChange(_) => SqlState::KeyMismatch,
            WriteError::NoConflict(_)
            | WriteError::ConflictResolved(_)
            | WriteError::ConflictRowGone(_) => SqlState::ConflictNotOpen,
            WriteError::UnknownColumn { .. } => SqlState::UndefinedColumn,
            WriteError::UnknownTable(_) => SqlState::UndefinedTable,
            WriteError::InsertRace(_) => SqlState::SerializationFailure,
            WriteError::NoEffect(_) => SqlState::NoEffect,
            WriteError::Hidden(_)
            | WriteError::NoPrivilege { .. }
            | WriteError::NoResolvePrivilege { .. }
            | WriteError::ConflictHidden(_) => SqlState::InsufficientPrivilege,
            WriteError::UnknownOp(_)
            | WriteError::Missing(_)
            | WriteError::NotAnObject(_)
            | WriteError::UnknownField(_)
            | WriteError::WrongFieldType(..)
            | WriteError::HalfMutationId
            | WriteError::BadHlc(_)
            | WriteError::BadChoice(_)
            | WriteError::ValueMissing
            | WriteError::ClientIdTooLong(_)
            | WriteError::MutationOfAnotherTable { .. } => SqlState::InvalidParameterValue,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            WriteError::UnknownOp(_) => Some("Use insert, update, upsert or delete.".into()),
            WriteError::BadKey { columns, .. } => Some(format!("Pass a JSON object with the keys {columns}.")),
            WriteError::KeyChange(_) => {
                Some("A write cannot change a row's key: delete the row and insert it under the new key.".into())
            }
            WriteError::NotTracked(table) => Some(format!("Call livesync.track('{table}') first.")),
            WriteError::Engine(e) => e.hint().map(String::from),
            WriteError::BadHlc(_) => {
                Some("An hlc is \"<unix ms>:<counter>[:<node>]\", e.g. \"1764072000000:0:phone-1\".".into())
            }
            WriteError::ConflictRowGone(_) => {
                Some("The row was deleted since; resolve the conflict with 'theirs' to close it.".into())
            }
            WriteError::InsertRace(_) => Some("Retry the transaction.".into()),
            WriteError::NullArgument(_) => {
                Some("resolve_conflict needs a conflict id and a choice: mine, theirs or value (with a value).".into())
            }
            WriteError::NoEffect(_) => Some(
                "A trigger that returns NULL (or a rule) vetoed the statement livesync.write ran; check the table's triggers."
                    .into(),
            ),
            WriteError::Hidden(_) => Some(
                "The role needs row-level security policies that let it see and write the row; a BEFORE trigger returning NULL has the same effect.".into(),
            ),
            WriteError::NoPrivilege { privileges, table, .. } => Some(format!(
                "GRANT {privileges} ON {table} TO the role that writes (livesync.write reads and locks the row it merges against, so it always needs SELECT and UPDATE)."
            )),
            WriteError::MutationOfAnotherTable { .. } => {
                Some("Mutation ids are unique per client: use a new mutation_id for another write.".into())
            }
            _ => None,
        }
    }
}

crate::fmgr::raising_c_function!(
    /// `livesync.write` (declared in `sql/writes.sql`). Written against the C function
    /// interface rather than `#[pg_extern]` so that its own errors keep livesync's
    /// SQLSTATEs without a PL/pgSQL wrapper (which cost 5-8% of a write).
    pg_finfo_livesync_write, livesync_write => write_guarded
);

/// # Safety
/// `fcinfo` must be a call of `livesync.write` (its nine arguments).
#[pg_guard]
unsafe extern "C-unwind" fn write_guarded(fcinfo: pg_sys::FunctionCallInfo) -> Outcome {
    // SAFETY: the nine arguments are read with the types `livesync.write` declares
    // (the caller's contract).
    unsafe {
        let args = MutationArgs {
            relid: pgrx::fcinfo::pg_getarg::<pg_sys::Oid>(fcinfo, 0),
            op: pgrx::fcinfo::pg_getarg::<String>(fcinfo, 1),
            key: pgrx::fcinfo::pg_getarg::<json::Json>(fcinfo, 2).map(|k| k.0),
            new_values: pgrx::fcinfo::pg_getarg::<json::Json>(fcinfo, 3).map(|v| v.0),
            base_version: pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 4),
            base_values: pgrx::fcinfo::pg_getarg::<json::Json>(fcinfo, 5).map(|v| v.0),
            client_id: pgrx::fcinfo::pg_getarg::<String>(fcinfo, 6),
            mutation_id: pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 7),
            hlc: pgrx::fcinfo::pg_getarg::<String>(fcinfo, 8),
        };
        let applied = args.check().and_then(|mut m| {
            if let (Some(key), Some(new_values)) = (
                pgrx::fcinfo::pg_getarg_datum(fcinfo, 2),
                pgrx::fcinfo::pg_getarg_datum(fcinfo, 3),
            ) {
                m.raw = Some((key, new_values));
            }
            Spi::connect_mut(|client| apply::apply(client, m))
        });
        written(applied)
    }
}

/// The outcome of a write: its result, or its error to raise.
fn written(applied: Result<apply::Applied, WriteError>) -> Outcome {
    outcome(applied.map(apply::Applied::into_datum))
}

fn outcome(result: Result<pg_sys::Datum, WriteError>) -> Outcome {
    match result {
        Ok(result) => Outcome::done(result),
        Err(e) => Outcome::failed(ErrorToRaise::palloc(
            e.sqlstate(),
            &e.to_string(),
            e.hint().as_deref(),
        )),
    }
}

crate::fmgr::raising_c_function!(
    /// `livesync._write_json` (declared in `sql/writes.sql`): one element of
    /// `write_batch`'s array, applied like `livesync.write` and failing like it, with an
    /// ERROR. (Reported as data instead, a direct call that failed halfway kept what it
    /// had done, a stored conflict say, with nobody to roll it back.)
    pg_finfo_livesync_write_json, livesync_write_json => write_json_guarded
);

crate::fmgr::raising_c_function!(
    /// `livesync._write_json` as livesync 0.1.0 and 0.2.0 declared it (C symbol
    /// `write_json_wrapper`; their `_checked` passes its results on): a database keeps
    /// working on this library until `ALTER EXTENSION livesync UPDATE`, and the regress
    /// suite installs those versions.
    pg_finfo_write_json_wrapper, write_json_wrapper => write_json_guarded
);

/// # Safety
/// `fcinfo` must be a call of `livesync._write_json` (one jsonb argument).
#[pg_guard]
unsafe extern "C-unwind" fn write_json_guarded(fcinfo: pg_sys::FunctionCallInfo) -> Outcome {
    // SAFETY: the one argument is read as the jsonb it is declared as (the
    // caller's contract).
    unsafe {
        let applied = match pgrx::fcinfo::pg_getarg::<json::Json>(fcinfo, 0) {
            Some(json::Json(mutation)) => MutationArgs::from_json(&mutation)
                .and_then(MutationArgs::check)
                .and_then(|m| Spi::connect_mut(|client| apply::apply(client, m))),
            None => Err(WriteError::Missing("mutation")),
        };
        written(applied)
    }
}

crate::fmgr::raising_c_function!(
    /// `livesync.resolve_conflict(conflict_id bigint, choice text, value jsonb)`
    /// (declared in `sql/writes.sql`): settles a stored conflict, raising livesync's
    /// SQLSTATEs itself, as `livesync.write` does.
    pg_finfo_livesync_resolve_conflict, livesync_resolve_conflict => resolve_guarded
);

crate::fmgr::raising_c_function!(
    /// `livesync._resolve_conflict` as livesync 0.1.0 to 0.4.0 declared it (C symbol
    /// `resolve_conflict_wrapper`; their `_checked` passes its results on).
    pg_finfo_resolve_conflict_wrapper, resolve_conflict_wrapper => resolve_guarded
);

/// # Safety
/// `fcinfo` must be a call of `livesync.resolve_conflict` (bigint, text, jsonb), or
/// of `_resolve_conflict` as 0.1.0 to 0.4.0 declared it (the same arguments).
#[pg_guard]
unsafe extern "C-unwind" fn resolve_guarded(fcinfo: pg_sys::FunctionCallInfo) -> Outcome {
    // SAFETY: the three arguments are read with the types `resolve_conflict`
    // declares, each of them possibly NULL (the caller's contract).
    unsafe {
        let conflict_id = pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 0);
        let choice = pgrx::fcinfo::pg_getarg::<String>(fcinfo, 1);
        let value = pgrx::fcinfo::pg_getarg::<json::Json>(fcinfo, 2).map(|v| v.0);
        let resolved = match (conflict_id, choice) {
            (Some(conflict_id), Some(choice)) => resolve(conflict_id, &choice, value),
            (None, _) => Err(WriteError::NullArgument("conflict_id")),
            (_, None) => Err(WriteError::NullArgument("choice")),
        };
        outcome(resolved.map(|result| JsonB(result).into_datum().expect("jsonb is never NULL")))
    }
}

// Read without a lock: a role that may not settle the conflict must not hold it
// locked from those who may. The lock is taken once the caller has passed.
const READ_CONFLICT: &str = "
SELECT relation::oid, key, column_name, mine, resolved_at IS NOT NULL
FROM livesync._conflicts WHERE id = $1";

const LOCK_CONFLICT: &str = "
SELECT resolved_at IS NOT NULL FROM livesync._conflicts WHERE id = $1 FOR UPDATE";

const SETTLE_CONFLICT: &str = "
UPDATE livesync._conflicts SET resolved_at = now(), resolution = $2 WHERE id = $1";

fn resolve(conflict_id: i64, choice: &str, value: Option<Value>) -> Result<Value, WriteError> {
    type Conflict = (pg_sys::Oid, JsonB, String, JsonB, bool);
    let conflict: Option<Conflict> = crate::owner::sql_as_bootstrap_superuser(|| {
        Spi::connect_mut(|client| {
            let table = client.update(READ_CONFLICT, Some(1), &[conflict_id.into()])?;
            if table.is_empty() {
                return Ok(None);
            }
            let row = table.first();
            Ok::<_, pgrx::spi::SpiError>(Some((
                row.get::<pg_sys::Oid>(1)?.unwrap_or_default(),
                row.get::<JsonB>(2)?.unwrap_or(JsonB(Value::Null)),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<JsonB>(4)?.unwrap_or(JsonB(Value::Null)),
                row.get::<bool>(5)?.unwrap_or(false),
            )))
        })
    })
    .unwrap_or_else(|e| {
        crate::error::internal(format!("reading conflict {conflict_id} failed: {e}"))
    });
    let Some((relid, JsonB(key), column, JsonB(mine), resolved)) = conflict else {
        return Err(WriteError::NoConflict(conflict_id));
    };
    // Every choice settles the table's conflict, `theirs` included (it writes
    // nothing, so the table's own privileges would never be asked): SELECT and
    // UPDATE, as for the writes `mine` and `value` make. A role that may not read
    // the table is not told which table the conflict is on (livesync.conflicts
    // does not show it either).
    let missing = crate::privileges::missing_table_privileges(
        relid,
        (pg_sys::ACL_SELECT | pg_sys::ACL_UPDATE) as pg_sys::AclMode,
    );
    if missing & pg_sys::ACL_SELECT as pg_sys::AclMode != 0 {
        return Err(WriteError::ConflictHidden(conflict_id));
    }
    if missing != 0 {
        return Err(WriteError::NoResolvePrivilege {
            table: crate::catalog::relation_display(relid),
            privileges: crate::privileges::privilege_names(missing),
        });
    }
    // Nor a conflict of a row that row-level security hides from the role (the
    // conflicts view does not show it either). Asked as the caller.
    // SAFETY: a catalog check by relation oid (InvalidOid: the current user), with
    // noError set.
    let rls_applies = unsafe {
        pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
    };
    if rls_applies {
        let visible = Spi::get_one_with_args::<bool>(
            "SELECT livesync._row_visible($1, $2)",
            &[relid.into(), JsonB(key.clone()).into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !visible {
            return Err(WriteError::ConflictHidden(conflict_id));
        }
    }
    // Settled by someone else meanwhile? Read again under the lock.
    let resolved = resolved
        || crate::owner::sql_as_bootstrap_superuser(|| {
            Spi::connect_mut(|client| {
                client
                    .update(LOCK_CONFLICT, Some(1), &[conflict_id.into()])?
                    .first()
                    .get_one::<bool>()
            })
        })
        .unwrap_or_else(|e| {
            crate::error::internal(format!("locking conflict {conflict_id} failed: {e}"))
        })
        .unwrap_or(true);
    if resolved {
        return Err(WriteError::ConflictResolved(conflict_id));
    }
    let chosen = match choice {
        "mine" => Some(mine),
        "value" => Some(value.ok_or(WriteError::ValueMissing)?),
        "theirs" => None,
        other => return Err(WriteError::BadChoice(other.to_string())),
    };
    let result = match &chosen {
        // The stored value stands: nothing to write.
        None => json!({"status": "applied"}),
        Some(chosen) => {
            let mutation = MutationArgs {
                relid: Some(relid),
                op: Some("update".into()),
                key: Some(key),
                new_values: Some(json!({ column.clone(): chosen })),
                base_version: None,
                base_values: None,
                client_id: None,
                mutation_id: None,
                hlc: None,
            }
            .check()?;
            debug_assert_eq!(mutation.op, Op::Update);
            // No base: a plain overwrite of the one column, whatever its policy.
            let result = Spi::connect_mut(|client| apply::apply(client, mutation))?.into_value();
            if result["reason"] == "not_found" {
                return Err(WriteError::ConflictRowGone(conflict_id));
            }
            result
        }
    };
    let resolution = json!({"choice": choice, "value": chosen, "version": result.get("version")});
    crate::owner::sql_as_bootstrap_superuser(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    SETTLE_CONFLICT,
                    None,
                    &[conflict_id.into(), JsonB(resolution).into()],
                )
                .map(|_| ())
        })
    })
    .unwrap_or_else(|e| {
        crate::error::internal(format!("settling conflict {conflict_id} failed: {e}"))
    });
    Ok(result)
}
