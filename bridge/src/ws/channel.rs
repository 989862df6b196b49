//! Channel names: `table:<schema>.<table>`. Names are exact (no case folding); a part
//! containing `.` or `"` (or any character outside `[a-z0-9_]`) may be written in
//! double quotes with `""` for a quote, as in SQL: `table:"My Schema"."a.b"`.

use crate::changelog::TableName;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid channel {0:?}: expected table:<schema>.<table>")]
pub struct ChannelError(pub String);

/// Parses a `table:` channel into the table it names.
pub fn parse(channel: &str) -> Result<TableName, ChannelError> {
    let err = || ChannelError(channel.chars().take(200).collect());
    let rest = channel.strip_prefix("table:").ok_or_else(err)?;
    let (schema, rest) = identifier(rest).ok_or_else(err)?;
    let rest = rest.strip_prefix('.').ok_or_else(err)?;
    let (table, rest) = identifier(rest).ok_or_else(err)?;
    if !rest.is_empty() || schema.is_empty() || table.is_empty() {
        return Err(err());
    }
    Ok(TableName { schema, table })
}

/// One identifier from the start of `s`, and what follows it.
fn identifier(s: &str) -> Option<(String, &str)> {
    if let Some(quoted) = s.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if let Some((_, '"')) = chars.peek() {
                    chars.next();
                    name.push('"');
                } else {
                    return Some((name, &quoted[i + 1..]));
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let end = s.find(['.', '"']).unwrap_or(s.len());
        Some((s[..end].to_string(), &s[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(schema: &str, table: &str) -> TableName {
        TableName {
            schema: schema.into(),
            table: table.into(),
        }
    }

    #[test]
    fn plain_and_quoted_names() {
        assert_eq!(parse("table:public.todos"), Ok(name("public", "todos")));
        assert_eq!(parse("table:public.Todos"), Ok(name("public", "Todos")));
        assert_eq!(
            parse(r#"table:"my.schema"."a""b.c""#),
            Ok(name("my.schema", "a\"b.c"))
        );
        assert_eq!(
            parse(&format!(
                "table:public.{}",
                name("public", "x y").display().split('.').nth(1).unwrap()
            )),
            Ok(name("public", "x y"))
        );
        for bad in [
            "todos",
            "table:todos",
            "table:.x",
            "table:a.",
            "table:a.b.c",
            "table:\"a.b",
            "row:a.b",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_round_trips() {
        for n in [
            name("public", "todos"),
            name("My Schema", "a.b\"c"),
            name("s", "1x"),
        ] {
            assert_eq!(parse(&format!("table:{}", n.display())), Ok(n));
        }
    }
}
