//! A tracked table's rows as `livesync.write` reaches them: read and locked, inserted,
//! updated, deleted, and values typed as the table types them. Each runs one
//! statement from `statements` through its kept plan.
//!
//! Statements on the table run as the calling role: its privileges and row-level
//! security apply, and capture records the change like any other.

use super::json::Json;
use super::merge::TypedOps;
use super::plans::kept;
use super::settings::{TableSettings, CLOCKS, VERSION};
use super::statements;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};

/// A stored row: its user-visible columns, version and clocks.
pub struct StoredRow {
    pub values: Map<String, Value>,
    pub version: i64,
    pub clocks: Map<String, Value>,
    /// `jsonb_hash_extended(to_jsonb(value), 0)` of each column, when the row was read for a
    /// merge (to check which clocks still describe their values).
    pub hashes: Map<String, Value>,
}

impl StoredRow {
    fn from_json(row: Value) -> StoredRow {
        let Value::Object(mut values) = row else {
            crate::error::internal("a row read back as non-object jsonb");
        };
        let version = values.remove(VERSION).and_then(|v| v.as_i64()).unwrap_or(0);
        let clocks = match values.remove(CLOCKS) {
            Some(Value::Object(clocks)) => clocks,
            _ => Map::new(),
        };
        StoredRow {
            values,
            version,
            clocks,
            hashes: Map::new(),
        }
    }
}

/// What [`fetch_typed`] read.
pub struct Fetched {
    pub row: Option<StoredRow>,
    pub mine: Map<String, Value>,
}

/// The values typed by the table's columns and printed back as the table
/// prints them, so they compare equal to stored values. Raises Postgres's own
/// error (SQLSTATE class 22) for a value of the wrong type.
pub fn canonical(
    client: &SpiClient<'_>,
    table: &TableSettings,
    values: &Map<String, Value>,
) -> Map<String, Value> {
    if values.is_empty() {
        return Map::new();
    }
    let sql = statements::typed(table);
    let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
    let typed = client
        .select(
            &*plan,
            Some(1),
            &[JsonB(Value::Object(values.clone())).into()],
        )
        .and_then(|rows| rows.first().get_one::<Json>())
        .unwrap_or_else(|e| crate::error::internal(format!("typing values failed: {e}")));
    pick(typed.map(|Json(t)| t).unwrap_or(Value::Null), values)
}

/// The row with this key, locked against concurrent writers until commit, and
/// the client's values typed as the table types them (see [`canonical`]);
/// the typed values come back even when no row does.
pub fn fetch_typed(
    client: &SpiClient<'_>,
    table: &TableSettings,
    key: &Map<String, Value>,
    mine: &Map<String, Value>,
) -> Fetched {
    let sql = statements::fetch_locked(table);
    let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
    let mut sent = key.clone();
    sent.extend(mine.iter().map(|(k, v)| (k.clone(), v.clone())));
    let found = client
        .select(&*plan, None, &[JsonB(Value::Object(sent.clone())).into()])
        .and_then(|rows| {
            if rows.is_empty() {
                return Ok(None);
            }
            let row = rows.first();
            Ok(Some((
                row.get::<Json>(1)?,
                row.get::<Json>(2)?,
                row.get::<Json>(3)?,
            )))
        })
        .unwrap_or_else(|e| {
            crate::error::internal(format!("reading a row of {} failed: {e}", table.display))
        });
    match found {
        Some((Some(Json(row)), Some(Json(typed)), hashes)) => {
            let mut row = StoredRow::from_json(row);
            if let Some(Json(Value::Object(hashes))) = hashes {
                row.hashes = hashes;
            }
            Fetched {
                row: Some(row),
                mine: pick(typed, mine),
            }
        }
        _ => Fetched {
            row: None,
            mine: canonical(client, table, mine),
        },
    }
}

/// The row with this key, locked against concurrent writers until commit.
pub fn fetch_for_update(
    client: &SpiClient<'_>,
    table: &TableSettings,
    key: &Map<String, Value>,
) -> Option<StoredRow> {
    fetch_typed(client, table, key, &Map::new()).row
}

/// Writes `values` and their clock entries into the row `key` names; with
/// `expected_version`, only if the row still has that version (`None` if not).
pub fn update(
    client: &mut SpiClient<'_>,
    table: &TableSettings,
    key: &Map<String, Value>,
    values: &Map<String, Value>,
    clock_entries: &Map<String, Value>,
    expected_version: Option<i64>,
) -> Option<StoredRow> {
    let mut row = key.clone();
    row.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
    let sql = statements::update(
        table,
        values.keys(),
        clock_entries.keys(),
        expected_version.is_some(),
    );
    let mut args = vec![
        JsonB(Value::Object(row)).into(),
        JsonB(Value::Object(clock_entries.clone())).into(),
    ];
    let mut types = vec![PgOid::from(pg_sys::JSONBOID); 2];
    if let Some(version) = expected_version {
        args.push(version.into());
        types.push(PgOid::from(pg_sys::INT8OID));
    }
    run_returning_row(client, table, &sql, &types, &args)
}

/// The fast path's statement: writes `columns` from the caller's own `key` and
/// `new_values` datums, with one clock for all of them, only if the row still has
/// `expected_version` (when given), and returns the whole `applied` result as
/// jsonb built by the statement itself (copied out of SPI's memory), or `None`.
pub fn update_applied(
    client: &mut SpiClient<'_>,
    table: &TableSettings,
    (key, new_values): (pg_sys::Datum, pg_sys::Datum),
    columns: &[&String],
    clock: &super::hlc::Hlc,
    expected_version: Option<i64>,
) -> Option<pg_sys::Datum> {
    let sql = statements::update_applied(table, columns, expected_version.is_some());
    let mut types = vec![
        PgOid::from(pg_sys::JSONBOID),
        PgOid::from(pg_sys::JSONBOID),
        PgOid::from(pg_sys::INT8OID),
        PgOid::from(pg_sys::INT8OID),
        PgOid::from(pg_sys::TEXTOID),
    ];
    // SAFETY: `key` and `new_values` are the call's jsonb arguments, alive for
    // the statement.
    let mut args = unsafe {
        vec![
            pgrx::datum::DatumWithOid::new(key, pg_sys::JSONBOID),
            pgrx::datum::DatumWithOid::new(new_values, pg_sys::JSONBOID),
            (clock.wall_ms as i64).into(),
            (clock.counter as i64).into(),
            clock.node.as_str().into(),
        ]
    };
    if let Some(version) = expected_version {
        types.push(PgOid::from(pg_sys::INT8OID));
        args.push(version.into());
    }
    let plan = kept(client, &sql, &types);
    // No row limit: see run_returning_row.
    client
        .select(&*plan, None, &args)
        .and_then(|rows| {
            if rows.is_empty() {
                Ok(None)
            } else {
                rows.first().get_datum_by_ordinal(1)
            }
        })
        .unwrap_or_else(|e| {
            crate::error::internal(format!("statement on {} failed: {e}", table.display))
        })
        // SAFETY: the datum is the statement's jsonb result (a varlena: not by
        // value, length -1), copied out of SPI's memory before it is freed.
        .map(|datum| unsafe { pg_sys::SPI_datumTransfer(datum, false, -1) })
}

/// Inserts a row; `None` when a concurrent transaction inserted the key first.
pub fn insert(
    client: &mut SpiClient<'_>,
    table: &TableSettings,
    row: &Map<String, Value>,
    clock_entries: &Map<String, Value>,
) -> Option<StoredRow> {
    let sql = statements::insert(table, row.keys(), clock_entries.keys());
    let args = [
        JsonB(Value::Object(row.clone())).into(),
        JsonB(Value::Object(clock_entries.clone())).into(),
    ];
    run_returning_row(
        client,
        table,
        &sql,
        &[PgOid::from(pg_sys::JSONBOID); 2],
        &args,
    )
}

pub fn delete(
    client: &mut SpiClient<'_>,
    table: &TableSettings,
    key: &Map<String, Value>,
) -> Option<StoredRow> {
    let sql = statements::delete(table);
    let args = [JsonB(Value::Object(key.clone())).into()];
    run_returning_row(client, table, &sql, &[PgOid::from(pg_sys::JSONBOID)], &args)
}

fn run_returning_row(
    client: &SpiClient<'_>,
    table: &TableSettings,
    sql: &str,
    types: &[PgOid],
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Option<StoredRow> {
    let plan = kept(client, sql, types);
    // No row limit: a limit stops a data-modifying statement's executor early,
    // and its AFTER STATEMENT triggers (capture) would never fire.
    let row = client
        .select(&*plan, None, args)
        .and_then(|rows| {
            if rows.is_empty() {
                Ok(None)
            } else {
                rows.first().get_one::<Json>()
            }
        })
        .unwrap_or_else(|e| {
            crate::error::internal(format!("statement on {} failed: {e}", table.display))
        });
    row.map(|Json(row)| StoredRow::from_json(row))
}

/// Whether a row with this key exists, read as the caller: only meaningful
/// where row-level security does not apply to it (`rls_applies`). Never read
/// with more rights than the caller's: that would evaluate the table's types
/// (a domain's CHECK, say) with them, and tell the caller about rows it may
/// not see.
pub fn exists(client: &SpiClient<'_>, table: &TableSettings, key: &Map<String, Value>) -> bool {
    let sql = statements::exists(table);
    let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
    client
        .select(&*plan, Some(1), &[JsonB(Value::Object(key.clone())).into()])
        .and_then(|rows| rows.first().get_one::<bool>())
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Whether row-level security applies to the current role on this table.
pub fn rls_applies(table: &TableSettings) -> bool {
    // SAFETY: a catalog check by relation oid (InvalidOid: the current user), with
    // noError set.
    unsafe {
        pg_sys::check_enable_rls(table.relid, pg_sys::InvalidOid, true)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
    }
}

/// Whether two values of a key column are equal in the column's own type
/// (`"3"`, `3` and `3.0` for an integer; any spelling of one uuid).
pub fn same_typed(
    client: &SpiClient<'_>,
    table: &TableSettings,
    column: &str,
    a: &Value,
    b: &Value,
) -> bool {
    let sql = statements::same_typed(table, column);
    let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID); 2]);
    let record = |v: &Value| {
        let mut record = Map::new();
        record.insert(column.to_string(), v.clone());
        JsonB(Value::Object(record))
    };
    client
        .select(&*plan, Some(1), &[record(a).into(), record(b).into()])
        .and_then(|rows| rows.first().get_one::<bool>())
        .unwrap_or_else(|e| {
            crate::error::internal(format!("comparing key column {column} failed: {e}"))
        })
        .unwrap_or(false)
}

/// One column's values combined by an SQL expression over `a`, `b`, `c` (the
/// column read from three records), in the column's own type.
fn combine(
    client: &SpiClient<'_>,
    table: &TableSettings,
    column: &str,
    expression: &str,
    values: [&Value; 3],
) -> Value {
    let sql = statements::combine(table, column, expression);
    let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID); 3]);
    let args: Vec<_> = values
        .iter()
        .map(|v| {
            let mut record = Map::new();
            record.insert(column.to_string(), (*v).clone());
            JsonB(Value::Object(record)).into()
        })
        .collect();
    client
        .select(&*plan, Some(1), &args)
        .and_then(|rows| rows.first().get_one::<Json>())
        .unwrap_or_else(|e| crate::error::internal(format!("merging column {column} failed: {e}")))
        .map(|Json(v)| v)
        .unwrap_or(Value::Null)
}

/// The columns named in `sent`, taken from a typed whole record.
fn pick(typed: Value, sent: &Map<String, Value>) -> Map<String, Value> {
    let mut typed = match typed {
        Value::Object(typed) => typed,
        _ => Map::new(),
    };
    sent.keys()
        .map(|k| (k.clone(), typed.remove(k).unwrap_or(Value::Null)))
        .collect()
}

/// Typed merges through SQL, in the column's own type.
pub struct SqlTypedOps<'a, 'c> {
    pub table: &'a TableSettings,
    pub client: &'a SpiClient<'c>,
}

impl TypedOps for SqlTypedOps<'_, '_> {
    fn sum(&mut self, column: &str, theirs: &Value, mine: &Value, base: &Value) -> Value {
        // A NULL counter counts as zero.
        combine(
            self.client,
            self.table,
            column,
            "coalesce(v.a, 0) + (coalesce(v.b, 0) - coalesce(v.c, 0))",
            [theirs, mine, base],
        )
    }

    fn greatest(&mut self, column: &str, a: &Value, b: &Value) -> Value {
        combine(
            self.client,
            self.table,
            column,
            "greatest(v.a, v.b)",
            [a, b, &Value::Null],
        )
    }

    fn least(&mut self, column: &str, a: &Value, b: &Value) -> Value {
        combine(
            self.client,
            self.table,
            column,
            "least(v.a, v.b)",
            [a, b, &Value::Null],
        )
    }
}
