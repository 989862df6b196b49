//! The text of the statements `livesync.write` runs on a tracked table, built from
//! its settings and the columns a write touches (`rows` runs them, through `plans`).
//!
//! Values travel as jsonb and are typed by `jsonb_populate_record(NULL::table, ..)`,
//! so every conversion is Postgres's own and a wrong type fails before anything
//! is written. The aliases `livesync_t` (the table), `livesync_r` (the values sent)
//! and `livesync_a`.. `livesync_c` are names no user column shadows.

use super::settings::{TableSettings, CLOCKS, VERSION};
use pgrx::spi;

/// `livesync_t.k1 = livesync_r.k1 AND ...`
fn key_match(table: &TableSettings) -> String {
    table
        .key
        .iter()
        .map(|k| {
            let k = spi::quote_identifier(k);
            format!("livesync_t.{k} = livesync_r.{k}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The record parameter `$param` typed as a row of the table.
fn record(table: &TableSettings, param: u32) -> String {
    format!(
        "pg_catalog.jsonb_populate_record(NULL::{}, ${param})",
        table.name
    )
}

/// `_livesync_clocks` after writing `columns`: each column's entry is `clock` (an
/// SQL expression for `[wall, counter, node]`, given the column as a literal)
/// followed by the hash of the value this statement writes.
fn clocks_expression<'c>(
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
        format!("coalesce(livesync_t.{CLOCKS}, '{{}}'::jsonb) || {new}")
    } else {
        new
    }
}

/// ` AND livesync_t._livesync_version = $param` for a write `versioned` by the
/// version the client read; nothing otherwise.
fn version_check(versioned: bool, param: u32) -> String {
    if versioned {
        format!(" AND livesync_t.{VERSION} = ${param}")
    } else {
        String::new()
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

/// $1 (jsonb) typed as a row of the table and printed back as jsonb.
pub fn typed(table: &TableSettings) -> String {
    format!(
        "SELECT pg_catalog.to_jsonb(livesync_r) FROM {} livesync_r",
        record(table, 1)
    )
}

/// The row whose key $1 holds, locked `FOR UPDATE`; $1 typed as a row; the hash
/// of each stored value.
pub fn fetch_locked(table: &TableSettings) -> String {
    format!(
        "SELECT pg_catalog.to_jsonb(livesync_t), pg_catalog.to_jsonb(livesync_r),
                    (SELECT pg_catalog.jsonb_object_agg(e.key, pg_catalog.jsonb_hash_extended(e.value, 0)) FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb(livesync_t)) e)
             FROM {} livesync_t, {} livesync_r WHERE {} FOR UPDATE OF livesync_t",
        table.name,
        record(table, 1),
        key_match(table)
    )
}

/// Writes `columns` from $1 (key and values) and the clock entries of
/// `clock_columns` from $2 (`{column: [wall, counter, node]}`); `versioned`: only
/// while the row's version is $3. Returns the row without its clocks.
pub fn update<'c>(
    table: &TableSettings,
    columns: impl Iterator<Item = &'c String>,
    clock_columns: impl Iterator<Item = &'c String>,
    versioned: bool,
) -> String {
    let clocks = clocks_expression(clock_columns, |c| format!("($2 -> {c})"), true);
    let version_check = version_check(versioned, 3);
    format!(
        "UPDATE {} livesync_t SET {}, {CLOCKS} = {clocks} FROM {} livesync_r WHERE {}{version_check} RETURNING pg_catalog.to_jsonb(livesync_t) - '{CLOCKS}'",
        table.name,
        assignments(columns),
        record(table, 1),
        key_match(table)
    )
}

/// The fast path's UPDATE: writes `columns` from $1 (key) and $2 (new values) with
/// one clock for all of them (wall, counter and node are $3, $4, $5); `versioned`:
/// only while the row's version is $6. Returns the whole `applied` result.
pub fn update_applied(table: &TableSettings, columns: &[&String], versioned: bool) -> String {
    let clocks = clocks_expression(
        columns.iter().copied(),
        |_| "pg_catalog.jsonb_build_array($3, $4, $5)".to_string(),
        true,
    );
    let version_check = version_check(versioned, 6);
    format!(
        "UPDATE {name} livesync_t SET {assignments}, {CLOCKS} = {clocks} \
         FROM pg_catalog.jsonb_populate_record(NULL::{name}, $1 || $2) livesync_r \
         WHERE {key_match}{version_check} \
         RETURNING pg_catalog.jsonb_build_object('status', 'applied', 'version', livesync_t.{VERSION}, \
             'row', pg_catalog.to_jsonb(livesync_t) - '{VERSION}' - '{CLOCKS}')",
        name = table.name,
        assignments = assignments(columns.iter().copied()),
        key_match = key_match(table),
    )
}

/// Inserts `columns` from $1 and the clock entries of `clock_columns` from $2,
/// unless the key exists. Returns the row without its clocks.
pub fn insert<'c>(
    table: &TableSettings,
    columns: impl Iterator<Item = &'c String>,
    clock_columns: impl Iterator<Item = &'c String>,
) -> String {
    let columns: Vec<String> = columns.map(spi::quote_identifier).collect();
    let key: Vec<String> = table.key.iter().map(spi::quote_identifier).collect();
    format!(
        "INSERT INTO {} AS livesync_t ({}, {CLOCKS}) SELECT {}, {} FROM {} livesync_r
             ON CONFLICT ({}) DO NOTHING RETURNING pg_catalog.to_jsonb(livesync_t) - '{CLOCKS}'",
        table.name,
        columns.join(", "),
        columns
            .iter()
            .map(|c| format!("livesync_r.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        clocks_expression(clock_columns, |c| format!("($2 -> {c})"), false),
        record(table, 1),
        key.join(", ")
    )
}

/// Deletes the row whose key $1 holds. Returns it without its clocks.
pub fn delete(table: &TableSettings) -> String {
    format!(
        "DELETE FROM {} livesync_t USING {} livesync_r WHERE {} RETURNING pg_catalog.to_jsonb(livesync_t) - '{CLOCKS}'",
        table.name,
        record(table, 1),
        key_match(table)
    )
}

/// Whether a row with the key $1 holds exists.
pub fn exists(table: &TableSettings) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM {} livesync_t, {} livesync_r WHERE {})",
        table.name,
        record(table, 1),
        key_match(table)
    )
}

/// Whether `column` of $1 and of $2 are equal in the column's type.
pub fn same_typed(table: &TableSettings, column: &str) -> String {
    let c = spi::quote_identifier(column);
    format!(
        "SELECT livesync_a.{c} IS NOT DISTINCT FROM livesync_b.{c} FROM {} livesync_a, {} livesync_b",
        record(table, 1),
        record(table, 2)
    )
}

/// `expression` over `v.a`, `v.b`, `v.c`: `column` of $1, $2 and $3, in the
/// column's type.
pub fn combine(table: &TableSettings, column: &str, expression: &str) -> String {
    let c = spi::quote_identifier(column);
    format!(
        "SELECT pg_catalog.to_jsonb({}) FROM (SELECT livesync_a.{c} AS a, livesync_b.{c} AS b, livesync_c.{c} AS c \
         FROM {} livesync_a, {} livesync_b, {} livesync_c) v",
        expression,
        record(table, 1),
        record(table, 2),
        record(table, 3)
    )
}
