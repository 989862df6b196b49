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
    let pairs = [(relation, role.map(str::to_string))];
    let access = stream_access_many(client, &pairs).await?;
    Ok(access.first().copied().unwrap_or(StreamAccess::NoRole))
}

const STREAM_ACCESS_SQL: &str = "SELECT g.i::int4, \
        pg_catalog.has_table_privilege(r.oid, c.oid, 'SELECT'), \
        c.relrowsecurity AND NOT (r.rolsuper OR r.rolbypassrls \
            OR (pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)) \
     FROM unnest($1::oid[], $2::text[]) WITH ORDINALITY AS g(relation, role, i) \
     JOIN pg_catalog.pg_class c ON c.oid = g.relation \
     JOIN pg_catalog.pg_roles r ON r.rolname = coalesce(g.role, current_user) \
     WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')";

/// Prepares [`stream_access_many`]'s statement on a connection ahead of use, so a
/// later call sends its query the moment it is first polled.
pub async fn prepare_stream_access<C: GenericClient>(client: &C) -> Result<(), PgError> {
    client.prepare_cached(STREAM_ACCESS_SQL).await?;
    Ok(())
}

/// [`StreamAccess`] for each (table, role) pair, in one statement (one round trip
/// however many pairs).
pub async fn stream_access_many<C: GenericClient>(
    client: &C,
    pairs: &[(u32, Option<String>)],
) -> Result<Vec<StreamAccess>, PgError> {
    let statement = client.prepare_cached(STREAM_ACCESS_SQL).await?;
    let relations: Vec<u32> = pairs.iter().map(|(r, _)| *r).collect();
    let roles: Vec<Option<&str>> = pairs.iter().map(|(_, role)| role.as_deref()).collect();
    let rows = client.query(&statement, &[&relations, &roles]).await?;
    // A pair without a row: no such role (or table), or one the bridge may not become.
    let mut access = vec![StreamAccess::NoRole; pairs.len()];
    for row in rows {
        let i = row.get::<_, i32>(0) as usize;
        let Some(slot) = i.checked_sub(1).and_then(|i| access.get_mut(i)) else {
            continue;
        };
        *slot = if !row.get::<_, bool>(1) {
            StreamAccess::NoSelect
        } else if row.get::<_, bool>(2) {
            StreamAccess::RowSecurity
        } else {
            StreamAccess::Allowed
        };
    }
    Ok(access)
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
/// role may no longer stream the table. When the pairs cannot be checked (the
/// connection failed) they are left for the next check.
pub async fn end_lost_access<C: GenericClient>(
    client: &C,
    hub: &crate::hub::FanoutHub,
    grants: Vec<(u32, Option<String>)>,
) {
    if let Ok(access) = stream_access_many(client, &grants).await {
        revoke_lost(hub, &grants, &access);
    }
}

/// Ends the subscriptions of the pairs whose `access` (as [`stream_access_many`]
/// returned it for `grants`) is no longer [`StreamAccess::Allowed`].
pub fn revoke_lost(
    hub: &crate::hub::FanoutHub,
    grants: &[(u32, Option<String>)],
    access: &[StreamAccess],
) {
    for ((relation, role), access) in grants.iter().zip(access) {
        let reason = match access {
            StreamAccess::Allowed => continue,
            StreamAccess::NoSelect => "permission denied: the role may no longer SELECT from the table",
            StreamAccess::RowSecurity => {
                "the table now has row-level security: live changes stream only to roles that bypass it"
            }
            StreamAccess::NoRole => "the role this subscription runs as no longer exists",
        };
        let ended = hub.revoke(*relation, role, reason);
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
