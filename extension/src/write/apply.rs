//! Applying one mutation: read the row under a lock, decide per column, write,
//! and describe what happened.
//!
//! Decisions, in the order they are taken:
//! - no base at all (neither `base_version` nor `base_values`): a plain overwrite
//!   of the columns sent;
//! - `base_version` equal to the row's version: the row has not moved, apply;
//! - otherwise, per column sent: unchanged since the base → apply; changed by
//!   others to the client's value → nothing to do (`sum` still adds the delta);
//!   changed by both → the column's policy. Columns not sent are never touched.
//!
//! The row is read `FOR UPDATE`, so concurrent writers of one row take turns and
//! each merges against what the previous one committed.

use super::conflicts::{self, ConflictOrigin};
use super::hlc::{ColumnClock, Hlc};
use super::merge::{merge_column, ColumnInput, ColumnMerge, Contest, Decision};
use super::mutation::{Mutation, Op};
use super::origin::OriginGuard;
use super::policy::{DeleteRace, ExistingInsert};
use super::rows::{self, SqlTypedOps, StoredRow};
use super::settings::TableSettings;
use super::WriteError;
use crate::catalog::relation_display;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::{FromDatum, IntoDatum};
use serde_json::{json, Map, Value};

/// A write's result object: built in Rust, or (the fast path) built as jsonb by the
/// statement itself and already in the caller's memory context.
pub enum Applied {
    Value(Value),
    Jsonb(pg_sys::Datum),
}

impl Applied {
    pub fn into_value(self) -> Value {
        match self {
            Applied::Value(value) => value,
            // SAFETY: an `Applied::Jsonb` holds the non-null jsonb datum the write's
            // statement returned, transferred out of SPI into the caller's context.
            Applied::Jsonb(datum) => unsafe {
                super::json::Json::from_polymorphic_datum(datum, false, pg_sys::JSONBOID)
                    .map(|j| j.0)
                    .unwrap_or(Value::Null)
            },
        }
    }

    /// As a jsonb datum, allocated in the current memory context.
    pub fn into_datum(self) -> pg_sys::Datum {
        match self {
            Applied::Value(value) => pgrx::JsonB(value)
                .into_datum()
                .expect("jsonb is never NULL"),
            Applied::Jsonb(datum) => datum,
        }
    }

    /// As a jsonb statement argument (recording it leaves it usable).
    pub fn as_argument(&self) -> DatumWithOid<'_> {
        match self {
            Applied::Value(value) => pgrx::JsonB(value.clone()).into(),
            // SAFETY: a jsonb datum, copied out of SPI's memory into the caller's
            // context by the fast path: valid until the write returns.
            Applied::Jsonb(datum) => unsafe { DatumWithOid::new(*datum, pg_sys::JSONBOID) },
        }
    }
}

/// Applies `mutation` and returns its result object, or, for a mutation id applied
/// before, the result recorded then. What keeps a mutation from being applied (no
/// privilege, a table not tracked, a wrong key, a vetoed statement, ...) comes back
/// as a `WriteError` for the caller to raise; Postgres's own errors (a value of the
/// wrong type, say) are raised where they happen.
pub fn apply(client: &mut SpiClient<'_>, mutation: Mutation) -> Result<Applied, WriteError> {
    // First: a role without the privileges learns nothing, not even whether the
    // table is tracked or the mutation was applied before.
    let missing =
        crate::privileges::missing_table_privileges(mutation.relid, mutation.op.privileges());
    if missing != 0 {
        return Err(WriteError::NoPrivilege {
            op: mutation.op.name(),
            privileges: crate::privileges::privilege_names(missing),
            table: relation_display(mutation.relid),
        });
    }
    if let Some(id) = &mutation.id {
        if let Some(first) = id.lock_and_find(client, mutation.relid)? {
            return Ok(Applied::Value(first));
        }
    }
    // The lock the write's statements take anyway, taken before the table's settings
    // are read: DDL on the table (untrack, a column renamed or dropped) either
    // finishes first, and its invalidation is seen here, or waits for this write.
    // Read first and locked later, a write racing untrack or a rename ran
    // statements built for columns that were gone and failed with their names.
    // SAFETY: a lock on a relation oid inside the write's transaction; a missing
    // relation is reported by the lookup that follows.
    unsafe {
        pg_sys::LockRelationOid(mutation.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE)
    };
    let table = TableSettings::cached(client, mutation.relid)?;
    check_key(&table, &mutation.key)?;
    let (mine, respelled) = check_values(&table, &mutation.key, &mutation.new_values)?;
    // A key column repeated in new_values in another spelling ("3" for 3, an
    // upper-case uuid) is the same key if the column's type says so.
    for column in respelled {
        let sent = &mutation.new_values[&column];
        if !rows::same_typed(client, &table, &column, &mutation.key[&column], sent) {
            return Err(WriteError::KeyChange(column));
        }
    }
    let base = match &mutation.base_values {
        Some(base) => Some(check_values(&table, &mutation.key, base)?.0),
        None => None,
    };
    let actor = crate::actor::current();
    let node = match &mutation.id {
        Some(id) => id.client_id.clone(),
        None => actor.clone(),
    };
    let client_clock = match &mutation.hlc {
        Some(text) => Some(Hlc::parse(text, &node)?),
        None => None,
    };

    let _origin = OriginGuard::set(
        mutation
            .id
            .as_ref()
            .map(|id| (id.client_id.clone(), id.mutation_id)),
    );
    let mut write = Write {
        table: &table,
        key: mutation.key.clone(),
        mine,
        base,
        base_version: mutation.base_version,
        client_clock,
        node,
        actor,
        mutation: &mutation,
    };
    let result = match write.fast(client) {
        Some(result) => result,
        None => Applied::Value(write.merged(client)?),
    };
    if let Some(id) = &mutation.id {
        id.record(client, mutation.relid, result.as_argument());
    }
    Ok(result)
}

fn check_key(table: &TableSettings, key: &Map<String, Value>) -> Result<(), WriteError> {
    let exact = key.len() == table.key.len() && table.key.iter().all(|k| key.contains_key(k));
    if exact {
        Ok(())
    } else {
        Err(WriteError::BadKey {
            table: table.display.clone(),
            key: Value::Object(key.clone()).to_string(),
            columns: table.key.join(", "),
        })
    }
}

/// The non-key columns of `values`, after checking that every column exists, and
/// the key columns (allowed for convenience) whose value is not spelled as in the
/// key: the caller compares those in the column's type.
fn check_values(
    table: &TableSettings,
    key: &Map<String, Value>,
    values: &Map<String, Value>,
) -> Result<(Map<String, Value>, Vec<String>), WriteError> {
    let mut columns = Map::new();
    let mut respelled = Vec::new();
    for (column, value) in values {
        if !table.columns.contains_key(column) {
            return Err(WriteError::UnknownColumn {
                table: table.display.clone(),
                column: column.clone(),
            });
        }
        if table.is_key(column) {
            if key.get(column) != Some(value) {
                respelled.push(column.clone());
            }
            continue;
        }
        columns.insert(column.clone(), value.clone());
    }
    Ok((columns, respelled))
}

struct Write<'a> {
    table: &'a TableSettings,
    key: Map<String, Value>,
    /// The client's new values (non-key columns); typed on the merge path.
    mine: Map<String, Value>,
    base: Option<Map<String, Value>>,
    base_version: Option<i64>,
    client_clock: Option<Hlc>,
    node: String,
    actor: String,
    mutation: &'a Mutation,
}

/// What a merge decided for the row.
#[derive(Default)]
struct Merged {
    writes: Map<String, Value>,
    contests: Vec<Contest>,
    needs_base: Option<String>,
}

impl Write<'_> {
    /// The common case: an update from the row's current version (or a plain
    /// overwrite with no base) is one UPDATE guarded by that version. `None` when
    /// it does not apply or found no such row: the row is then read and merged.
    fn fast(&mut self, client: &mut SpiClient<'_>) -> Option<Applied> {
        let fast = matches!(self.mutation.op, Op::Update | Op::Upsert)
            && !self.mine.is_empty()
            && (self.base_version.is_some() || self.base.is_none());
        if !fast {
            return None;
        }
        let clock = self.clock(None);
        if let Some(raw) = self.mutation.raw {
            let columns: Vec<&String> = self.mine.keys().collect();
            return rows::update_applied(
                client,
                self.table,
                raw,
                &columns,
                &clock,
                self.base_version,
            )
            .map(Applied::Jsonb);
        }
        let entries = self.clock_entries(None, &self.mine, &clock);
        let stored = rows::update(
            client,
            self.table,
            &self.key,
            &self.mine,
            &entries,
            self.base_version,
        )?;
        Some(Applied::Value(result("applied", Some(&stored), &[], None)))
    }

    /// Reads the row (locked) with the client's values typed and printed as the
    /// table would store them, so they compare with stored values (a wrong type
    /// fails here, before anything is written), then decides by the operation.
    fn merged(&mut self, client: &mut SpiClient<'_>) -> Result<Value, WriteError> {
        let fetched = rows::fetch_typed(client, self.table, &self.key, &self.mine);
        self.key = match &fetched.row {
            Some(row) => self
                .table
                .key
                .iter()
                .map(|k| (k.clone(), row.values.get(k).cloned().unwrap_or(Value::Null)))
                .collect(),
            None => rows::canonical(client, self.table, &self.key),
        };
        self.mine = fetched.mine;
        self.base = self
            .base
            .take()
            .map(|base| rows::canonical(client, self.table, &base));
        // A row that row-level security hides from this role is, for this role, not
        // there: an update or delete of it is `not_found`, as a plain UPDATE of it
        // changes nothing (telling the caller it exists would reveal it).
        let row = fetched.row;
        match self.mutation.op {
            Op::Insert => self.insert(client, false, row),
            Op::Upsert => self.insert(client, true, row),
            Op::Update => self.update(client, row),
            Op::Delete => self.delete(client, row),
        }
    }

    /// The clock this write carries: the client's, or one the server stamps now,
    /// after every clock the row holds.
    fn clock(&self, row: Option<&StoredRow>) -> Hlc {
        if let Some(clock) = &self.client_clock {
            return clock.clone();
        }
        let seen = row
            .into_iter()
            .flat_map(|row| row.clocks.values())
            .filter_map(ColumnClock::from_json)
            .map(|c| c.clock);
        Hlc::stamp(crate::now_ms(), seen, &self.node)
    }

    fn their_clock(row: &StoredRow, column: &str) -> Option<Hlc> {
        let entry = ColumnClock::from_json(row.clocks.get(column)?)?;
        entry
            .for_hash(row.hashes.get(column).and_then(Value::as_i64))
            .cloned()
    }

    /// Per-column merge against the stored row. `merge` false: the row has not
    /// moved since the client's base, so its values apply as sent.
    fn merge(
        &self,
        client: &SpiClient<'_>,
        row: &StoredRow,
        merge: bool,
        base: Option<&Map<String, Value>>,
        clock: &Hlc,
    ) -> Merged {
        let mut merged = Merged::default();
        let mut ops = SqlTypedOps {
            table: self.table,
            client,
        };
        for (column, mine) in &self.mine {
            let theirs = row.values.get(column).unwrap_or(&Value::Null);
            if !merge {
                if theirs != mine {
                    merged.writes.insert(column.clone(), mine.clone());
                }
                continue;
            }
            let their_clock = Self::their_clock(row, column);
            let input = ColumnInput {
                column,
                policy: self.table.columns[column],
                base: base.and_then(|b| b.get(column)),
                mine,
                theirs,
                their_clock: their_clock.as_ref(),
            };
            match merge_column(&input, clock, &mut ops) {
                ColumnMerge::NeedsBase => {
                    merged.needs_base = Some(column.clone());
                    return merged;
                }
                ColumnMerge::Settled { decision, contest } => {
                    if let Decision::Write(value) = decision {
                        merged.writes.insert(column.clone(), value);
                    }
                    merged.contests.extend(contest);
                }
            }
        }
        // A value equal to the stored one is not a change: writing it would only
        // produce an empty update in the log.
        merged
            .writes
            .retain(|column, value| row.values.get(column) != Some(value));
        merged
    }

    /// The clock entries for writing `writes` with this write's clock (never
    /// moving a column's clock backwards); the statement adds the value hashes.
    fn clock_entries(
        &self,
        row: Option<&StoredRow>,
        writes: &Map<String, Value>,
        clock: &Hlc,
    ) -> Map<String, Value> {
        writes
            .keys()
            .map(|column| {
                let theirs = row.and_then(|r| Self::their_clock(r, column));
                let newest = match theirs {
                    Some(theirs) if &theirs > clock => theirs,
                    _ => clock.clone(),
                };
                (column.clone(), newest.to_entry())
            })
            .collect()
    }

    fn insert(
        &mut self,
        client: &mut SpiClient<'_>,
        upsert: bool,
        mut row: Option<StoredRow>,
    ) -> Result<Value, WriteError> {
        // Twice at most: a concurrent insert of the same key makes ours do nothing,
        // and the second round finds (and locks) the row it inserted, or (deleted
        // again meanwhile) inserts it.
        for round in 0..2 {
            if round > 0 {
                row = rows::fetch_for_update(client, self.table, &self.key);
            }
            if let Some(row) = row.take() {
                if upsert {
                    return self.update_existing(client, row);
                }
                return match self.table.existing_insert {
                    ExistingInsert::Reject => Ok(rejected("exists", Some(&row))),
                    // The client did not know the row: every column it sends that
                    // differs from the stored value is contested, base unknown.
                    ExistingInsert::Merge => self.merge_and_write(client, row, true, None, true),
                };
            }
            let mut row = self.key.clone();
            row.extend(self.mine.clone());
            let clocks = self.clock_entries(None, &self.mine, &self.clock(None));
            if let Some(stored) = rows::insert(client, self.table, &row, &clocks) {
                return Ok(result("applied", Some(&stored), &[], None));
            }
            // Nothing inserted and no row to be found: RLS hides the row it
            // conflicted with (a plain INSERT would fail on the key, so saying so
            // reveals nothing more), a trigger or rule skipped the insert, or the row
            // it conflicted with was deleted since (another round).
            if rows::rls_applies(self.table) {
                return Err(WriteError::Hidden(self.table.display.clone()));
            }
            if self.table.insert_can_be_skipped && !rows::exists(client, self.table, &self.key) {
                return Err(WriteError::NoEffect(self.table.display.clone()));
            }
        }
        Err(WriteError::InsertRace(self.table.display.clone()))
    }

    fn update(
        &mut self,
        client: &mut SpiClient<'_>,
        row: Option<StoredRow>,
    ) -> Result<Value, WriteError> {
        match row {
            Some(row) => self.update_existing(client, row),
            None if self.base_version.is_none() && self.base.is_none() => {
                Ok(rejected("not_found", None))
            }
            // The client edited a row that has since been deleted.
            None => match self.table.delete_race {
                DeleteRace::DeleteWins => Ok(rejected("deleted", None)),
                DeleteRace::UpdateWins => {
                    let mut row = self.key.clone();
                    row.extend(self.base.clone().unwrap_or_default());
                    row.extend(self.mine.clone());
                    let mut values = row.clone();
                    values.retain(|c, _| !self.table.is_key(c));
                    let clocks = self.clock_entries(None, &values, &self.clock(None));
                    match rows::insert(client, self.table, &row, &clocks) {
                        Some(stored) => {
                            let mut result = result("merged", Some(&stored), &[], None);
                            result["recreated"] = json!(true);
                            Ok(result)
                        }
                        None if rows::rls_applies(self.table) => {
                            Err(WriteError::Hidden(self.table.display.clone()))
                        }
                        None => Err(WriteError::InsertRace(self.table.display.clone())),
                    }
                }
            },
        }
    }

    fn update_existing(
        &mut self,
        client: &mut SpiClient<'_>,
        row: StoredRow,
    ) -> Result<Value, WriteError> {
        let (merge, moved) = match (self.base_version, &self.base) {
            (None, None) => (false, false),
            (Some(version), _) if version == row.version => (false, false),
            (Some(_), _) => (true, true),
            (None, Some(_)) => (true, false),
        };
        let base = self.base.clone();
        self.merge_and_write(client, row, merge, base.as_ref(), moved)
    }

    fn merge_and_write(
        &mut self,
        client: &mut SpiClient<'_>,
        row: StoredRow,
        merge: bool,
        base: Option<&Map<String, Value>>,
        moved: bool,
    ) -> Result<Value, WriteError> {
        let clock = self.clock(Some(&row));
        let merged = self.merge(client, &row, merge, base, &clock);
        if let Some(column) = merged.needs_base {
            let mut result = rejected("needs_base", Some(&row));
            result["column"] = json!(column);
            return Ok(result);
        }
        let mut conflict_ids = Vec::new();
        let origin = ConflictOrigin {
            relid: self.table.relid,
            key: &self.key,
            actor: &self.actor,
            client_id: self.mutation.id.as_ref().map(|id| id.client_id.as_str()),
            mutation_id: self.mutation.id.as_ref().map(|id| id.mutation_id),
        };
        for contest in &merged.contests {
            conflict_ids.push(
                (contest.outcome == "manual").then(|| conflicts::store(client, &origin, contest)),
            );
        }
        let stored = if merged.writes.is_empty() {
            row
        } else {
            let clocks = self.clock_entries(Some(&row), &merged.writes, &clock);
            // The row is locked: an update that returns nothing was vetoed by a
            // trigger, or an RLS policy lets the role see the row but not update it.
            match rows::update(client, self.table, &self.key, &merged.writes, &clocks, None) {
                Some(stored) => stored,
                None => return Err(self.vetoed()),
            }
        };
        let status = if conflict_ids.iter().any(Option::is_some) {
            "conflict"
        } else if moved || !merged.contests.is_empty() {
            "merged"
        } else {
            "applied"
        };
        let contests: Vec<(&Contest, Option<i64>)> =
            merged.contests.iter().zip(conflict_ids).collect();
        Ok(result(status, Some(&stored), &contests, None))
    }

    /// Why a statement on a row that exists had no effect: row-level security
    /// (the row is there for a role that bypasses it, but the caller's policies
    /// exclude it from this command) or else a trigger that returned NULL.
    fn vetoed(&self) -> WriteError {
        if rows::rls_applies(self.table) {
            WriteError::Hidden(self.table.display.clone())
        } else {
            WriteError::NoEffect(self.table.display.clone())
        }
    }

    fn delete(
        &mut self,
        client: &mut SpiClient<'_>,
        row: Option<StoredRow>,
    ) -> Result<Value, WriteError> {
        let Some(row) = row else {
            // Already gone: the state the client asked for.
            return Ok(result("applied", None, &[], None));
        };
        let changed_since_base = self.base_version.is_some_and(|v| v != row.version)
            || self.base.as_ref().is_some_and(|base| {
                base.iter()
                    .any(|(column, value)| row.values.get(column).unwrap_or(&Value::Null) != value)
            });
        if changed_since_base && self.table.delete_race == DeleteRace::UpdateWins {
            return Ok(rejected("changed_since_base", Some(&row)));
        }
        if rows::delete(client, self.table, &self.key).is_none() {
            return Err(self.vetoed());
        }
        Ok(result("applied", None, &[], None))
    }
}

fn result(
    status: &str,
    row: Option<&StoredRow>,
    contests: &[(&Contest, Option<i64>)],
    reason: Option<&str>,
) -> Value {
    let mut result = Map::new();
    result.insert("status".into(), json!(status));
    if let Some(row) = row {
        result.insert("version".into(), json!(row.version));
        result.insert("row".into(), Value::Object(row.values.clone()));
    }
    if !contests.is_empty() {
        let entries = contests.iter().map(|(c, id)| c.to_json(*id)).collect();
        result.insert("conflicts".into(), Value::Array(entries));
    }
    if let Some(id) = contests.iter().find_map(|(_, id)| *id) {
        result.insert("conflict_id".into(), json!(id));
    }
    if let Some(reason) = reason {
        result.insert("reason".into(), json!(reason));
    }
    Value::Object(result)
}

fn rejected(reason: &str, row: Option<&StoredRow>) -> Value {
    result("rejected", row, &[], Some(reason))
}
