//! Kept plans: each statement text `livesync.write` runs (those `statements` builds
//! per table and column set, and the fixed ones on livesync's own tables) is planned
//! once per backend and reused. Postgres revalidates kept plans when the table
//! changes; a renamed table simply produces new text.

use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Beyond this many distinct statements the cache starts over, so a workload
/// that writes ever-new column sets cannot grow a backend without bound.
const MAX_KEPT: usize = 256;

thread_local! {
    static KEPT: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// The kept plan for `sql`, preparing it on first use. Shared out as an `Rc` so a
/// statement that re-enters `livesync.write` (a user trigger) cannot find the
/// cache borrowed.
pub fn kept(client: &SpiClient<'_>, sql: &str, args: &[PgOid]) -> Rc<OwnedPreparedStatement> {
    if let Some(plan) = KEPT.with(|kept| kept.borrow().get(sql).cloned()) {
        return plan;
    }
    let plan = client
        .prepare_mut(sql, args)
        .unwrap_or_else(|e| crate::error::internal(format!("could not prepare {sql}: {e}")))
        .keep();
    let plan = Rc::new(plan);
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        kept.insert(sql.to_string(), plan.clone());
    });
    plan
}
