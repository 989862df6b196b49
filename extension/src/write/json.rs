//! jsonb read into `serde_json` values without serde_json's nesting limit.
//!
//! pgrx's `JsonB` parses with serde_json's default limit of 128 levels: a row
//! holding a value nested deeper (legal jsonb, written by plain SQL) made every
//! `livesync.write` to it fail with XX000, even writes of other columns. `Json`
//! parses any depth up to `MAX_DEPTH` (checked first, so the recursive parse cannot
//! exhaust the stack) and refuses deeper values with 54000 and a clear message.

use crate::error::LivesyncError;
use pgrx::pg_sys;
use pgrx::{FromDatum, IntoDatum, JsonB};
use serde::Deserialize;
use serde_json::Value;

/// The deepest nesting livesync reads. Far beyond any document users write; each
/// level costs a few hundred bytes of stack in the recursive parse and drop.
pub const MAX_DEPTH: usize = 2000;

/// A jsonb value as `serde_json` sees it.
pub struct Json(pub Value);

impl FromDatum for Json {
    /// # Safety
    /// `datum` must be a jsonb value unless `is_null`.
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: a non-null jsonb (the caller's contract) is what jsonb_out takes;
        // it returns a palloc'd NUL-terminated string.
        let text = unsafe {
            let cstring = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(datum)])
                .expect("jsonb_out returns text");
            std::ffi::CStr::from_ptr(cstring.cast_mut_ptr::<std::ffi::c_char>())
        };
        Some(Json(parse(text.to_str().expect("jsonb text is UTF-8"))))
    }
}

impl IntoDatum for Json {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        JsonB(self.0).into_datum()
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

/// Parses jsonb's text form; raises 54000 when it nests deeper than `MAX_DEPTH`.
pub fn parse(text: &str) -> Value {
    let depth = nesting(text);
    if depth > MAX_DEPTH {
        LivesyncError::NestedTooDeep {
            depth,
            max: MAX_DEPTH,
        }
        .raise();
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    deserializer.disable_recursion_limit();
    Value::deserialize(&mut deserializer)
        .unwrap_or_else(|e| crate::error::internal(format!("jsonb text did not parse: {e}")))
}

/// The deepest nesting of arrays and objects in JSON text (strings skipped).
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for byte in text.bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::nesting;

    #[test]
    fn nesting_counts_arrays_and_objects_but_not_strings() {
        assert_eq!(nesting("1"), 0);
        assert_eq!(nesting(r#"{"a": [1, {"b": []}]}"#), 4);
        assert_eq!(nesting(r#"["[[[", "\"[[" ]"#), 1);
    }
}
