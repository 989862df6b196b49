//! One stored change, `[key, old, new, version]` as capture writes it, read without
//! copying: values stay the raw JSON text they are in the log.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::Op;

#[derive(Debug, thiserror::Error)]
#[error("malformed log entry: {0}")]
pub struct EntryError(String);

impl EntryError {
    pub fn from_json(e: &serde_json::Error) -> Self {
        EntryError(e.to_string())
    }
}

/// A JSON object whose values are left unparsed, in the order stored.
#[derive(Debug, Default)]
pub struct RawObject<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> RawObject<'a> {
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ObjectVisitor<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Cow<'a, str>>()? {
                    pairs.push((key, map.next_value::<&'a RawValue>()?));
                }
                Ok(RawObject(pairs))
            }
        }
        deserializer.deserialize_map(ObjectVisitor(std::marker::PhantomData))
    }
}

/// Reads a JSON object (a row) without parsing its values.
pub fn entry_object(raw: &RawValue) -> Result<RawObject<'_>, EntryError> {
    serde_json::from_str(raw.get()).map_err(|e| EntryError::from_json(&e))
}

/// Which side of a change a column value is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnSide {
    Old,
    New,
}

/// A parsed `[key, old, new, version]` entry, borrowing the log's text.
#[derive(Debug)]
pub struct Entry<'a> {
    key: Option<&'a RawValue>,
    key_fields: Option<RawObject<'a>>,
    old: Option<RawObject<'a>>,
    new: Option<RawObject<'a>>,
    version: Option<&'a RawValue>,
    /// Unchanged values of an update's declared filter columns, when capture stores
    /// them (a fifth element).
    context: Option<RawObject<'a>>,
}

impl<'a> Entry<'a> {
    pub fn parse(raw: &'a RawValue) -> Result<Entry<'a>, EntryError> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = Vec<&'de RawValue>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a [key, old, new, version] array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::with_capacity(4);
                while let Some(part) = seq.next_element::<&'de RawValue>()? {
                    parts.push(part);
                }
                Ok(parts)
            }
        }
        let mut de = serde_json::Deserializer::from_str(raw.get());
        let parts = de
            .deserialize_seq(EntryVisitor)
            .map_err(|e| EntryError(e.to_string()))?;
        if parts.len() < 4 {
            return Err(EntryError(format!("{} elements, expected 4", parts.len())));
        }
        let object = |raw: &'a RawValue| -> Result<Option<RawObject<'a>>, EntryError> {
            if raw.get() == "null" {
                return Ok(None);
            }
            serde_json::from_str::<RawObject<'a>>(raw.get())
                .map(Some)
                .map_err(|e| EntryError(e.to_string()))
        };
        let key = Some(parts[0]).filter(|k| k.get() != "null");
        Ok(Entry {
            key,
            key_fields: match key {
                Some(k) => object(k)?,
                None => None,
            },
            old: object(parts[1])?,
            new: object(parts[2])?,
            version: Some(parts[3]).filter(|v| v.get() != "null"),
            context: match parts.get(4) {
                Some(c) => object(c)?,
                None => None,
            },
        })
    }

    pub fn key_json(&self) -> &str {
        self.key.map(|k| k.get()).unwrap_or("null")
    }

    pub fn version_json(&self) -> &str {
        self.version.map(|v| v.get()).unwrap_or("null")
    }

    pub fn version(&self) -> Option<i64> {
        self.version.and_then(|v| v.get().parse().ok())
    }

    /// A column's value on one side of the change, as raw JSON. An update stores only
    /// the columns it changed, so an unchanged key column is read from the key.
    pub fn column(&self, op: Op, side: ColumnSide, name: &str) -> Option<&'a RawValue> {
        let stored = match side {
            ColumnSide::Old => self.old.as_ref(),
            ColumnSide::New => self.new.as_ref(),
        };
        if let Some(value) = stored.and_then(|o| o.get(name)) {
            return Some(value);
        }
        match op {
            Op::Update => {
                // Unchanged by the update: the same on both sides.
                let other = match side {
                    ColumnSide::Old => self.new.as_ref(),
                    ColumnSide::New => self.old.as_ref(),
                };
                if other.and_then(|o| o.get(name)).is_some() {
                    // Changed, but this side holds no value: cannot happen in a
                    // well-formed entry; treat as unknown.
                    return None;
                }
                self.key_fields
                    .as_ref()
                    .and_then(|k| k.get(name))
                    .or_else(|| self.context.as_ref().and_then(|c| c.get(name)))
            }
            _ => None,
        }
    }

    /// The delta object: per column `{"old": …, "new": …}` (see docs/protocol.md).
    pub fn write_delta(&self, op: Op, out: &mut String) {
        out.push('{');
        match op {
            Op::Insert => write_side(out, self.new.as_ref(), "new"),
            Op::Delete => write_side(out, self.old.as_ref(), "old"),
            Op::Update => {
                let mut first = true;
                for (name, new) in self.new.iter().flat_map(|n| n.0.iter()) {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    super::push_json_str(out, name);
                    out.push_str(":{\"old\":");
                    let old = self.old.as_ref().and_then(|o| o.get(name));
                    out.push_str(old.map(|v| v.get()).unwrap_or("null"));
                    out.push_str(",\"new\":");
                    out.push_str(new.get());
                    out.push('}');
                }
            }
            Op::Schema => {
                out.push_str("\"columns\":{\"old\":");
                let columns = |side: Option<&RawObject<'_>>| {
                    side.and_then(|o| o.get("columns"))
                        .map(|v| v.get().to_string())
                        .unwrap_or_else(|| "null".into())
                };
                out.push_str(&columns(self.old.as_ref()));
                out.push_str(",\"new\":");
                out.push_str(&columns(self.new.as_ref()));
                out.push('}');
            }
            Op::Truncate => {}
        }
        out.push('}');
    }
}

fn write_side(out: &mut String, side: Option<&RawObject<'_>>, label: &str) {
    let mut first = true;
    for (name, value) in side.iter().flat_map(|o| o.0.iter()) {
        if !first {
            out.push(',');
        }
        first = false;
        super::push_json_str(out, name);
        out.push_str(":{\"");
        out.push_str(label);
        out.push_str("\":");
        out.push_str(value.get());
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    fn delta(op: Op, text: &str) -> serde_json::Value {
        let raw = raw(text);
        let entry = Entry::parse(&raw).unwrap();
        let mut out = String::new();
        entry.write_delta(op, &mut out);
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn deltas_have_the_shape_changes_since_gives() {
        assert_eq!(
            delta(
                Op::Insert,
                r#"[{"id": 1}, null, {"id": 1, "t": "a\"b"}, 5]"#
            ),
            serde_json::json!({"id": {"new": 1}, "t": {"new": "a\"b"}})
        );
        assert_eq!(
            delta(Op::Update, r#"[{"id": 1}, {"t": "a"}, {"t": "b"}, 6]"#),
            serde_json::json!({"t": {"old": "a", "new": "b"}})
        );
        assert_eq!(
            delta(Op::Delete, r#"[{"id": 1}, {"id": 1, "t": "b"}, null, 7]"#),
            serde_json::json!({"id": {"old": 1}, "t": {"old": "b"}})
        );
        assert_eq!(
            delta(Op::Truncate, "[null, null, null, null]"),
            serde_json::json!({})
        );
        assert_eq!(
            delta(
                Op::Schema,
                r#"[null, {"columns": [1]}, {"columns": [2]}, null]"#
            ),
            serde_json::json!({"columns": {"old": [1], "new": [2]}})
        );
    }

    #[test]
    fn an_unchanged_key_column_is_read_from_the_key() {
        let raw = raw(r#"[{"m": 3, "p": 1}, {"s": 1}, {"s": 2}, 9]"#);
        let entry = Entry::parse(&raw).unwrap();
        assert_eq!(
            entry
                .column(Op::Update, ColumnSide::Old, "m")
                .unwrap()
                .get(),
            "3"
        );
        assert_eq!(
            entry
                .column(Op::Update, ColumnSide::New, "s")
                .unwrap()
                .get(),
            "2"
        );
        assert!(entry.column(Op::Update, ColumnSide::New, "x").is_none());
        assert_eq!(entry.version(), Some(9));
    }

    #[test]
    fn escaped_column_names_survive() {
        let d = delta(
            Op::Insert,
            r#"[{"a\"b": 1}, null, {"a\"b": 1, "é\n": [1, {"x": null}]}, 1]"#,
        );
        assert_eq!(
            d,
            serde_json::json!({"a\"b": {"new": 1}, "é\n": {"new": [1, {"x": null}]}})
        );
    }
}
