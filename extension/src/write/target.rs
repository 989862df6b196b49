//! A tracked table as `livesync.write` sees it (key, columns, policies, rules)
//! and the statements that read and change its rows.
//!
//! Values travel as jsonb and are typed by `jsonb_populate_record(NULL::table, ..)`,
//! so every conversion is Postgres's own and a wrong type fails before anything
//! is written. Statements on the table run as the calling role: its privileges and
//! row-level security apply, and capture records the change like any other.

use super::merge::TypedOps;
use super::policy::{DeleteRace, ExistingInsert, Policy};
use super::statements::kept;
use super::WriteError;
use crate::internal_spi::as_extension_owner;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const VERSION_COLUMN: &str = "_livesync_version";
pub const CLOCKS_COLUMN: &str = "_livesync_clocks";

const LOAD_TARGET: &str = "
SELECT jsonb_build_object(
    'name', format('%I.%I', n.nspname, c.relname),
    'display', t.relation::text,
    'existing_insert', t.existing_insert,
    'delete_race', t.delete_race,
    'key', ARRAY(SELECT a.attname::text
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = t.relation AND i.indisprimary
                 ORDER BY k.ord),
    'columns', (SELECT jsonb_object_agg(a.attname, coalesce(p.policy, t.default_policy))
                FROM pg_attribute a
                LEFT JOIN livesync._policies p ON p.relation = t.relation AND p.attnum = a.attnum
                WHERE a.attrelid = t.relation AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attname NOT IN ('_livesync_version', '_livesync_clocks')))
FROM livesync._tracked t
JOIN pg_class c ON c.oid = t.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.relation = $1";

pub struct WriteTarget {
    pub relid: pg_sys::Oid,
    /// Schema-qualified, quoted: for statement text.
    name: String,
    /// As `regclass` prints it: for messages.
    pub display: String,
    pub key: Vec<String>,
    /// Every writable column and its policy (key columns included, never merged).
    pub columns: BTreeMap<String, Policy>,
    pub existing_insert: ExistingInsert,
    pub delete_race: DeleteRace,
}

/// A stored row: its user-visible columns, version and clocks.
pub struct StoredRow {
    pub values: Map<String, Value>,
    pub version: i64,
    pub clocks: Map<String, Value>,
}

impl StoredRow {
    fn from_json(row: Value) -> StoredRow {
        let Value::Object(mut values) = row else {
            pgrx::error!("livesync: a row read back as non-object jsonb");
        };
        let version = values
            .remove(VERSION_COLUMN)
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let clocks = match values.remove(CLOCKS_COLUMN) {
            Some(Value::Object(clocks)) => clocks,
            _ => Map::new(),
        };
        StoredRow {
            values,
            version,
            clocks,
        }
    }
}

impl WriteTarget {
    pub fn load(client: &SpiClient<'_>, relid: pg_sys::Oid) -> Result<WriteTarget, WriteError> {
        // livesync's own catalog: read as the extension owner, so application roles
        // need no privileges on it.
        let plan = kept(client, LOAD_TARGET, &[PgOid::from(pg_sys::REGCLASSOID)]);
        let meta = as_extension_owner(|| {
            client
                .select(&*plan, Some(1), &[relid.into()])
                .and_then(|table| match table.is_empty() {
                    true => Ok(None),
                    false => table.first().get_one::<JsonB>(),
                })
        })
        .unwrap_or_else(|e| pgrx::error!("livesync: reading write settings failed: {e}"));
        let Some(JsonB(meta)) = meta else {
            return Err(WriteError::NotTracked(relation_display(relid)));
        };
        let text = |field: &str| meta[field].as_str().unwrap_or_default().to_string();
        let key: Vec<String> = meta["key"]
            .as_array()
            .map(|k| {
                k.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let columns = meta["columns"]
            .as_object()
            .map(|columns| {
                columns
                    .iter()
                    .map(|(name, policy)| {
                        (
                            name.clone(),
                            Policy::from_name(policy.as_str().unwrap_or("")),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(WriteTarget {
            relid,
            name: text("name"),
            display: text("display"),
            key,
            columns,
            existing_insert: match meta["existing_insert"].as_str() {
                Some("reject") => ExistingInsert::Reject,
                _ => ExistingInsert::Merge,
            },
            delete_race: match meta["delete_race"].as_str() {
                Some("update_wins") => DeleteRace::UpdateWins,
                _ => DeleteRace::DeleteWins,
            },
        })
    }

    pub fn is_key(&self, column: &str) -> bool {
        self.key.iter().any(|k| k == column)
    }

    /// `t.k1 = r.k1 AND t.k2 = r.k2`
    fn key_match(&self) -> String {
        self.key
            .iter()
            .map(|k| {
                let k = spi::quote_identifier(k);
                format!("t.{k} = r.{k}")
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn record(&self, param: u32) -> String {
        format!("jsonb_populate_record(NULL::{}, ${param})", self.name)
    }

    /// The values typed by the table's columns and printed back as the table
    /// prints them, so they compare equal to stored values. Raises Postgres's own
    /// error (SQLSTATE class 22) for a value of the wrong type.
    pub fn canonical(
        &self,
        client: &SpiClient<'_>,
        values: &Map<String, Value>,
    ) -> Map<String, Value> {
        if values.is_empty() {
            return Map::new();
        }
        let sql = format!("SELECT to_jsonb(r) FROM {} r", self.record(1));
        let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
        let typed = client
            .select(
                &*plan,
                Some(1),
                &[JsonB(Value::Object(values.clone())).into()],
            )
            .and_then(|table| table.first().get_one::<JsonB>())
            .unwrap_or_else(|e| pgrx::error!("livesync: typing values failed: {e}"));
        let mut typed = match typed {
            Some(JsonB(Value::Object(typed))) => typed,
            _ => Map::new(),
        };
        values
            .keys()
            .map(|k| (k.clone(), typed.remove(k).unwrap_or(Value::Null)))
            .collect()
    }

    /// The row with this key, locked against concurrent writers until commit.
    pub fn fetch_for_update(
        &self,
        client: &SpiClient<'_>,
        key: &Map<String, Value>,
    ) -> Option<StoredRow> {
        let sql = format!(
            "SELECT to_jsonb(t) FROM {} t, {} r WHERE {} FOR UPDATE OF t",
            self.name,
            self.record(1),
            self.key_match()
        );
        self.run_returning_row(client, &sql, &[Value::Object(key.clone())])
    }

    /// Writes `values` (and the clocks) into the row `key` names.
    pub fn update(
        &self,
        client: &mut SpiClient<'_>,
        key: &Map<String, Value>,
        values: &Map<String, Value>,
        clocks: &Map<String, Value>,
    ) -> Option<StoredRow> {
        let mut row = key.clone();
        row.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
        let assignments: Vec<String> = values
            .keys()
            .map(|c| {
                let c = spi::quote_identifier(c);
                format!("{c} = r.{c}")
            })
            .chain(std::iter::once(format!("{CLOCKS_COLUMN} = $2")))
            .collect();
        let sql = format!(
            "UPDATE {} t SET {} FROM {} r WHERE {} RETURNING to_jsonb(t)",
            self.name,
            assignments.join(", "),
            self.record(1),
            self.key_match()
        );
        self.run_returning_row(
            client,
            &sql,
            &[Value::Object(row), Value::Object(clocks.clone())],
        )
    }

    /// Inserts a row; `None` when a concurrent transaction inserted the key first.
    pub fn insert(
        &self,
        client: &mut SpiClient<'_>,
        row: &Map<String, Value>,
        clocks: &Map<String, Value>,
    ) -> Option<StoredRow> {
        let columns: Vec<String> = row.keys().map(spi::quote_identifier).collect();
        let key: Vec<String> = self.key.iter().map(spi::quote_identifier).collect();
        let sql = format!(
            "INSERT INTO {} AS t ({}, {CLOCKS_COLUMN}) SELECT {}, $2 FROM {} r
             ON CONFLICT ({}) DO NOTHING RETURNING to_jsonb(t)",
            self.name,
            columns.join(", "),
            columns
                .iter()
                .map(|c| format!("r.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.record(1),
            key.join(", ")
        );
        self.run_returning_row(
            client,
            &sql,
            &[Value::Object(row.clone()), Value::Object(clocks.clone())],
        )
    }

    pub fn delete(
        &self,
        client: &mut SpiClient<'_>,
        key: &Map<String, Value>,
    ) -> Option<StoredRow> {
        let sql = format!(
            "DELETE FROM {} t USING {} r WHERE {} RETURNING to_jsonb(t)",
            self.name,
            self.record(1),
            self.key_match()
        );
        self.run_returning_row(client, &sql, &[Value::Object(key.clone())])
    }

    fn run_returning_row(
        &self,
        client: &SpiClient<'_>,
        sql: &str,
        args: &[Value],
    ) -> Option<StoredRow> {
        let types = vec![PgOid::from(pg_sys::JSONBOID); args.len()];
        let plan = kept(client, sql, &types);
        let args: Vec<_> = args.iter().map(|a| JsonB(a.clone()).into()).collect();
        // No row limit: a limit stops a data-modifying statement's executor early,
        // and its AFTER STATEMENT triggers (capture) would never fire.
        let row = client
            .select(&*plan, None, &args)
            .and_then(|table| {
                if table.is_empty() {
                    Ok(None)
                } else {
                    table.first().get_one::<JsonB>()
                }
            })
            .unwrap_or_else(|e| {
                pgrx::error!("livesync: statement on {} failed: {e}", self.display)
            });
        row.map(|JsonB(row)| StoredRow::from_json(row))
    }

    /// One column's values combined by an SQL expression over `a`, `b`, `c` (the
    /// column read from three records), in the column's own type.
    fn combine(
        &self,
        client: &SpiClient<'_>,
        column: &str,
        expression: &str,
        values: [&Value; 3],
    ) -> Value {
        let c = spi::quote_identifier(column);
        let sql = format!(
            "SELECT to_jsonb({}) FROM (SELECT a.{c} AS a, b.{c} AS b, c.{c} AS c FROM {} a, {} b, {} c) v",
            expression,
            self.record(1),
            self.record(2),
            self.record(3)
        );
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
            .and_then(|table| table.first().get_one::<JsonB>())
            .unwrap_or_else(|e| pgrx::error!("livesync: merging column {column} failed: {e}"))
            .map(|JsonB(v)| v)
            .unwrap_or(Value::Null)
    }
}

/// Typed merges through SQL, in the column's own type.
pub struct SqlTypedOps<'a, 'c> {
    pub target: &'a WriteTarget,
    pub client: &'a SpiClient<'c>,
}

impl TypedOps for SqlTypedOps<'_, '_> {
    fn sum(&mut self, column: &str, theirs: &Value, mine: &Value, base: &Value) -> Value {
        // A NULL counter counts as zero.
        self.target.combine(
            self.client,
            column,
            "coalesce(v.a, 0) + (coalesce(v.b, 0) - coalesce(v.c, 0))",
            [theirs, mine, base],
        )
    }

    fn greatest(&mut self, column: &str, a: &Value, b: &Value) -> Value {
        self.target.combine(
            self.client,
            column,
            "greatest(v.a, v.b)",
            [a, b, &Value::Null],
        )
    }

    fn least(&mut self, column: &str, a: &Value, b: &Value) -> Value {
        self.target
            .combine(self.client, column, "least(v.a, v.b)", [a, b, &Value::Null])
    }
}

pub fn relation_display(relid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| format!("relation {}", relid.to_u32()))
}
