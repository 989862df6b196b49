//! Row filters of subscriptions and snapshots: `{"column", "op", "value"}` compared
//! with a row's JSON values. A change matches when its old or its new row matches; a
//! row that leaves the filter is sent as a delete.

use std::cmp::Ordering;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::changelog::{ColumnSide, Entry, Op};

/// A filter as a client sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    pub column: String,
    pub op: FilterOp,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterOp {
    Eq,
    Neq,
    In,
    Lt,
    Lte,
    Gt,
    Gte,
}

/// Why a filter was refused.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("filter column {0:?} is not a column of the table")]
    UnknownColumn(String),
    #[error("filter column {0:?} is neither part of the primary key nor declared with livesync.set_filter_columns: an update that leaves it unchanged would not carry it, so the bridge could not tell whether the row matches")]
    NotFilterable(String),
    #[error("filter op {0:?} needs {1}")]
    BadValue(&'static str, &'static str),
}

/// The most values an `in` filter may list: every change of the table is compared
/// with them while the hub's lock is held.
pub const MAX_IN_VALUES: usize = 1000;

/// A validated filter.
#[derive(Debug, Clone)]
pub struct RowFilter {
    pub column: String,
    pub op: FilterOp,
    values: Vec<Value>,
    /// Canonical text: subscriptions with equal filters share one stream.
    pub canonical: String,
}

/// What a filtered subscriber receives for one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// The row matched before and not after: send a delete.
    SendLeft,
    Skip,
}

impl RowFilter {
    /// Checks a filter against the table's columns. Filters on columns outside the
    /// primary key are refused: the log stores only an update's changed columns.
    pub fn new(
        spec: FilterSpec,
        key_columns: &[String],
        filter_columns: &[String],
        columns: &[String],
    ) -> Result<RowFilter, FilterError> {
        if !columns.contains(&spec.column) {
            return Err(FilterError::UnknownColumn(spec.column));
        }
        if !key_columns.contains(&spec.column) && !filter_columns.contains(&spec.column) {
            return Err(FilterError::NotFilterable(spec.column));
        }
        let values = match (spec.op, spec.value) {
            (FilterOp::In, Value::Array(values)) if values.len() > MAX_IN_VALUES => {
                return Err(FilterError::BadValue("in", "at most 1,000 values"))
            }
            (FilterOp::In, Value::Array(values)) if values.iter().all(is_scalar) => values,
            (FilterOp::In, _) => return Err(FilterError::BadValue("in", "an array of scalars")),
            (FilterOp::Eq | FilterOp::Neq, v) if is_scalar(&v) && !v.is_null() => vec![v],
            (FilterOp::Eq | FilterOp::Neq, _) => {
                return Err(FilterError::BadValue(
                    "eq/neq",
                    "a string, number or boolean",
                ))
            }
            (_, v @ (Value::Number(_) | Value::String(_))) => vec![v],
            (_, _) => {
                return Err(FilterError::BadValue(
                    "lt/lte/gt/gte",
                    "a number or a string",
                ))
            }
        };
        let canonical =
            serde_json::json!([spec.column, format!("{:?}", spec.op), values]).to_string();
        Ok(RowFilter {
            column: spec.column,
            op: spec.op,
            values,
            canonical,
        })
    }

    /// Whether a JSON value (raw text) of the column passes. NULL passes nothing.
    pub fn matches_raw(&self, raw: Option<&RawValue>) -> bool {
        let Some(raw) = raw else { return false };
        let Ok(value) = serde_json::from_str::<Value>(raw.get()) else {
            return false;
        };
        self.matches(&value)
    }

    pub fn matches(&self, value: &Value) -> bool {
        if value.is_null() {
            return false;
        }
        match self.op {
            FilterOp::Eq => json_eq(value, &self.values[0]),
            FilterOp::Neq => !json_eq(value, &self.values[0]) && comparable(value, &self.values[0]),
            FilterOp::In => self.values.iter().any(|v| json_eq(value, v)),
            FilterOp::Lt => compare(value, &self.values[0]) == Some(Ordering::Less),
            FilterOp::Lte => matches!(
                compare(value, &self.values[0]),
                Some(Ordering::Less | Ordering::Equal)
            ),
            FilterOp::Gt => compare(value, &self.values[0]) == Some(Ordering::Greater),
            FilterOp::Gte => matches!(
                compare(value, &self.values[0]),
                Some(Ordering::Greater | Ordering::Equal)
            ),
        }
    }

    /// What a subscriber with this filter gets for a change.
    pub fn verdict(&self, op: Op, entry: &Entry<'_>) -> Verdict {
        match op {
            // They concern every row.
            Op::Truncate | Op::Schema => Verdict::Send,
            Op::Insert => {
                self.send_if(self.matches_raw(entry.column(op, ColumnSide::New, &self.column)))
            }
            Op::Delete => {
                self.send_if(self.matches_raw(entry.column(op, ColumnSide::Old, &self.column)))
            }
            Op::Update => {
                let old = entry.column(op, ColumnSide::Old, &self.column);
                let new = entry.column(op, ColumnSide::New, &self.column);
                if old.is_none() || new.is_none() {
                    // The change does not carry the column (its filter declaration
                    // was dropped after the subscription began): send rather than
                    // guess. Filters narrow traffic; privileges, not filters, guard rows.
                    return Verdict::Send;
                }
                match (self.matches_raw(old), self.matches_raw(new)) {
                    (_, true) => Verdict::Send,
                    (true, false) => Verdict::SendLeft,
                    (false, false) => Verdict::Skip,
                }
            }
        }
    }

    fn send_if(&self, yes: bool) -> Verdict {
        if yes {
            Verdict::Send
        } else {
            Verdict::Skip
        }
    }
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

fn comparable(a: &Value, b: &Value) -> bool {
    matches!(
        (a, b),
        (Value::String(_), Value::String(_))
            | (Value::Number(_), Value::Number(_))
            | (Value::Bool(_), Value::Bool(_))
    )
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => compare(a, b) == Some(Ordering::Equal),
        _ => a == b,
    }
}

/// Numbers compare exactly by value (as decimals, whatever their size or precision),
/// strings by code point; other pairs do not compare.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => compare_decimal(&x.to_string(), &y.to_string()),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// A JSON number as sign, significant digits and the power of ten of the last digit.
struct Decimal {
    negative: bool,
    digits: Vec<u8>,
    exponent: i64,
}

fn parse_decimal(text: &str) -> Option<Decimal> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
    let mut exponent = exponent.checked_sub(frac.len() as i64)?;
    while digits.last() == Some(&0) {
        digits.pop();
        exponent += 1;
    }
    let leading = digits.iter().take_while(|d| **d == 0).count();
    digits.drain(..leading);
    Some(Decimal {
        negative: negative && !digits.is_empty(),
        digits,
        exponent,
    })
}

fn compare_decimal(a: &str, b: &str) -> Option<Ordering> {
    let (a, b) = (parse_decimal(a)?, parse_decimal(b)?);
    let abs = |x: &Decimal, y: &Decimal| -> Ordering {
        match (x.digits.is_empty(), y.digits.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        // Position of the leading digit decides first, then the digits themselves.
        let top = |d: &Decimal| d.digits.len() as i64 + d.exponent;
        top(x).cmp(&top(y)).then_with(|| {
            let len = x.digits.len().max(y.digits.len());
            (0..len)
                .map(|i| {
                    (
                        x.digits.get(i).copied().unwrap_or(0),
                        y.digits.get(i).copied().unwrap_or(0),
                    )
                })
                .map(|(p, q)| p.cmp(&q))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
    };
    Some(match (a.negative, b.negative) {
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
        (false, false) => abs(&a, &b),
        (true, true) => abs(&b, &a),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(op: &str, value: Value) -> RowFilter {
        let spec: FilterSpec =
            serde_json::from_value(json!({"column": "m", "op": op, "value": value})).unwrap();
        RowFilter::new(spec, &["m".into()], &[], &["m".into(), "s".into()]).unwrap()
    }

    #[test]
    fn ops_compare_json_values() {
        assert!(filter("eq", json!(3)).matches(&json!(3)));
        assert!(filter("eq", json!(3)).matches(&json!(3.0)));
        assert!(!filter("eq", json!(3)).matches(&json!("3")));
        assert!(filter("neq", json!(3)).matches(&json!(4)));
        assert!(!filter("neq", json!(3)).matches(&Value::Null));
        assert!(filter("in", json!([1, 2, "x"])).matches(&json!("x")));
        assert!(!filter("in", json!([1, 2])).matches(&json!(3)));
        assert!(filter("lt", json!(10)).matches(&json!(9.5)));
        assert!(filter("lte", json!(10)).matches(&json!(10)));
        assert!(!filter("gt", json!(10)).matches(&json!(10)));
        assert!(filter("gte", json!("b")).matches(&json!("c")));
        assert!(!filter("gt", json!(1)).matches(&json!("2")));
        assert!(filter("eq", json!(9007199254740993_i64)).matches(&json!(9007199254740993_i64)));
        assert!(!filter("eq", json!(9007199254740993_i64)).matches(&json!(9007199254740992_i64)));
    }

    #[test]
    fn numbers_compare_exactly() {
        let n = |t: &str| -> Value { serde_json::from_str(t).unwrap() };
        assert_eq!(
            compare(&n("12345678901234567890.1"), &n("12345678901234567890.2")),
            Some(Ordering::Less)
        );
        assert_eq!(compare(&n("1e2"), &n("100.0")), Some(Ordering::Equal));
        assert_eq!(compare(&n("-0"), &n("0.000")), Some(Ordering::Equal));
        assert_eq!(compare(&n("-1.5"), &n("-1.25")), Some(Ordering::Less));
        assert_eq!(compare(&n("0.001"), &n("1E-3")), Some(Ordering::Equal));
        assert_eq!(
            compare(&n("99999999999999999999"), &n("100000000000000000000")),
            Some(Ordering::Less)
        );
        assert_eq!(compare(&n("2"), &n("10")), Some(Ordering::Less));
        assert_eq!(compare(&n("-3"), &n("2")), Some(Ordering::Less));
    }

    #[test]
    fn refuses_what_it_cannot_evaluate() {
        let spec = |col: &str, op: &str, v: Value| -> FilterSpec {
            serde_json::from_value(json!({"column": col, "op": op, "value": v})).unwrap()
        };
        let key = ["m".to_string()];
        let cols = ["m".to_string(), "s".to_string()];
        assert!(matches!(
            RowFilter::new(spec("x", "eq", json!(1)), &key, &[], &cols),
            Err(FilterError::UnknownColumn(_))
        ));
        assert!(matches!(
            RowFilter::new(spec("s", "eq", json!(1)), &key, &[], &cols),
            Err(FilterError::NotFilterable(_))
        ));
        assert!(RowFilter::new(spec("s", "eq", json!(1)), &key, &["s".to_string()], &cols).is_ok());
        assert!(matches!(
            RowFilter::new(spec("m", "in", json!(1)), &key, &[], &cols),
            Err(FilterError::BadValue(..))
        ));
        assert!(matches!(
            RowFilter::new(spec("m", "lt", json!(true)), &key, &[], &cols),
            Err(FilterError::BadValue(..))
        ));
        assert!(matches!(
            RowFilter::new(spec("m", "eq", Value::Null), &key, &[], &cols),
            Err(FilterError::BadValue(..))
        ));
    }

    #[test]
    fn an_update_leaving_the_filter_becomes_a_delete() {
        let f = filter("eq", json!(3));
        let raw =
            RawValue::from_string(r#"[{"m": 3}, {"m": 3, "s": 1}, {"m": 4, "s": 1}, 5]"#.into())
                .unwrap();
        // (A key change is logged as delete + insert; this entry only exercises the sides.)
        let entry = Entry::parse(&raw).unwrap();
        assert_eq!(f.verdict(Op::Update, &entry), Verdict::SendLeft);
        let raw = RawValue::from_string(r#"[{"m": 3}, {"s": 1}, {"s": 2}, 5]"#.into()).unwrap();
        let entry = Entry::parse(&raw).unwrap();
        assert_eq!(f.verdict(Op::Update, &entry), Verdict::Send);
        assert_eq!(
            filter("eq", json!(4)).verdict(Op::Update, &entry),
            Verdict::Skip
        );
    }

    #[test]
    fn an_update_not_carrying_the_column_is_sent() {
        let f = RowFilter::new(
            serde_json::from_value(json!({"column": "s", "op": "eq", "value": 1})).unwrap(),
            &["m".into()],
            &["s".into()],
            &["m".into(), "s".into()],
        )
        .unwrap();
        let raw = RawValue::from_string(r#"[{"m": 3}, {"t": 1}, {"t": 2}, 5]"#.into()).unwrap();
        let entry = Entry::parse(&raw).unwrap();
        assert_eq!(f.verdict(Op::Update, &entry), Verdict::Send);
        // With the unchanged value as capture stores it for a filter column: decided.
        let raw =
            RawValue::from_string(r#"[{"m": 3}, {"t": 1}, {"t": 2}, 5, {"s": 2}]"#.into()).unwrap();
        let entry = Entry::parse(&raw).unwrap();
        assert_eq!(f.verdict(Op::Update, &entry), Verdict::Skip);
        let raw = RawValue::from_string(r#"[{"m": 3}, {"s": 1}, {"s": 2}, 5]"#.into()).unwrap();
        let entry = Entry::parse(&raw).unwrap();
        assert_eq!(f.verdict(Op::Update, &entry), Verdict::SendLeft);
    }
}
