//! Optimistic state: a client's own pending writes laid over the replica, so the
//! app sees them at once. A write's overlay goes when its write_result arrives;
//! on `rejected`/`conflict` the server's row (from the result) replaces it, which
//! is the rollback.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::queue::Mutation;
use crate::replica::{row_key, RowKey, Table};

#[derive(Debug, Default)]
pub struct Overlay {
    /// Per table, per row: the pending mutations touching it, in id order.
    pending: BTreeMap<String, BTreeMap<RowKey, BTreeMap<i64, Mutation>>>,
}

/// How a write settled, for the app.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `applied` or `merged`: the overlay is now the server's truth (or close to it).
    Kept,
    /// `rejected` or `conflict`: the optimistic edit was undone.
    RolledBack { status: String },
}

impl Overlay {
    pub fn add(&mut self, mutation: &Mutation) {
        self.pending
            .entry(mutation.table.clone())
            .or_default()
            .entry(row_key(&mutation.key))
            .or_default()
            .insert(mutation.mutation_id, mutation.clone());
    }

    /// Removes `mutation`'s overlay; `result` (the write_result) may carry the row as
    /// stored, which goes into the replica by version.
    pub fn settle(
        &mut self,
        mutation: &Mutation,
        result: &Value,
        table: Option<&mut Table>,
    ) -> Outcome {
        if let Some(rows) = self.pending.get_mut(&mutation.table) {
            let k = row_key(&mutation.key);
            if let Some(ms) = rows.get_mut(&k) {
                ms.remove(&mutation.mutation_id);
                if ms.is_empty() {
                    rows.remove(&k);
                }
            }
        }
        if let (Some(table), Some(version), Some(row)) =
            (table, result["version"].as_i64(), result["row"].as_object())
        {
            table.apply_row(&mutation.key, version, row);
        }
        match result["status"].as_str() {
            Some("applied") | Some("merged") => Outcome::Kept,
            other => Outcome::RolledBack {
                status: other.unwrap_or("error").to_string(),
            },
        }
    }

    pub fn pending_count(&self) -> usize {
        self.pending
            .values()
            .flat_map(|rows| rows.values())
            .map(BTreeMap::len)
            .sum()
    }

    /// The rows of `table_name` as the app should see them: the replica with this
    /// client's pending writes applied on top, in order.
    pub fn view(&self, table_name: &str, table: &Table) -> BTreeMap<RowKey, Map<String, Value>> {
        let mut rows: BTreeMap<RowKey, Map<String, Value>> = table
            .rows()
            .map(|r| (row_key(&r.key), r.values.clone()))
            .collect();
        for (k, ms) in self.pending.get(table_name).into_iter().flatten() {
            for m in ms.values() {
                match m.op.as_str() {
                    "delete" => {
                        rows.remove(k);
                    }
                    "insert" | "upsert" => {
                        let row = rows.entry(k.clone()).or_default();
                        merge(row, &m.key);
                        merge(row, m.values.as_ref().unwrap_or(&Value::Null));
                    }
                    _ => {
                        // An update of a row we do not hold stays invisible until the
                        // server says what the row is.
                        if let Some(row) = rows.get_mut(k) {
                            merge(row, m.values.as_ref().unwrap_or(&Value::Null));
                        }
                    }
                }
            }
        }
        rows
    }
}

fn merge(row: &mut Map<String, Value>, values: &Value) {
    for (c, v) in values.as_object().into_iter().flatten() {
        row.insert(c.clone(), v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlay_then_rollback_to_the_server_row() {
        let mut table = Table::new();
        table.apply_transaction(
            &[json!({"op": "insert", "key": {"id": 1}, "version": 5,
                     "delta": {"id": {"new": 1}, "title": {"new": "a"}}})],
            1,
        );
        let mut o = Overlay::default();
        let m = Mutation {
            table: "public.items".into(),
            op: "update".into(),
            key: json!({"id": 1}),
            values: Some(json!({"title": "mine"})),
            base_version: Some(5),
            base_values: None,
            mutation_id: 1,
            hlc: None,
        };
        o.add(&m);
        let view = o.view("public.items", &table);
        assert_eq!(view[&row_key(&json!({"id": 1}))]["title"], "mine");
        let result = json!({"status": "rejected", "reason": "x", "version": 6,
                            "row": {"id": 1, "title": "theirs"}});
        let outcome = o.settle(&m, &result, Some(&mut table));
        assert_eq!(
            outcome,
            Outcome::RolledBack {
                status: "rejected".into()
            }
        );
        let view = o.view("public.items", &table);
        assert_eq!(view[&row_key(&json!({"id": 1}))]["title"], "theirs");
        assert_eq!(o.pending_count(), 0);
    }
}
