//! One client mutation, as `livesync.write` takes it or as an element of
//! `livesync.write_batch`'s array, checked for shape before anything is read.

/// The longest client_id accepted: it is stored with every mutation record and log
/// row of the client (and a 1 MB one did not fit an index entry).
pub const MAX_CLIENT_ID_BYTES: usize = 256;

use super::idempotency::MutationId;
use super::WriteError;
use pgrx::pg_sys;
use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Upsert,
    Delete,
}

impl Op {
    pub fn parse(op: &str) -> Result<Op, WriteError> {
        match op {
            "insert" => Ok(Op::Insert),
            "update" => Ok(Op::Update),
            "upsert" => Ok(Op::Upsert),
            "delete" => Ok(Op::Delete),
            other => Err(WriteError::UnknownOp(other.to_string())),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }

    /// The table privileges the operation needs: SELECT and UPDATE always (the row
    /// is read locked, FOR UPDATE, to merge against it), and INSERT or DELETE for
    /// what it may do besides.
    pub fn privileges(&self) -> pg_sys::AclMode {
        let always = (pg_sys::ACL_SELECT | pg_sys::ACL_UPDATE) as pg_sys::AclMode;
        always
            | match self {
                Op::Insert | Op::Upsert => pg_sys::ACL_INSERT as pg_sys::AclMode,
                Op::Update => 0,
                Op::Delete => pg_sys::ACL_DELETE as pg_sys::AclMode,
            }
    }
}

pub struct Mutation {
    pub relid: pg_sys::Oid,
    pub op: Op,
    pub key: Map<String, Value>,
    pub new_values: Map<String, Value>,
    pub base_version: Option<i64>,
    pub base_values: Option<Map<String, Value>>,
    pub id: Option<MutationId>,
    pub hlc: Option<String>,
    /// `key` and `new_values` as the jsonb datums the caller passed, when it passed
    /// datums (`livesync.write`): the fast path hands them to its statement as they
    /// are instead of printing them again.
    pub raw: Option<(pg_sys::Datum, pg_sys::Datum)>,
}

/// The arguments of `livesync.write`, before checking.
pub struct MutationArgs {
    pub relid: Option<pg_sys::Oid>,
    pub op: Option<String>,
    pub key: Option<Value>,
    pub new_values: Option<Value>,
    pub base_version: Option<i64>,
    pub base_values: Option<Value>,
    pub client_id: Option<String>,
    pub mutation_id: Option<i64>,
    pub hlc: Option<String>,
}

fn object(
    value: Option<Value>,
    what: &'static str,
) -> Result<Option<Map<String, Value>>, WriteError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(WriteError::NotAnObject(what)),
    }
}

impl MutationArgs {
    pub fn check(self) -> Result<Mutation, WriteError> {
        let relid = self.relid.ok_or(WriteError::Missing("rel"))?;
        let op = Op::parse(self.op.as_deref().ok_or(WriteError::Missing("op"))?)?;
        let key = object(self.key, "key")?.ok_or(WriteError::Missing("key"))?;
        let new_values = object(self.new_values, "new_values")?;
        let new_values = match (op, new_values) {
            (Op::Delete, values) => values.unwrap_or_default(),
            (_, Some(values)) => values,
            (_, None) => return Err(WriteError::Missing("new_values")),
        };
        let id = match (self.client_id, self.mutation_id) {
            (Some(client_id), Some(_)) if client_id.len() > MAX_CLIENT_ID_BYTES => {
                return Err(WriteError::ClientIdTooLong(client_id.len()))
            }
            (Some(client_id), Some(mutation_id)) => Some(MutationId {
                client_id,
                mutation_id,
            }),
            (None, None) => None,
            _ => return Err(WriteError::HalfMutationId),
        };
        Ok(Mutation {
            relid,
            op,
            key,
            new_values,
            base_version: self.base_version,
            base_values: object(self.base_values, "base_values")?,
            id,
            hlc: self.hlc,
            raw: None,
        })
    }

    /// One element of `write_batch`'s array: the same fields as `livesync.write`'s
    /// arguments, with `rel` as a table name.
    pub fn from_json(item: &Value) -> Result<MutationArgs, WriteError> {
        MutationArgs::from_json_resolving(item, resolve_table)
    }

    /// [`MutationArgs::from_json`], naming tables with `resolve` (the unit tests
    /// resolve names without a database).
    pub fn from_json_resolving(
        item: &Value,
        resolve: impl FnOnce(&str) -> Result<pg_sys::Oid, WriteError>,
    ) -> Result<MutationArgs, WriteError> {
        let Value::Object(fields) = item else {
            return Err(WriteError::NotAnObject("each mutation"));
        };
        for field in fields.keys() {
            if !matches!(
                field.as_str(),
                "rel"
                    | "op"
                    | "key"
                    | "new_values"
                    | "base_version"
                    | "base_values"
                    | "client_id"
                    | "mutation_id"
                    | "hlc"
            ) {
                return Err(WriteError::UnknownField(field.clone()));
            }
        }
        let text = |name: &'static str| -> Result<Option<String>, WriteError> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(WriteError::WrongFieldType(name, "a string")),
            }
        };
        let int = |name: &'static str| -> Result<Option<i64>, WriteError> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or(WriteError::WrongFieldType(name, "an integer")),
            }
        };
        let relid = match text("rel")? {
            Some(name) => Some(resolve(&name)?),
            None => None,
        };
        Ok(MutationArgs {
            relid,
            op: text("op")?,
            key: fields.get("key").cloned(),
            new_values: fields.get("new_values").cloned(),
            base_version: int("base_version")?,
            base_values: fields.get("base_values").cloned(),
            client_id: text("client_id")?,
            mutation_id: int("mutation_id")?,
            hlc: text("hlc")?,
        })
    }
}

/// A table name as SQL would resolve it (search_path, quoting).
fn resolve_table(name: &str) -> Result<pg_sys::Oid, WriteError> {
    let oid = pgrx::Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass($1)::oid",
        &[name.into()],
    )
    .ok()
    .flatten();
    oid.ok_or_else(|| WriteError::UnknownTable(name.to_string()))
}

#[cfg(test)]
mod tests;
