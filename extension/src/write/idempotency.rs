//! `(client_id, mutation_id)` records: a mutation retried after it committed gets
//! its first result back and changes nothing.
//!
//! The pair is locked (a transaction-scoped advisory lock) before it is looked up,
//! so two sessions applying the same mutation at once take turns: the second
//! finds the first's record once the first commits, or applies the mutation itself
//! if the first rolled back. The record is written in the same transaction as the
//! mutation's changes, so it exists exactly when they do.

use super::statements::kept;
use crate::owner::as_extension_owner;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, PgOid};
use serde_json::Value;

/// First key of livesync's advisory locks ("LS"); the second is a hash of the pair.
const LOCK_CLASS: i32 = 0x4c53;

const LOCK_AND_FIND: &str = "
SELECT pg_advisory_xact_lock($3, hashtext($1 || ':' || $2::text)),
       (SELECT m.result FROM livesync._mutations m WHERE m.client_id = $1 AND m.mutation_id = $2)";

const RECORD: &str = "
INSERT INTO livesync._mutations (client_id, mutation_id, result) VALUES ($1, $2, $3)";

pub struct MutationId {
    pub client_id: String,
    pub mutation_id: i64,
}

impl MutationId {
    /// Waits for any other session applying the same mutation, then returns the
    /// result it committed, if it did.
    pub fn lock_and_find(&self, client: &SpiClient<'_>) -> Option<Value> {
        let types = [
            PgOid::from(pg_sys::TEXTOID),
            PgOid::from(pg_sys::INT8OID),
            PgOid::from(pg_sys::INT4OID),
        ];
        let plan = kept(client, LOCK_AND_FIND, &types);
        let found = as_extension_owner(|| {
            client
                .select(
                    &*plan,
                    Some(1),
                    &[
                        self.client_id.as_str().into(),
                        self.mutation_id.into(),
                        LOCK_CLASS.into(),
                    ],
                )
                .and_then(|table| table.first().get::<JsonB>(2))
        })
        .unwrap_or_else(|e| pgrx::error!("livesync: reading mutation records failed: {e}"));
        found.map(|JsonB(result)| result)
    }

    pub fn record(&self, client: &SpiClient<'_>, result: &super::apply::Applied) {
        let result = match result {
            super::apply::Applied::Value(value) => JsonB(value.clone()).into(),
            super::apply::Applied::Jsonb(datum) => unsafe {
                pgrx::datum::DatumWithOid::new(*datum, pg_sys::JSONBOID)
            },
        };
        let types = [
            PgOid::from(pg_sys::TEXTOID),
            PgOid::from(pg_sys::INT8OID),
            PgOid::from(pg_sys::JSONBOID),
        ];
        let plan = kept(client, RECORD, &types);
        as_extension_owner(|| {
            client.select(
                &*plan,
                None,
                &[
                    self.client_id.as_str().into(),
                    self.mutation_id.into(),
                    result,
                ],
            )
        })
        .unwrap_or_else(|e| pgrx::error!("livesync: recording the mutation failed: {e}"));
    }
}
