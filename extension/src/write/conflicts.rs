//! `manual` columns: conflicts stored for a person (or the app) to settle with
//! `livesync.resolve_conflict`.

use super::merge::Contest;
use super::plans::kept;
use crate::owner::sql_as_bootstrap_superuser;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, PgOid};
use serde_json::{Map, Value};

const STORE: &str = "
INSERT INTO livesync._conflicts (relation, key, column_name, base, mine, theirs, actor, client_id, mutation_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id";

pub struct ConflictOrigin<'a> {
    pub relid: pg_sys::Oid,
    pub key: &'a Map<String, Value>,
    pub actor: &'a str,
    pub client_id: Option<&'a str>,
    pub mutation_id: Option<i64>,
}

/// Stores one conflict; returns its id.
pub fn store(client: &SpiClient<'_>, origin: &ConflictOrigin, contest: &Contest) -> i64 {
    let types = [
        PgOid::from(pg_sys::REGCLASSOID),
        PgOid::from(pg_sys::JSONBOID),
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::JSONBOID),
        PgOid::from(pg_sys::JSONBOID),
        PgOid::from(pg_sys::JSONBOID),
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::TEXTOID),
        PgOid::from(pg_sys::INT8OID),
    ];
    let plan = kept(client, STORE, &types);
    let id = sql_as_bootstrap_superuser(|| {
        client
            .select(
                &*plan,
                None,
                &[
                    origin.relid.into(),
                    JsonB(Value::Object(origin.key.clone())).into(),
                    contest.column.as_str().into(),
                    contest.base.clone().map(JsonB).into(),
                    JsonB(contest.mine.clone()).into(),
                    JsonB(contest.theirs.clone()).into(),
                    origin.actor.into(),
                    origin.client_id.into(),
                    origin.mutation_id.into(),
                ],
            )
            .and_then(|table| table.first().get_one::<i64>())
    })
    .unwrap_or_else(|e| crate::error::internal(format!("storing a conflict failed: {e}")));
    id.unwrap_or_else(|| crate::error::internal("storing a conflict returned no id"))
}
