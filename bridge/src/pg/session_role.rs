//! Running a client's statements as the client: the role its token names (`SET LOCAL
//! ROLE`), its claims in `request.jwt.claims` (as PostgREST sets them, for RLS
//! policies) and its actor in `livesync.actor`, all local to one transaction.

use deadpool_postgres::Transaction;

use super::PgError;
use crate::auth::Identity;

/// Switches the transaction to the client's identity. Everything after it runs with
/// the role's privileges and row-level security.
pub async fn enter(tx: &Transaction<'_>, identity: &Identity) -> Result<(), PgError> {
    let statement = tx
        .prepare_cached(
            "SELECT set_config('request.jwt.claims', $1, true), set_config('livesync.actor', $2, true)",
        )
        .await?;
    tx.execute(&statement, &[&identity.claims_json, &identity.actor])
        .await?;
    if let Some(role) = &identity.role {
        // set_config('role') is SET LOCAL ROLE with the name as a parameter, so no
        // quoting of a name that comes from a token.
        let statement = tx
            .prepare_cached("SELECT set_config('role', $1, true)")
            .await?;
        tx.execute(&statement, &[role]).await.map_err(|e| {
            if e.as_db_error().is_some() {
                PgError::Role(e)
            } else {
                PgError::Db(e)
            }
        })?;
    }
    Ok(())
}
