//! A tracked table as `livesync.write` sees it (key, columns, policies, rules)
//! and the statements that read and change its rows.
//!
//! Values travel as jsonb and are typed by `jsonb_populate_record(NULL::table, ..)`,
//! so every conversion is Postgres's own and a wrong type fails before anything
//! is written. Statements on the table run as the calling role: its privileges and
//! row-level security apply, and capture records the change like any other.

use super::json::Json;
use super::merge::TypedOps;
use super::policy::{DeleteRace, ExistingInsert, Policy};
use super::statements::kept;
use super::WriteError;
use crate::owner::sql_as_bootstrap_superuser;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

pub const VERSION_COLUMN: &str = "_livesync_version";
pub const CLOCKS_COLUMN: &str = "_livesync_clocks";

const LOAD_TARGET: &str = "
SELECT pg_catalog.jsonb_build_object(
    'name', pg_catalog.format('%I.%I', n.nspname, c.relname),
    'existing_insert', t.existing_insert,
    'delete_race', t.delete_race,
    'key', ARRAY(SELECT a.attname::text
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = t.relation AND i.indisprimary
                 ORDER BY k.ord),
    'columns', (SELECT pg_catalog.jsonb_object_agg(a.attname, coalesce(p.policy, t.default_policy))
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
    /// `jsonb_hash_extended(to_jsonb(value), 0)` of each column, when the row was read for a
    /// merge (to check which clocks still describe their values).
    pub hashes: Map<String, Value>,
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
            hashes: Map::new(),
        }
    }
}

thread_local! {
    /// Write settings per table, read once per backend: the catalog query costs
    /// more than the write itself. Entries are dropped by relcache invalidation,
    /// which DDL on the table and every settings change (`_forget_write_settings`)
    /// send to all backends.
    static TARGETS: RefCell<HashMap<pg_sys::Oid, Rc<WriteTarget>>> = RefCell::new(HashMap::new());
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    // SAFETY: `forget` is a guarded callback of the type the relcache calls, and
    // `_PG_init` registers it once per process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0usize)) };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
#[pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    TARGETS.with(|targets| crate::catalog::forget_relation(targets, relid));
}

/// Tells every backend that a table's write settings changed (at commit).
#[pg_extern(name = "_forget_write_settings", volatile, parallel_unsafe)]
pub fn forget_write_settings(rel: pg_sys::Oid) {
    // SAFETY: queues an invalidation in the calling transaction; a missing relation
    // raises an ERROR.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
}

impl WriteTarget {
    /// The table's write settings, from this backend's cache when it has them.
    pub fn cached(
        client: &SpiClient<'_>,
        relid: pg_sys::Oid,
    ) -> Result<Rc<WriteTarget>, WriteError> {
        if let Some(target) = TARGETS.with(|targets| targets.borrow().get(&relid).cloned()) {
            return Ok(target);
        }
        let target = Rc::new(Self::load(client, relid)?);
        TARGETS.with(|targets| targets.borrow_mut().insert(relid, target.clone()));
        Ok(target)
    }

    pub fn load(client: &SpiClient<'_>, relid: pg_sys::Oid) -> Result<WriteTarget, WriteError> {
        // livesync's own catalog: read as the bootstrap superuser, so application roles
        // need no privileges on it.
        let plan = kept(client, LOAD_TARGET, &[PgOid::from(pg_sys::REGCLASSOID)]);
        let meta = sql_as_bootstrap_superuser(|| {
            client
                .select(&*plan, Some(1), &[relid.into()])
                .and_then(|table| match table.is_empty() {
                    true => Ok(None),
                    false => table.first().get_one::<Json>(),
                })
        })
        .unwrap_or_else(|e| pgrx::error!("livesync: reading write settings failed: {e}"));
        let Some(Json(meta)) = meta else {
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
            // The oid in a comment makes every statement's text (the key of the kept
            // plans) differ from a dropped and re-created table's of the same name,
            // whose kept plans would still carry the old row type.
            name: format!("{} /* livesync {} */", text("name"), relid.to_u32()),
            // Printed as the caller's search_path shows it (LOAD_TARGET runs with
            // livesync's pinned one, which would qualify every name).
            display: relation_display(relid),
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

    /// `livesync_t.k1 = livesync_r.k1 AND ...` (aliases no user column shadows)
    fn key_match(&self) -> String {
        self.key
            .iter()
            .map(|k| {
                let k = spi::quote_identifier(k);
                format!("livesync_t.{k} = livesync_r.{k}")
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn record(&self, param: u32) -> String {
        format!(
            "pg_catalog.jsonb_populate_record(NULL::{}, ${param})",
            self.name
        )
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
        let sql = format!(
            "SELECT pg_catalog.to_jsonb(livesync_r) FROM {} livesync_r",
            self.record(1)
        );
        let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
        let typed = client
            .select(
                &*plan,
                Some(1),
                &[JsonB(Value::Object(values.clone())).into()],
            )
            .and_then(|table| table.first().get_one::<Json>())
            .unwrap_or_else(|e| pgrx::error!("livesync: typing values failed: {e}"));
        pick(typed.map(|Json(t)| t).unwrap_or(Value::Null), values)
    }

    /// The row with this key, locked against concurrent writers until commit, and
    /// the client's values typed as the table types them (see [`Self::canonical`]);
    /// the typed values come back even when no row does.
    pub fn fetch_typed(
        &self,
        client: &SpiClient<'_>,
        key: &Map<String, Value>,
        mine: &Map<String, Value>,
    ) -> Fetched {
        let sql = format!(
            "SELECT pg_catalog.to_jsonb(livesync_t), pg_catalog.to_jsonb(livesync_r),
                    (SELECT pg_catalog.jsonb_object_agg(e.key, pg_catalog.jsonb_hash_extended(e.value, 0)) FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb(livesync_t)) e)
             FROM {} livesync_t, {} livesync_r WHERE {} FOR UPDATE OF livesync_t",
            self.name,
            self.record(1),
            self.key_match()
        );
        let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
        let mut sent = key.clone();
        sent.extend(mine.iter().map(|(k, v)| (k.clone(), v.clone())));
        let found = client
            .select(&*plan, None, &[JsonB(Value::Object(sent.clone())).into()])
            .and_then(|table| {
                if table.is_empty() {
                    return Ok(None);
                }
                let row = table.first();
                Ok(Some((
                    row.get::<Json>(1)?,
                    row.get::<Json>(2)?,
                    row.get::<Json>(3)?,
                )))
            })
            .unwrap_or_else(|e| {
                pgrx::error!("livesync: reading a row of {} failed: {e}", self.display)
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
                mine: self.canonical(client, mine),
            },
        }
    }

    /// The row with this key, locked against concurrent writers until commit.
    pub fn fetch_for_update(
        &self,
        client: &SpiClient<'_>,
        key: &Map<String, Value>,
    ) -> Option<StoredRow> {
        self.fetch_typed(client, key, &Map::new()).row
    }

    /// `_livesync_clocks` after writing `columns`: each column's entry is `clock` (an
    /// SQL expression for `[wall, counter, node]`, given the column as a literal)
    /// followed by the hash of the value this statement writes.
    fn clocks_expression<'c>(
        &self,
        columns: impl Iterator<Item = &'c String>,
        clock: impl Fn(&str) -> String,
        existing: bool,
    ) -> String {
        let items: Vec<String> = columns
            .map(|c| {
                let literal = spi::quote_literal(c);
                let column = spi::quote_identifier(c);
                format!(
                    "{literal}, {} || pg_catalog.jsonb_build_array(pg_catalog.jsonb_hash_extended(pg_catalog.to_jsonb(livesync_r.{column}), 0))",
                    clock(&literal)
                )
            })
            .collect();
        // A function takes at most 100 arguments: one jsonb_build_object per 50
        // columns, concatenated (wide tables have hundreds).
        let new = items
            .chunks(50)
            .map(|chunk| format!("pg_catalog.jsonb_build_object({})", chunk.join(", ")))
            .collect::<Vec<_>>()
            .join(" || ");
        let new = if new.is_empty() {
            "'{}'::jsonb".to_string()
        } else {
            new
        };
        if existing {
            format!("coalesce(livesync_t.{CLOCKS_COLUMN}, '{{}}'::jsonb) || {new}")
        } else {
            new
        }
    }

    /// `c1 = livesync_r.c1, c2 = livesync_r.c2, ...`
    fn assignments<'c>(columns: impl Iterator<Item = &'c String>) -> String {
        columns
            .map(|c| {
                let c = spi::quote_identifier(c);
                format!("{c} = livesync_r.{c}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Writes `values` and their clock entries into the row `key` names; with
    /// `expected_version`, only if the row still has that version (`None` if not).
    pub fn update(
        &self,
        client: &mut SpiClient<'_>,
        key: &Map<String, Value>,
        values: &Map<String, Value>,
        clock_entries: &Map<String, Value>,
        expected_version: Option<i64>,
    ) -> Option<StoredRow> {
        let mut row = key.clone();
        row.extend(values.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Each column's clock comes from the `{column: [wall, counter, node]}` argument.
        let clocks = self.clocks_expression(clock_entries.keys(), |c| format!("($2 -> {c})"), true);
        let version_check = match expected_version {
            Some(_) => format!(" AND livesync_t.{VERSION_COLUMN} = $3"),
            None => String::new(),
        };
        let sql = format!(
            "UPDATE {} livesync_t SET {}, {CLOCKS_COLUMN} = {clocks} FROM {} livesync_r WHERE {}{version_check} RETURNING pg_catalog.to_jsonb(livesync_t) - '{CLOCKS_COLUMN}'",
            self.name,
            Self::assignments(values.keys()),
            self.record(1),
            self.key_match()
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
        self.run_returning_row(client, &sql, &types, &args)
    }

    /// The fast path's statement: writes `columns` from the caller's own `key` and
    /// `new_values` datums, with one clock for all of them, only if the row still has
    /// `expected_version` (when given), and returns the whole `applied` result as
    /// jsonb built by the statement itself (copied out of SPI's memory), or `None`.
    pub fn update_applied(
        &self,
        client: &mut SpiClient<'_>,
        (key, new_values): (pg_sys::Datum, pg_sys::Datum),
        columns: &[&String],
        clock: &super::hlc::Hlc,
        expected_version: Option<i64>,
    ) -> Option<pg_sys::Datum> {
        // One clock for every column: wall, counter and node are $3, $4, $5.
        let clocks = self.clocks_expression(
            columns.iter().copied(),
            |_| "pg_catalog.jsonb_build_array($3, $4, $5)".to_string(),
            true,
        );
        let version_check = match expected_version {
            Some(_) => format!(" AND livesync_t.{VERSION_COLUMN} = $6"),
            None => String::new(),
        };
        let sql = format!(
            "UPDATE {name} livesync_t SET {assignments}, {CLOCKS_COLUMN} = {clocks} \
             FROM pg_catalog.jsonb_populate_record(NULL::{name}, $1 || $2) livesync_r \
             WHERE {key_match}{version_check} \
             RETURNING pg_catalog.jsonb_build_object('status', 'applied', 'version', livesync_t.{VERSION_COLUMN}, \
                 'row', pg_catalog.to_jsonb(livesync_t) - '{VERSION_COLUMN}' - '{CLOCKS_COLUMN}')",
            name = self.name,
            assignments = Self::assignments(columns.iter().copied()),
            key_match = self.key_match(),
        );
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
            .and_then(|table| {
                if table.is_empty() {
                    Ok(None)
                } else {
                    table.first().get_datum_by_ordinal(1)
                }
            })
            .unwrap_or_else(|e| pgrx::error!("livesync: statement on {} failed: {e}", self.display))
            // SAFETY: the datum is the statement's jsonb result (a varlena: not by
            // value, length -1), copied out of SPI's memory before it is freed.
            .map(|datum| unsafe { pg_sys::SPI_datumTransfer(datum, false, -1) })
    }

    /// Inserts a row; `None` when a concurrent transaction inserted the key first.
    pub fn insert(
        &self,
        client: &mut SpiClient<'_>,
        row: &Map<String, Value>,
        clock_entries: &Map<String, Value>,
    ) -> Option<StoredRow> {
        let columns: Vec<String> = row.keys().map(spi::quote_identifier).collect();
        let key: Vec<String> = self.key.iter().map(spi::quote_identifier).collect();
        let sql = format!(
            "INSERT INTO {} AS livesync_t ({}, {CLOCKS_COLUMN}) SELECT {}, {} FROM {} livesync_r
             ON CONFLICT ({}) DO NOTHING RETURNING pg_catalog.to_jsonb(livesync_t) - '{CLOCKS_COLUMN}'",
            self.name,
            columns.join(", "),
            columns
                .iter()
                .map(|c| format!("livesync_r.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.clocks_expression(clock_entries.keys(), |c| format!("($2 -> {c})"), false),
            self.record(1),
            key.join(", ")
        );
        let args = [
            JsonB(Value::Object(row.clone())).into(),
            JsonB(Value::Object(clock_entries.clone())).into(),
        ];
        self.run_returning_row(client, &sql, &[PgOid::from(pg_sys::JSONBOID); 2], &args)
    }

    pub fn delete(
        &self,
        client: &mut SpiClient<'_>,
        key: &Map<String, Value>,
    ) -> Option<StoredRow> {
        let sql = format!(
            "DELETE FROM {} livesync_t USING {} livesync_r WHERE {} RETURNING pg_catalog.to_jsonb(livesync_t) - '{CLOCKS_COLUMN}'",
            self.name,
            self.record(1),
            self.key_match()
        );
        let args = [JsonB(Value::Object(key.clone())).into()];
        self.run_returning_row(client, &sql, &[PgOid::from(pg_sys::JSONBOID)], &args)
    }

    fn run_returning_row(
        &self,
        client: &SpiClient<'_>,
        sql: &str,
        types: &[PgOid],
        args: &[pgrx::datum::DatumWithOid<'_>],
    ) -> Option<StoredRow> {
        let plan = kept(client, sql, types);
        // No row limit: a limit stops a data-modifying statement's executor early,
        // and its AFTER STATEMENT triggers (capture) would never fire.
        let row = client
            .select(&*plan, None, args)
            .and_then(|table| {
                if table.is_empty() {
                    Ok(None)
                } else {
                    table.first().get_one::<Json>()
                }
            })
            .unwrap_or_else(|e| {
                pgrx::error!("livesync: statement on {} failed: {e}", self.display)
            });
        row.map(|Json(row)| StoredRow::from_json(row))
    }

    /// Whether a row with this key exists, read as the caller: only meaningful
    /// where row-level security does not apply to it (`rls_applies`). Never read
    /// with more rights than the caller's: that would evaluate the table's types
    /// (a domain's CHECK, say) with them, and tell the caller about rows it may
    /// not see.
    pub fn exists(&self, client: &SpiClient<'_>, key: &Map<String, Value>) -> bool {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} livesync_t, {} livesync_r WHERE {})",
            self.name,
            self.record(1),
            self.key_match()
        );
        let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID)]);
        client
            .select(&*plan, Some(1), &[JsonB(Value::Object(key.clone())).into()])
            .and_then(|table| table.first().get_one::<bool>())
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// Whether row-level security applies to the current role on this table.
    pub fn rls_applies(&self) -> bool {
        // SAFETY: a catalog check by relation oid (InvalidOid: the current user),
        // with noError set.
        unsafe {
            pg_sys::check_enable_rls(self.relid, pg_sys::InvalidOid, true)
                == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32
        }
    }

    /// Whether two values of a key column are equal in the column's own type
    /// (`"3"`, `3` and `3.0` for an integer; any spelling of one uuid).
    pub fn same_typed(&self, client: &SpiClient<'_>, column: &str, a: &Value, b: &Value) -> bool {
        let c = spi::quote_identifier(column);
        let sql = format!(
            "SELECT livesync_a.{c} IS NOT DISTINCT FROM livesync_b.{c} FROM {} livesync_a, {} livesync_b",
            self.record(1),
            self.record(2)
        );
        let plan = kept(client, &sql, &[PgOid::from(pg_sys::JSONBOID); 2]);
        let record = |v: &Value| {
            let mut record = Map::new();
            record.insert(column.to_string(), v.clone());
            JsonB(Value::Object(record))
        };
        client
            .select(&*plan, Some(1), &[record(a).into(), record(b).into()])
            .and_then(|table| table.first().get_one::<bool>())
            .unwrap_or_else(|e| pgrx::error!("livesync: comparing key column {column} failed: {e}"))
            .unwrap_or(false)
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
            "SELECT pg_catalog.to_jsonb({}) FROM (SELECT livesync_a.{c} AS a, livesync_b.{c} AS b, livesync_c.{c} AS c \
             FROM {} livesync_a, {} livesync_b, {} livesync_c) v",
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
            .and_then(|table| table.first().get_one::<Json>())
            .unwrap_or_else(|e| pgrx::error!("livesync: merging column {column} failed: {e}"))
            .map(|Json(v)| v)
            .unwrap_or(Value::Null)
    }
}

/// What [`WriteTarget::fetch_typed`] read.
pub struct Fetched {
    pub row: Option<StoredRow>,
    pub mine: Map<String, Value>,
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
