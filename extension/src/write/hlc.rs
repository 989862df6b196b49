//! Hybrid logical clocks for last-writer-wins columns.
//!
//! A clock is `(wall milliseconds, counter, node)`, compared in that order, so two
//! writes in the same millisecond are ordered by their counters and an exact tie is
//! broken by the node id (the classic LWW register). Clients pass theirs as text
//! `"<unix ms>:<counter>:<node>"` (node optional: it defaults to the client id).

use super::WriteError;
use serde_json::{json, Value};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hlc {
    pub wall_ms: u64,
    pub counter: u64,
    pub node: String,
}

impl Hlc {
    /// A client's clock text, its wall time clamped to `livesync.max_clock_skew` past
    /// the server's clock.
    pub fn parse(text: &str, default_node: &str) -> Result<Hlc, WriteError> {
        let skew = crate::gucs::MAX_CLOCK_SKEW_MS.get().max(0) as u64;
        Hlc::parse_at(text, default_node, crate::now_ms(), skew)
    }

    /// [`Hlc::parse`] at a given server time and skew (which the unit tests choose).
    pub fn parse_at(
        text: &str,
        default_node: &str,
        now_ms: u64,
        max_skew_ms: u64,
    ) -> Result<Hlc, WriteError> {
        let bad = || WriteError::BadHlc(text.to_string());
        let mut parts = text.splitn(3, ':');
        let wall_ms: u64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let counter = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let node = match parts.next() {
            Some(node) if !node.is_empty() => node.to_string(),
            Some(_) => return Err(bad()),
            None => default_node.to_string(),
        };
        // A clock far ahead of the server's would win last-writer-wins merges for as
        // long as it stays ahead: clamped to livesync.max_clock_skew past now.
        Ok(Hlc {
            wall_ms: wall_ms.min(now_ms.saturating_add(max_skew_ms)),
            counter,
            node,
        })
    }

    /// The clock the server gives a write that came without one: now, but never
    /// behind a clock the row already carries (the HLC receive rule), so a write
    /// made after a value was stored is ordered after it even under clock skew.
    pub fn stamp(now_ms: u64, seen: impl Iterator<Item = Hlc>, node: &str) -> Hlc {
        let mut stamp = Hlc {
            wall_ms: now_ms,
            counter: 0,
            node: node.to_string(),
        };
        for clock in seen {
            if (clock.wall_ms, clock.counter) >= (stamp.wall_ms, stamp.counter) {
                // Just after it; after a clock's last counter comes the next millisecond
                // (a client may send any counter: `+ 1` overflowed).
                (stamp.wall_ms, stamp.counter) = match clock.counter.checked_add(1) {
                    Some(counter) => (clock.wall_ms, counter),
                    None => (clock.wall_ms.saturating_add(1), 0),
                };
            }
        }
        stamp
    }
}

/// What `_livesync_clocks` holds for one column: `[wall, counter, node, hash]`,
/// the clock of the write that set it and a hash of the value it set
/// (`jsonb_hash_extended(to_jsonb(value), 0)`, computed by the statement that wrote
/// it: equal values hash equally however the client spelled them). A later
/// plain-SQL write changes the value but not the clock; the hash shows the clock no
/// longer describes the value.
#[derive(Clone, Debug)]
pub struct ColumnClock {
    pub clock: Hlc,
    pub value_hash: i64,
}

impl ColumnClock {
    pub fn from_json(entry: &Value) -> Option<Self> {
        let items = entry.as_array()?;
        let wall_ms = items.first()?.as_u64()?;
        let counter = items.get(1)?.as_u64()?;
        let node = items.get(2)?.as_str()?.to_string();
        let value_hash = items.get(3)?.as_i64()?;
        Some(ColumnClock {
            clock: Hlc {
                wall_ms,
                counter,
                node,
            },
            value_hash,
        })
    }

    /// The clock, if it still describes the stored value whose hash is given.
    pub fn for_hash(&self, value_hash: Option<i64>) -> Option<&Hlc> {
        (value_hash == Some(self.value_hash)).then_some(&self.clock)
    }
}

impl Hlc {
    /// The clock part of a `_livesync_clocks` entry; the writing statement appends
    /// the value's hash.
    pub fn to_entry(&self) -> Value {
        json!([self.wall_ms, self.counter, self.node])
    }
}

#[cfg(test)]
mod tests;
