//! A room's members, kept from `presence_state` (the whole list) and
//! `presence_diff` (joins, updates, leaves), keyed by connection.

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Debug, Clone, Default)]
pub struct Room {
    pub name: String,
    /// Our own state, sent again on every (re)join.
    pub state: Value,
    /// Our connection (`self` of the last presence_state).
    pub me: Option<String>,
    /// Members by `connection`.
    pub members: BTreeMap<String, Value>,
}

impl Room {
    pub fn new(name: &str, state: Value) -> Room {
        Room {
            name: name.into(),
            state,
            ..Room::default()
        }
    }

    /// A `presence_state`: the full list replaces what we had.
    pub fn apply_state(&mut self, message: &Value) {
        self.me = message["self"].as_str().map(str::to_string);
        self.members = members(&message["members"]).collect();
    }

    /// A `presence_diff`.
    pub fn apply_diff(&mut self, message: &Value) {
        for (c, m) in members(&message["joins"]).chain(members(&message["updates"])) {
            self.members.insert(c, m);
        }
        for (c, _) in members(&message["leaves"]) {
            self.members.remove(&c);
        }
    }

    /// Member users in a stable order (for display).
    pub fn users(&self) -> Vec<String> {
        self.members
            .values()
            .map(|m| m["user"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

fn members(list: &Value) -> impl Iterator<Item = (String, Value)> + '_ {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["connection"].as_str().map(|c| (c.to_string(), m.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn state_then_diffs() {
        let mut r = Room::new("board:1", json!({}));
        r.apply_state(&json!({"self": "a", "members": [{"connection": "a", "user": "ann"}]}));
        r.apply_diff(
            &json!({"joins": [{"connection": "b", "user": "bob"}], "leaves": [], "updates": []}),
        );
        assert_eq!(r.users(), ["ann", "bob"]);
        r.apply_diff(
            &json!({"joins": [], "leaves": [{"connection": "a", "user": "ann"}], "updates": []}),
        );
        assert_eq!(r.users(), ["bob"]);
    }
}
