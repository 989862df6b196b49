//! The change log as the bridge holds it: committed transactions ([`Txn`]) of changes
//! ([`Change`]), each change serialised once, when it is read, into the JSON object
//! clients receive. Everything downstream (the window, the hub, catch-up) shares
//! those bytes.

mod entry;
mod window;

pub use entry::{entry_object, ColumnSide, Entry, EntryError, RawObject};
pub use window::RecentWindow;

use std::sync::Arc;

/// A change's kind, as the log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    Schema,
}

impl Op {
    /// From the log's one-letter code (`livesync.changes.op`).
    pub fn from_code(code: i8) -> Option<Op> {
        match code as u8 {
            b'i' => Some(Op::Insert),
            b'u' => Some(Op::Update),
            b'd' => Some(Op::Delete),
            b't' => Some(Op::Truncate),
            b's' => Some(Op::Schema),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Schema => "schema",
        }
    }
}

/// A tracked table as the log names it when it is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub schema: String,
    pub table: String,
}

impl TableName {
    /// `schema.table`, each part quoted when it needs to be (as in a channel name).
    pub fn display(&self) -> String {
        format!(
            "{}.{}",
            quote_if_needed(&self.schema),
            quote_if_needed(&self.table)
        )
    }

    /// `"schema"."table"`, for SQL.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

/// A SQL identifier, always quoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_if_needed(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        name.to_string()
    } else {
        quote_ident(name)
    }
}

/// One committed change, ready to send.
#[derive(Debug)]
pub struct Change {
    pub position: i64,
    pub op: Op,
    /// The change as clients receive it (a JSON object).
    pub json: Box<str>,
    /// The stored `[key, old, new, version]` entry, kept for row filters.
    pub entry: Box<serde_json::value::RawValue>,
}

/// The changes of one table within a transaction, in position order.
#[derive(Debug)]
pub struct TableChanges {
    pub relation: u32,
    pub name: Option<Arc<TableName>>,
    pub changes: Vec<Change>,
}

/// One committed transaction (or its tail, when read from inside it).
#[derive(Debug)]
pub struct Txn {
    /// The position just before this transaction's first change here: a reader that
    /// has everything up to `after` gets this transaction next.
    pub after: i64,
    /// The transaction's last position: a reader's next `after`.
    pub last: i64,
    pub tx: i64,
    /// When it was sequenced, microseconds since the Unix epoch (for lag metrics).
    pub committed_at_micros: i64,
    pub tables: Vec<TableChanges>,
}

impl Txn {
    pub fn change_count(&self) -> usize {
        self.tables.iter().map(|t| t.changes.len()).sum()
    }

    /// Rough memory held, for bounding windows.
    pub fn approx_bytes(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.changes)
            .map(|c| c.json.len() + c.entry.get().len() + 64)
            .sum()
    }

    pub fn table(&self, relation: u32) -> Option<&TableChanges> {
        self.tables.iter().find(|t| t.relation == relation)
    }
}

/// What every change of one stored run shares.
pub struct RunHeader<'a> {
    pub op: Op,
    pub actor: &'a str,
    pub tx: i64,
    /// JSON string of the commit time (`"2026-12-04T10:00:00.123+00:00"`).
    pub committed_at_json: &'a str,
    pub client_id: Option<&'a str>,
    pub mutation_id: Option<i64>,
}

/// Serialises one change into the object clients receive:
/// `{"position","op","key","delta","version","actor","committed_at","tx"[,"client_id","mutation_id"]}`.
pub fn change_json(position: i64, header: &RunHeader<'_>, entry: &Entry<'_>, out: &mut String) {
    out.push_str("{\"position\":");
    push_int(out, position);
    out.push_str(",\"op\":\"");
    out.push_str(header.op.name());
    out.push_str("\",\"key\":");
    out.push_str(entry.key_json());
    out.push_str(",\"delta\":");
    entry.write_delta(header.op, out);
    out.push_str(",\"version\":");
    out.push_str(entry.version_json());
    push_tail(out, header);
}

/// A change turned into the delete of its row (no delta, `"left_filter": true`), for
/// a subscriber whose filter the row has just left.
pub fn left_filter_json(change_json: &str) -> String {
    let Ok(serde_json::Value::Object(mut change)) = serde_json::from_str(change_json) else {
        return change_json.to_string();
    };
    change.insert("op".into(), "delete".into());
    change.insert(
        "delta".into(),
        serde_json::Value::Object(Default::default()),
    );
    change.insert("left_filter".into(), true.into());
    serde_json::Value::Object(change).to_string()
}

fn push_tail(out: &mut String, header: &RunHeader<'_>) {
    out.push_str(",\"actor\":");
    push_json_str(out, header.actor);
    out.push_str(",\"committed_at\":");
    out.push_str(header.committed_at_json);
    out.push_str(",\"tx\":");
    push_int(out, header.tx);
    if let Some(client_id) = header.client_id {
        out.push_str(",\"client_id\":");
        push_json_str(out, client_id);
    }
    if let Some(mutation_id) = header.mutation_id {
        out.push_str(",\"mutation_id\":");
        push_int(out, mutation_id);
    }
    out.push('}');
}

pub(crate) fn push_int(out: &mut String, value: i64) {
    use std::fmt::Write;
    let _ = write!(out, "{value}");
}

pub(crate) fn push_json_str(out: &mut String, value: &str) {
    // serde_json escapes exactly as JSON requires; a String never fails to serialise.
    out.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "\"\"".into()));
}
