//! Catalog lookups: which table a channel names, whether livesync tracks it, its key
//! columns, and whether a role may stream it.

use deadpool_postgres::GenericClient;

use super::PgError;
use crate::changelog::TableName;

/// A tracked table as a subscription or snapshot needs it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub relation: u32,
    pub name: TableName,
    pub tracked: bool,
    /// Primary-key columns, in index order.
    pub key_columns: Vec<String>,
    /// Columns declared with `livesync.set_filter_columns`: capture records their
    /// values on every update, so subscriptions may filter on them.
    pub filter_columns: Vec<String>,
    /// Every user column (livesync's own left out).
    pub columns: Vec<String>,
}

/// Looks a table up by schema and name (exact, unquoted names).
pub async fn table<C: GenericClient>(
    client: &C,
    name: &TableName,
) -> Result<Option<TableInfo>, PgError> {
    let statement = client
        .prepare_cached(
            "SELECT c.oid, \
                EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t \
                        WHERE t.tgrelid = c.oid AND t.tgname = 'livesync_capture_insert'), \
                ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i \
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                      WHERE i.indrelid = c.oid AND i.indisprimary \
                      ORDER BY array_position(i.indkey::int2[], a.attnum)), \
                ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a \
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                        AND a.attname NOT IN ('_livesync_version', '_livesync_clocks') \
                      ORDER BY a.attnum), \
                coalesce((SELECT t.filter_columns FROM livesync._tracked t WHERE t.relation = c.oid), '{}') \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        )
        .await?;
    let row = client
        .query_opt(&statement, &[&name.schema, &name.table])
        .await?;
    Ok(row.map(|row| TableInfo {
        relation: row.get(0),
        name: name.clone(),
        tracked: row.get(1),
        key_columns: row.get(2),
        columns: row.get(3),
        filter_columns: row.get(4),
    }))
}

/// Whether a role may stream a table's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamAccess {
    Allowed,
    /// The role lacks SELECT on the table.
    NoSelect,
    /// Row-level security applies to the role: live changes are not filtered per row
    /// yet, so they are not streamed to it.
    RowSecurity,
    /// No such role, or one the bridge's own role may not become (`SET ROLE`): a
    /// token cannot borrow privileges the bridge could not use itself.
    NoRole,
}

/// Decides [`StreamAccess`] for `role` (None: the bridge's own role).
pub async fn stream_access<C: GenericClient>(
    client: &C,
    relation: u32,
    role: Option<&str>,
) -> Result<StreamAccess, PgError> {
    let statement = client
        .prepare_cached(
            "SELECT pg_catalog.has_table_privilege(r.oid, c.oid, 'SELECT'), \
                    c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls \
                        OR (pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)) \
             FROM pg_catalog.pg_class c, pg_catalog.pg_roles r \
             WHERE c.oid = $1 AND r.rolname = coalesce($2, current_user) \
               AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')",
        )
        .await?;
    let row = client.query_opt(&statement, &[&relation, &role]).await?;
    Ok(match row {
        None => StreamAccess::NoRole,
        Some(row) if !row.get::<_, bool>(0) => StreamAccess::NoSelect,
        Some(row) if row.get::<_, bool>(1) => StreamAccess::RowSecurity,
        Some(_) => StreamAccess::Allowed,
    })
}

/// What the bridge's own login role may do, checked at start.
#[derive(Debug)]
pub struct OwnRole {
    pub name: String,
    pub superuser: bool,
    pub reader: bool,
    pub maintainer: bool,
}

pub async fn own_role<C: GenericClient>(client: &C) -> Result<OwnRole, PgError> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, \
                    pg_catalog.pg_has_role('livesync_reader', 'USAGE'), \
                    pg_catalog.pg_has_role('livesync_maintainer', 'USAGE') \
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    Ok(OwnRole {
        name: row.get(0),
        superuser: row.get(1),
        reader: row.get(2),
        maintainer: row.get(3),
    })
}

/// Re-checks, every `interval`, that the roles of live subscriptions may still
/// stream their tables, ending those that may not (`forbidden`). Access is decided
/// at `subscribe`; a REVOKE or an `ENABLE ROW LEVEL SECURITY` afterwards takes effect
/// within one interval.
pub async fn watch_access(
    pool: deadpool_postgres::Pool,
    hub: std::sync::Arc<crate::hub::FanoutHub>,
    interval: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let grants = hub.grants();
        if grants.is_empty() {
            continue;
        }
        let Ok(client) = pool.get().await else {
            continue;
        };
        end_lost_access(&client, &hub, grants).await;
    }
}

/// Ends (`forbidden`) the subscriptions of every (table, role) pair in `grants` whose
/// role may no longer stream the table. A pair that cannot be checked (a table just
/// dropped) is left for the next check.
pub async fn end_lost_access<C: GenericClient>(
    client: &C,
    hub: &crate::hub::FanoutHub,
    grants: Vec<(u32, Option<String>)>,
) {
    for (relation, role) in grants {
        let reason = match stream_access(client, relation, role.as_deref()).await {
            Ok(StreamAccess::Allowed) | Err(_) => continue,
            Ok(StreamAccess::NoSelect) => "permission denied: the role may no longer SELECT from the table",
            Ok(StreamAccess::RowSecurity) => {
                "the table now has row-level security: live changes stream only to roles that bypass it"
            }
            Ok(StreamAccess::NoRole) => "the role this subscription runs as no longer exists",
        };
        let ended = hub.revoke(relation, &role, reason);
        if ended > 0 {
            tracing::info!(
                relation,
                ?role,
                ended,
                reason,
                "subscriptions ended: access lost"
            );
        }
    }
}
