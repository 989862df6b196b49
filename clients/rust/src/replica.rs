//! A table's rows as the client knows them: loaded from snapshot pages, then kept
//! current by applying changes by version, a transaction at a time.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A row's identity: its primary key rendered as canonical JSON (object keys sorted).
pub type RowKey = String;

pub fn row_key(key: &Value) -> RowKey {
    // serde_json's Map is a BTreeMap here (no preserve_order), so this is canonical.
    key.to_string()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: Value,
    pub version: i64,
    pub values: Map<String, Value>,
}

/// What applying a transaction asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Ok,
    /// A `schema` change: the table's shape changed; load a fresh snapshot.
    ReloadRequired,
}

/// Gathers a transaction sent in parts (`part`/`parts`, same `position`) so it is
/// applied whole.
#[derive(Debug, Default)]
pub struct Parts {
    changes: Vec<Value>,
}

impl Parts {
    /// One `changes` message; the whole transaction's changes once its last part is here.
    pub fn push(&mut self, message: &Value) -> Option<Vec<Value>> {
        let changes = message["changes"].as_array().cloned().unwrap_or_default();
        match (message["part"].as_i64(), message["parts"].as_i64()) {
            (Some(i), Some(n)) if n > 1 => {
                if i == 1 {
                    // A new transaction: whatever a dropped connection left is stale.
                    self.changes.clear();
                }
                self.changes.extend(changes);
                (i >= n).then(|| std::mem::take(&mut self.changes))
            }
            _ => Some(changes),
        }
    }

    pub fn clear(&mut self) {
        self.changes.clear();
    }
}

#[derive(Debug, Default)]
pub struct Table {
    rows: BTreeMap<RowKey, Row>,
    /// Versions of deleted rows, so a replayed older insert/update cannot bring one back.
    tombstones: BTreeMap<RowKey, i64>,
    /// Rows of a snapshot being loaded; swapped in when its last page arrives so
    /// readers never see half a snapshot.
    loading: Option<BTreeMap<RowKey, Row>>,
    /// The position everything up to is applied (None: not loaded yet).
    position: Option<i64>,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    pub fn position(&self) -> Option<i64> {
        self.position
    }

    pub fn is_loaded(&self) -> bool {
        self.position.is_some()
    }

    pub fn get(&self, key: &Value) -> Option<&Row> {
        self.rows.get(&row_key(key))
    }

    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.rows.values()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Forgets everything (after `resync_required`): the next snapshot starts afresh.
    pub fn reset(&mut self) {
        self.rows.clear();
        self.tombstones.clear();
        self.loading = None;
        self.position = None;
    }

    /// One `snapshot_page` message. Returns true when it was the last page.
    pub fn load_page(&mut self, page: &Value) -> bool {
        if page["page"].as_i64() == Some(1) || self.loading.is_none() {
            self.loading = Some(BTreeMap::new());
        }
        let loading = self.loading.as_mut().expect("set above");
        for entry in page["rows"].as_array().into_iter().flatten() {
            let key = entry["key"].clone();
            let row = Row {
                version: entry["version"].as_i64().unwrap_or(0),
                values: entry["row"].as_object().cloned().unwrap_or_default(),
                key: key.clone(),
            };
            loading.insert(row_key(&key), row);
        }
        if page["last"].as_bool() != Some(true) {
            return false;
        }
        let fresh = self.loading.take().unwrap_or_default();
        // A row we already hold at a newer version (a change applied while the
        // snapshot ran) stays; so does a newer deletion.
        let mut merged = BTreeMap::new();
        for (k, row) in fresh {
            match self.rows.get(&k) {
                Some(mine) if mine.version > row.version => {
                    merged.insert(k, mine.clone());
                }
                _ if self.tombstones.get(&k).is_some_and(|&v| v >= row.version) => {}
                _ => {
                    merged.insert(k, row);
                }
            }
        }
        self.rows = merged;
        self.position = page["position"].as_i64();
        true
    }

    /// One whole transaction (all its parts): its changes, in order, then its position.
    pub fn apply_transaction(&mut self, changes: &[Value], position: i64) -> Applied {
        let mut result = Applied::Ok;
        for change in changes {
            if self.apply_change(change) == Applied::ReloadRequired {
                result = Applied::ReloadRequired;
            }
        }
        if self.position.is_none_or(|p| p < position) {
            self.position = Some(position);
        }
        result
    }

    /// Applies one change if it is newer than what the row holds.
    pub fn apply_change(&mut self, change: &Value) -> Applied {
        let op = change["op"].as_str().unwrap_or_default();
        match op {
            "truncate" => {
                self.rows.clear();
                self.tombstones.clear();
                return Applied::Ok;
            }
            "schema" => return Applied::ReloadRequired,
            _ => {}
        }
        let Some(version) = change["version"].as_i64() else {
            return Applied::Ok;
        };
        let key = change["key"].clone();
        let k = row_key(&key);
        let current = self
            .rows
            .get(&k)
            .map(|r| r.version)
            .or_else(|| self.tombstones.get(&k).copied());
        // Never older over newer: a change seen twice (resume, snapshot) is harmless.
        if current.is_some_and(|v| v >= version) {
            return Applied::Ok;
        }
        let delta = change["delta"].as_object().cloned().unwrap_or_default();
        match op {
            "delete" => {
                self.rows.remove(&k);
                self.tombstones.insert(k, version);
            }
            "insert" | "update" => {
                self.tombstones.remove(&k);
                let row = self.rows.entry(k).or_insert_with(|| Row {
                    key: key.clone(),
                    version,
                    values: key.as_object().cloned().unwrap_or_default(),
                });
                row.version = version;
                for (column, d) in delta {
                    if let Some(new) = d.get("new") {
                        row.values.insert(column, new.clone());
                    }
                }
            }
            _ => {}
        }
        Applied::Ok
    }

    /// The row a `write_result` carries (`version` + `row`), applied by version like a
    /// change: the server's word on a row, e.g. to roll an optimistic edit back.
    pub fn apply_row(&mut self, key: &Value, version: i64, values: &Map<String, Value>) {
        let k = row_key(key);
        let current = self
            .rows
            .get(&k)
            .map(|r| r.version)
            .or_else(|| self.tombstones.get(&k).copied());
        if current.is_some_and(|v| v >= version) {
            return;
        }
        self.tombstones.remove(&k);
        self.rows.insert(
            k,
            Row {
                key: key.clone(),
                version,
                values: values.clone(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(op: &str, id: i64, version: i64, delta: Value) -> Value {
        json!({"op": op, "key": {"id": id}, "version": version, "delta": delta})
    }

    #[test]
    fn never_older_over_newer() {
        let mut t = Table::new();
        t.apply_transaction(
            &[change(
                "insert",
                1,
                5,
                json!({"id": {"new": 1}, "title": {"new": "b"}}),
            )],
            10,
        );
        // A replayed older update is ignored.
        t.apply_transaction(
            &[change(
                "update",
                1,
                4,
                json!({"title": {"old": "x", "new": "a"}}),
            )],
            9,
        );
        assert_eq!(t.get(&json!({"id": 1})).unwrap().values["title"], "b");
        t.apply_transaction(&[change("delete", 1, 6, json!({}))], 11);
        assert!(t.get(&json!({"id": 1})).is_none());
        // An older insert seen again does not resurrect it.
        t.apply_transaction(
            &[change(
                "insert",
                1,
                5,
                json!({"id": {"new": 1}, "title": {"new": "b"}}),
            )],
            10,
        );
        assert!(t.get(&json!({"id": 1})).is_none());
        assert_eq!(t.position(), Some(11));
    }

    #[test]
    fn parts_come_out_whole() {
        let mut p = Parts::default();
        let part = |i: i64, id: i64| {
            json!({"position": 9, "part": i, "parts": 3,
            "changes": [{"op": "insert", "key": {"id": id}}]})
        };
        assert!(p.push(&part(1, 1)).is_none());
        assert!(p.push(&part(2, 2)).is_none());
        let whole = p.push(&part(3, 3)).unwrap();
        assert_eq!(whole.len(), 3);
        // A part 1 after a cut-off transaction starts afresh.
        assert!(p.push(&part(1, 4)).is_none());
        assert!(p.push(&part(1, 5)).is_none());
        let one = json!({"position": 10, "changes": [{"op": "delete"}]});
        assert_eq!(p.push(&one).unwrap().len(), 1);
    }

    #[test]
    fn snapshot_pages_swap_in_at_the_last() {
        let mut t = Table::new();
        let p1 = json!({"page": 1, "last": false, "position": 7,
            "rows": [{"key": {"id": 1}, "version": 3, "row": {"id": 1, "title": "a"}}]});
        assert!(!t.load_page(&p1));
        assert!(t.is_empty());
        let p2 = json!({"page": 2, "last": true, "position": 7,
            "rows": [{"key": {"id": 2}, "version": 4, "row": {"id": 2, "title": "b"}}]});
        assert!(t.load_page(&p2));
        assert_eq!(t.len(), 2);
        assert_eq!(t.position(), Some(7));
        assert_eq!(
            t.apply_transaction(&[json!({"op": "schema", "key": null, "version": null})], 8),
            Applied::ReloadRequired
        );
    }
}
