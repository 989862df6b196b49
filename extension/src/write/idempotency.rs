//! `(client_id, mutation_id)` records: a mutation retried after it committed gets
//! its first result back and changes nothing.
//!
//! The client is locked (a transaction-scoped lock) before the pair is
//! looked up, so two sessions applying the same mutation at once take turns: the
//! second finds the first's record once the first commits, or applies the mutation
//! itself if the first rolled back. The lookup is a statement of its own, after the
//! lock: in one statement its snapshot would predate the wait, miss the first's
//! record, and the second would apply the mutation again (23505 on the record).
//! The record is written in the same transaction as the mutation's changes, so it
//! exists exactly when they do.
//!
//! The lock is per client, in one of `LOCK_BUCKETS` buckets, not per mutation:
//! transaction-scoped locks are held to the end, and a batch of 20,000 mutations
//! holding one lock each filled the shared lock table (new connections to every
//! database failed with "out of shared memory"). A batch from one client now holds
//! one lock; any batch at most `LOCK_BUCKETS`. Two clients sharing a bucket only
//! wait for each other's commit.
//!
//! Not an advisory lock: any role can take those (`pg_advisory_lock`), and one that
//! knew a client's id could hold its bucket and stall its writes. The lock is on an
//! object tag of livesync's own (`_mutations`, sub-id = bucket + 1), which no SQL
//! command takes, and it is taken directly, without a statement.

use super::plans::kept;
use crate::owner::sql_as_bootstrap_superuser;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgOid;
use serde_json::Value;

/// How many distinct locks mutation records can take.
const LOCK_BUCKETS: u32 = 1024;

/// The client's lock bucket: FNV-1a of its id (the same in every backend).
fn bucket(client_id: &str) -> u16 {
    let hash = client_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    (hash % LOCK_BUCKETS) as u16
}

const FIND: &str = "
SELECT m.result, m.relation::oid FROM livesync._mutations m
WHERE m.written_by = $3 AND m.client_id = $1 AND m.mutation_id = $2";

const RECORD: &str = "
INSERT INTO livesync._mutations (client_id, mutation_id, result, relation, written_by)
VALUES ($1, $2, $3, $4, $5)";

// The same on a database still on livesync 0.2.0's tables: between installing a new
// build and `ALTER EXTENSION livesync UPDATE`, writes keep working (with 0.2.0's
// rule, which gave a recorded result to any retry).
const FIND_0_2: &str = "
SELECT m.result, $3 FROM livesync._mutations m
WHERE m.client_id = $1 AND m.mutation_id = $2";

const RECORD_0_2: &str = "
INSERT INTO livesync._mutations (client_id, mutation_id, result)
SELECT $1, $2, $3 WHERE $4 IS NOT NULL AND $5 IS NOT NULL";

/// Whether `livesync._mutations` records who wrote it (livesync 0.3.0 on).
fn records_writer() -> bool {
    let Some(relid) = crate::catalog::livesync_relation(c"_mutations") else {
        return true;
    };
    // SAFETY: a catalog lookup by relation oid and NUL-terminated column name, which
    // returns InvalidAttrNumber when there is no such column.
    unsafe { pg_sys::get_attnum(relid, c"written_by".as_ptr()) != pg_sys::InvalidAttrNumber as i16 }
}

pub struct MutationId {
    pub client_id: String,
    pub mutation_id: i64,
}

impl MutationId {
    /// Waits for any other session applying the same mutation, then returns the
    /// result it committed, if it did. A result holds the row as written, so it is
    /// given back only to the role that wrote it, for the same table: a replayed
    /// pair for another table is refused. Records are per role (see writes.sql).
    pub fn lock_and_find(
        &self,
        client: &SpiClient<'_>,
        relid: pg_sys::Oid,
    ) -> Result<Option<Value>, super::WriteError> {
        let find_types = [
            PgOid::from(pg_sys::TEXTOID),
            PgOid::from(pg_sys::INT8OID),
            PgOid::from(pg_sys::OIDOID),
        ];
        let current = records_writer();
        // SAFETY: reads the backend's current user id.
        let writer = unsafe { pg_sys::GetUserId() };
        let find = kept(client, if current { FIND } else { FIND_0_2 }, &find_types);
        if let Some(mutations) = crate::catalog::livesync_relation(c"_mutations") {
            // SAFETY: an advisory-style lock on an object id inside the write's
            // transaction (released at its end), which Postgres does not check.
            unsafe {
                pg_sys::LockDatabaseObject(
                    pg_sys::RelationRelationId,
                    mutations,
                    bucket(&self.client_id) + 1,
                    pg_sys::ExclusiveLock as pg_sys::LOCKMODE,
                )
            };
        }
        let found = sql_as_bootstrap_superuser(|| {
            client
                .select(
                    &*find,
                    Some(1),
                    &[
                        self.client_id.as_str().into(),
                        self.mutation_id.into(),
                        writer.into(),
                    ],
                )
                .and_then(|table| match table.is_empty() {
                    true => Ok(None),
                    false => {
                        let row = table.first();
                        Ok(Some((
                            row.get::<super::json::Json>(1)?,
                            row.get::<pg_sys::Oid>(2)?,
                        )))
                    }
                })
        })
        .unwrap_or_else(|e| {
            crate::error::internal(format!("reading mutation records failed: {e}"))
        });
        let Some((result, relation)) = found else {
            return Ok(None);
        };
        if current && relation != Some(relid) {
            return Err(super::WriteError::MutationOfAnotherTable {
                client_id: self.client_id.clone(),
                mutation_id: self.mutation_id,
            });
        }
        Ok(result.map(|super::json::Json(result)| result))
    }

    /// Records the mutation's `result` (a jsonb) as applied to `relid` by the current role.
    pub fn record(&self, client: &SpiClient<'_>, relid: pg_sys::Oid, result: DatumWithOid<'_>) {
        let types = [
            PgOid::from(pg_sys::TEXTOID),
            PgOid::from(pg_sys::INT8OID),
            PgOid::from(pg_sys::JSONBOID),
            PgOid::from(pg_sys::OIDOID),
            PgOid::from(pg_sys::OIDOID),
        ];
        let statement = if records_writer() { RECORD } else { RECORD_0_2 };
        let plan = kept(client, statement, &types);
        // SAFETY: reads the backend's current user id.
        let writer = unsafe { pg_sys::GetUserId() };
        sql_as_bootstrap_superuser(|| {
            client.select(
                &*plan,
                None,
                &[
                    self.client_id.as_str().into(),
                    self.mutation_id.into(),
                    result,
                    relid.into(),
                    writer.into(),
                ],
            )
        })
        .unwrap_or_else(|e| crate::error::internal(format!("recording the mutation failed: {e}")));
    }
}
