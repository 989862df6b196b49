//! Who may join and who may broadcast in which rooms: rules by room-name pattern and
//! JWT claim, from the config file's `[[rooms]]` tables. The first rule whose pattern
//! matches decides; a room no rule matches is open to every connection.

use serde::Deserialize;
use serde_json::Value;

/// One `[[rooms]]` rule.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoomRule {
    /// Glob over the room name: `*` matches any run of characters; nothing else is
    /// special.
    pub pattern: String,
    #[serde(default = "Access::anyone")]
    pub join: Access,
    #[serde(default = "Access::anyone")]
    pub broadcast: Access,
}

/// Who may do something in a room.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Access {
    /// `"anyone"` or `"authenticated"`.
    Named(NamedAccess),
    /// `{ claim = "tier", any_of = ["referee"] }`: a top-level claim equal to one of
    /// the values (an array claim: any element).
    Claim { claim: String, any_of: Vec<Value> },
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NamedAccess {
    Anyone,
    Authenticated,
}

impl Access {
    fn anyone() -> Access {
        Access::Named(NamedAccess::Anyone)
    }

    /// Whether a connection with these token claims (None: no token) passes.
    pub fn allows(&self, claims: Option<&serde_json::Map<String, Value>>) -> bool {
        match self {
            Access::Named(NamedAccess::Anyone) => true,
            Access::Named(NamedAccess::Authenticated) => claims.is_some(),
            Access::Claim { claim, any_of } => {
                let Some(value) = claims.and_then(|c| c.get(claim)) else {
                    return false;
                };
                match value {
                    Value::Array(items) => items.iter().any(|v| any_of.contains(v)),
                    v => any_of.contains(v),
                }
            }
        }
    }
}

/// What a connection wants to do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomAction {
    Join,
    Broadcast,
}

/// The configured rules, in order.
#[derive(Debug, Clone, Default)]
pub struct RoomPolicy {
    pub rules: Vec<RoomRule>,
}

impl RoomPolicy {
    pub fn allows(
        &self,
        room: &str,
        action: RoomAction,
        claims: Option<&serde_json::Map<String, Value>>,
    ) -> bool {
        match self.rules.iter().find(|r| glob_matches(&r.pattern, room)) {
            None => true,
            Some(rule) => match action {
                RoomAction::Join => rule.join.allows(claims),
                RoomAction::Broadcast => rule.broadcast.allows(claims),
            },
        }
    }
}

/// `*` matches any run of characters (also none); everything else literally.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: the whole name
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs() {
        assert!(glob_matches("match:*", "match:1"));
        assert!(glob_matches("match:*", "match:"));
        assert!(!glob_matches("match:*", "board:1"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(!glob_matches("a*b*c", "aXXcYYb"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
        assert!(!glob_matches("ab*ba", "aba")); // the ends must not overlap
    }

    #[test]
    fn rules_decide_in_order() {
        let rules: Vec<RoomRule> = serde_json::from_value(json!([
            {"pattern": "match:*", "join": "anyone", "broadcast": {"claim": "tier", "any_of": ["referee"]}},
            {"pattern": "board:*", "join": "authenticated", "broadcast": "authenticated"},
        ]))
        .unwrap();
        let policy = RoomPolicy { rules };
        let referee = json!({"tier": "referee"});
        let spectator = json!({"tier": ["spectator", "fan"]});
        let (referee, spectator) = (referee.as_object(), spectator.as_object());
        assert!(policy.allows("match:1", RoomAction::Join, None));
        assert!(policy.allows("match:1", RoomAction::Broadcast, referee));
        assert!(!policy.allows("match:1", RoomAction::Broadcast, spectator));
        assert!(!policy.allows("match:1", RoomAction::Broadcast, None));
        assert!(!policy.allows("board:1", RoomAction::Join, None));
        assert!(policy.allows("board:1", RoomAction::Join, spectator));
        assert!(policy.allows("lobby", RoomAction::Broadcast, None));
    }
}
