//! Who may call what: the checks livesync's entry points make of the calling role
//! before they act (the model and its reasons are in docs/sql.md, "Who may call
//! what"; the grants that go with it in sql/privileges.sql).
//!
//! Every check asks about `GetUserId()`, the role the call runs as: the session's
//! role, or the owner of a SECURITY DEFINER function that made the call. A failed
//! check is SQLSTATE 42501, naming the table and the privilege.

use pgrx::pg_sys;

/// The role whose members may run `livesync.compact` (besides the extension's owner).
const MAINTAINER_ROLE: &std::ffi::CStr = c"livesync_maintainer";

/// A privilege the caller lacks: the message and hint of a 42501.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub message: String,
    pub hint: String,
}

/// Whether the current role owns the table (is, or has the privileges of, its owner).
pub fn owns_table(relid: pg_sys::Oid) -> bool {
    // SAFETY: a catalog check by oid, which raises (not crashes) for a missing table.
    unsafe { pg_sys::pg_class_ownercheck(relid, pg_sys::GetUserId()) }
}

/// The table privileges in `mode` the current role lacks (none: it has them all).
/// Table-level grants only: livesync writes its own columns
/// (`_livesync_version`, `_livesync_clocks`) beside the caller's, so column grants
/// cannot cover a livesync write.
pub fn missing_table_privileges(relid: pg_sys::Oid, mode: pg_sys::AclMode) -> pg_sys::AclMode {
    // SAFETY: a catalog check by oid, which raises (not crashes) for a missing table.
    let held = unsafe {
        pg_sys::pg_class_aclmask(
            relid,
            pg_sys::GetUserId(),
            mode,
            pg_sys::AclMaskHow::ACLMASK_ALL,
        )
    };
    mode & !held
}

/// SQL names of the privileges in `mode`, as a GRANT lists them ("SELECT, UPDATE").
pub fn privilege_names(mode: pg_sys::AclMode) -> String {
    let names = [
        (pg_sys::ACL_SELECT, "SELECT"),
        (pg_sys::ACL_INSERT, "INSERT"),
        (pg_sys::ACL_UPDATE, "UPDATE"),
        (pg_sys::ACL_DELETE, "DELETE"),
    ];
    names
        .iter()
        .filter(|(bit, _)| mode & *bit as pg_sys::AclMode != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `function` may run only as the table's owner.
pub fn require_ownership(
    relid: pg_sys::Oid,
    function: &str,
    table: impl FnOnce() -> String,
) -> Result<(), Denied> {
    if owns_table(relid) {
        return Ok(());
    }
    let table = table();
    Err(Denied {
        message: format!("permission denied: {function} needs ownership of table {table}"),
        hint: format!("Call it as the owner of {table} (or a member of the owning role)."),
    })
}

/// `function` may run only as the owner of the table and of every table that
/// inherits from it: it adds or drops columns, which ALTER TABLE does to the
/// children too (and ALTER TABLE itself asks for their ownership).
pub fn require_ownership_of_tree(
    relid: pg_sys::Oid,
    function: &str,
    display: impl Fn(pg_sys::Oid) -> String,
) -> Result<(), Denied> {
    require_ownership(relid, function, || display(relid))?;
    for child in inheritors(relid) {
        if !owns_table(child) {
            let (child, parent) = (display(child), display(relid));
            return Err(Denied {
                message: format!(
                    "permission denied: {function} needs ownership of table {child}, which inherits from {parent}"
                ),
                hint: format!("Call it as the owner of {parent} and of every table that inherits from it."),
            });
        }
    }
    Ok(())
}

/// Every table that inherits from `relid`, at any depth. Asked as the caller with
/// every name qualified.
fn inheritors(relid: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    use pgrx::prelude::*;
    Spi::connect(|client| {
        client
            .select(
                "WITH RECURSIVE tree(relid) AS (
                     SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent OPERATOR(pg_catalog.=) $1
                     UNION
                     SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.relid)
                 SELECT relid FROM tree",
                None,
                &[relid.into()],
            )?
            .map(|row| row.get::<pg_sys::Oid>(1))
            .collect::<Result<Vec<_>, _>>()
    })
    .map(|children| children.into_iter().flatten().collect())
    .unwrap_or_else(|e| {
        crate::error::internal(format!("reading inheritance children failed: {e}"))
    })
}

/// `function` may run as the extension's owner or a member of `livesync_maintainer`.
pub fn require_maintenance(function: &str) -> Result<(), Denied> {
    // SAFETY: reads the backend's current user id.
    let user = unsafe { pg_sys::GetUserId() };
    // SAFETY: a lookup by NUL-terminated name; missing_ok gives InvalidOid.
    let maintainer = unsafe { pg_sys::get_role_oid(MAINTAINER_ROLE.as_ptr(), true) };
    let owner = extension_owner();
    // SAFETY: catalog checks of roles that exist (invalid oids are not asked about).
    let allowed = unsafe {
        (owner != pg_sys::InvalidOid && pg_sys::has_privs_of_role(user, owner))
            || (maintainer != pg_sys::InvalidOid && pg_sys::has_privs_of_role(user, maintainer))
    };
    if allowed {
        return Ok(());
    }
    let role = MAINTAINER_ROLE.to_string_lossy();
    Err(Denied {
        message: format!("permission denied: {function} needs membership in role {role}"),
        hint: format!(
            "GRANT {role} TO the role that runs it (the extension's owner may run it too)."
        ),
    })
}

/// The owner of the livesync extension in this database (InvalidOid if not installed).
/// Asked as the caller, so every name is qualified: the caller's search_path must not
/// choose the `=` that picks the row.
fn extension_owner() -> pg_sys::Oid {
    use pgrx::prelude::*;
    Spi::get_one::<pg_sys::Oid>(
        "SELECT e.extowner FROM pg_catalog.pg_extension e
         WHERE e.extname OPERATOR(pg_catalog.=) 'livesync'::pg_catalog.name",
    )
    .ok()
    .flatten()
    .unwrap_or(pg_sys::InvalidOid)
}
