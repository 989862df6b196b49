//! A tracked table's write settings as `livesync.write` reads them: key, columns and
//! their policies, the insert and delete rules, and the names statements and
//! messages use. Read once per backend and kept until the table changes.

use super::json::Json;
use super::plans::kept;
use super::policy::{DeleteRace, ExistingInsert, Policy};
use super::WriteError;
use crate::catalog::relation_display;
use crate::error::LivesyncError;
use crate::owner::sql_as_bootstrap_superuser;
use crate::row_json::{CLOCKS_COLUMN, VERSION_COLUMN};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;
use std::rc::Rc;

/// The hidden columns (named in `row_json`) as statement text.
pub const VERSION: &str = column_text(VERSION_COLUMN);
pub const CLOCKS: &str = column_text(CLOCKS_COLUMN);

const fn column_text(name: &'static CStr) -> &'static str {
    match name.to_str() {
        Ok(text) => text,
        Err(_) => panic!("a column name that is not UTF-8"),
    }
}

// $2, $3: the hidden columns (never written by a client).
const LOAD_SETTINGS: &str = "
SELECT pg_catalog.jsonb_build_object(
    'name', pg_catalog.format('%I.%I', n.nspname, c.relname),
    'existing_insert', t.existing_insert,
    'delete_race', t.delete_race,
    'key', ARRAY(SELECT a.attname::text
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = t.relation AND i.indisprimary
                 ORDER BY k.ord),
    'columns', (SELECT pg_catalog.jsonb_object_agg(a.attname, coalesce(p.policy, t.default_policy))
                FROM pg_attribute a
                LEFT JOIN livesync._policies p ON p.relation = t.relation AND p.attnum = a.attnum
                WHERE a.attrelid = t.relation AND a.attnum > 0 AND NOT a.attisdropped
                  AND a.attname NOT IN ($2, $3)),
    -- Whether an insert can do nothing but by a conflict: a rule, or a BEFORE INSERT
    -- row trigger (tgtype ROW | BEFORE | INSERT) besides livesync's own.
    'insert_can_be_skipped', c.relhasrules OR EXISTS (
        SELECT FROM pg_trigger g
        WHERE g.tgrelid = t.relation AND g.tgenabled <> 'D' AND g.tgname <> 'livesync_version'
          AND (g.tgtype::int & 7) = 7))
FROM livesync._tracked t
JOIN pg_class c ON c.oid = t.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.relation = $1";

pub struct TableSettings {
    pub relid: pg_sys::Oid,
    /// Schema-qualified, quoted: for statement text.
    pub name: String,
    /// As `regclass` prints it: for messages.
    pub display: String,
    pub key: Vec<String>,
    /// Every writable column and its policy (key columns included, never merged).
    pub columns: BTreeMap<String, Policy>,
    pub existing_insert: ExistingInsert,
    pub delete_race: DeleteRace,
    /// A rule or a user's BEFORE INSERT row trigger may skip an insert: one that did
    /// nothing, with no row of its key to be found, may be that (not only a race).
    pub insert_can_be_skipped: bool,
}

thread_local! {
    /// Write settings per table, read once per backend: the catalog query costs
    /// more than the write itself. Entries are dropped by relcache invalidation,
    /// which DDL on the table and every settings change (`_forget_write_settings`)
    /// send to all backends.
    static SETTINGS: RefCell<HashMap<pg_sys::Oid, Rc<TableSettings>>> = RefCell::new(HashMap::new());
}

/// Registers the invalidation callback; called once per process from `_PG_init`.
pub fn init() {
    // SAFETY: `forget` is a guarded callback of the type the relcache calls, and
    // `_PG_init` registers it once per process.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), pg_sys::Datum::from(0usize)) };
}

/// # Safety
/// Called by Postgres's invalidation processing only (registered in `init`).
#[pg_guard]
unsafe extern "C-unwind" fn forget(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    SETTINGS.with(|settings| crate::catalog::forget_relation(settings, relid));
}

/// Tells every backend that a table's write settings changed (at commit).
#[pg_extern(name = "_forget_write_settings", volatile, parallel_unsafe)]
pub fn forget_write_settings(rel: pg_sys::Oid) {
    // SAFETY: queues an invalidation in the calling transaction; a missing relation
    // raises an ERROR.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(rel) };
}

impl TableSettings {
    /// The table's write settings, from this backend's cache when it has them.
    pub fn cached(
        client: &SpiClient<'_>,
        relid: pg_sys::Oid,
    ) -> Result<Rc<TableSettings>, WriteError> {
        if let Some(table) = SETTINGS.with(|settings| settings.borrow().get(&relid).cloned()) {
            return Ok(table);
        }
        let table = Rc::new(Self::load(client, relid)?);
        SETTINGS.with(|settings| settings.borrow_mut().insert(relid, table.clone()));
        Ok(table)
    }

    fn load(client: &SpiClient<'_>, relid: pg_sys::Oid) -> Result<TableSettings, WriteError> {
        // livesync's own catalog: read as the bootstrap superuser, so application roles
        // need no privileges on it.
        let text_type = PgOid::from(pg_sys::TEXTOID);
        let plan = kept(
            client,
            LOAD_SETTINGS,
            &[PgOid::from(pg_sys::REGCLASSOID), text_type, text_type],
        );
        let meta = sql_as_bootstrap_superuser(|| {
            client
                .select(
                    &*plan,
                    Some(1),
                    &[relid.into(), VERSION.into(), CLOCKS.into()],
                )
                .and_then(|table| match table.is_empty() {
                    true => Ok(None),
                    false => table.first().get_one::<Json>(),
                })
        })
        .unwrap_or_else(|e| crate::error::internal(format!("reading write settings failed: {e}")));
        let Some(Json(meta)) = meta else {
            return Err(WriteError::NotTracked(relation_display(relid)));
        };
        let text = |field: &str| meta[field].as_str().unwrap_or_default().to_string();
        let key: Vec<String> = meta["key"]
            .as_array()
            .map(|k| {
                k.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if key.is_empty() {
            // Its primary key was dropped with livesync's event trigger disabled.
            return Err(LivesyncError::NoPrimaryKey(relation_display(relid)).into());
        }
        let columns = meta["columns"]
            .as_object()
            .map(|columns| {
                columns
                    .iter()
                    .map(|(name, policy)| {
                        (
                            name.clone(),
                            Policy::from_name(policy.as_str().unwrap_or("")),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(TableSettings {
            relid,
            // The oid in a comment makes every statement's text (the key of the kept
            // plans) differ from a dropped and re-created table's of the same name,
            // whose kept plans would still carry the old row type.
            name: format!("{} /* livesync {} */", text("name"), relid.to_u32()),
            // Printed as the caller's search_path shows it (LOAD_SETTINGS runs with
            // livesync's pinned one, which would qualify every name).
            display: relation_display(relid),
            key,
            columns,
            existing_insert: match meta["existing_insert"].as_str() {
                Some("reject") => ExistingInsert::Reject,
                _ => ExistingInsert::Merge,
            },
            delete_race: match meta["delete_race"].as_str() {
                Some("update_wins") => DeleteRace::UpdateWins,
                _ => DeleteRace::DeleteWins,
            },
            insert_can_be_skipped: meta["insert_can_be_skipped"].as_bool().unwrap_or(true),
        })
    }

    pub fn is_key(&self, column: &str) -> bool {
        self.key.iter().any(|k| k == column)
    }
}
