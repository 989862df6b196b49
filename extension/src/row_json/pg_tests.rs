//! `same_column` / `same_image` (capture's "did this column change") checked against
//! PostgreSQL itself: its `datum_image_eq`, which they re-implement, and `IS NOT
//! DISTINCT FROM`, which they deliberately differ from where equal values are
//! stored differently (a replica must see `1.0` become `1.00`).

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use super::super::same_column;
    use crate::pg_test_support::with_row;
    use pgrx::prelude::*;

    unsafe extern "C-unwind" {
        // utils/datum.h; pgrx does not bind it.
        fn datum_image_eq(
            value1: pg_sys::Datum,
            value2: pg_sys::Datum,
            typ_by_val: bool,
            typ_len: std::ffi::c_int,
        ) -> bool;
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Expect {
        /// Equal, and stored identically.
        Same,
        /// Not equal.
        Different,
        /// Equal (`IS NOT DISTINCT FROM`), but stored differently: a change.
        EqualStoredDifferently,
        /// Equal; whether the images match depends on the platform (NaN bits).
        EqualAnyImage,
        /// A type without `=`: only the images are compared.
        Image(bool),
    }
    use Expect::*;

    /// Two expressions of one type, over an optional FROM clause.
    struct Case {
        a: &'static str,
        b: &'static str,
        from: &'static str,
        expect: Expect,
    }

    const fn case(a: &'static str, b: &'static str, expect: Expect) -> Case {
        Case {
            a,
            b,
            from: "",
            expect,
        }
    }

    const fn stored(a: &'static str, b: &'static str, from: &'static str, expect: Expect) -> Case {
        Case { a, b, from, expect }
    }

    const BIG: &str =
        "FROM livesync_t_big x1, livesync_t_big x2, livesync_t_big x3, livesync_t_big x4 \
         WHERE x1.id = 1 AND x2.id = 2 AND x3.id = 3 AND x4.id = 4";

    const CASES: &[Case] = &[
        // pass by value
        case("1::int2", "1::int2", Same),
        case("1::int2", "-1::int2", Different),
        case("70000::int4", "70000::int4", Same),
        case("70000::int4", "70001::int4", Different),
        case(
            "(-9223372036854775808)::int8",
            "(-9223372036854775808)::int8",
            Same,
        ),
        case(
            "(-9223372036854775808)::int8",
            "9223372036854775807::int8",
            Different,
        ),
        case("true", "true", Same),
        case("true", "false", Different),
        case("'a'::\"char\"", "'a'::\"char\"", Same),
        case("'2024-02-29'::date", "'2024-02-29'::date", Same),
        case("1.5::float8", "1.5::float8", Same),
        case("'0'::float8", "'-0'::float8", EqualStoredDifferently),
        case("'0'::float4", "'-0'::float4", EqualStoredDifferently),
        case("'NaN'::float8", "'NaN'::float8", Same),
        case("'NaN'::float4", "'NaN'::float4", Same),
        case("'Infinity'::float8", "'Infinity'::float8", Same),
        case("'Infinity'::float8", "'-Infinity'::float8", Different),
        case(
            "'Infinity'::float8 - 'Infinity'::float8",
            "'NaN'::float8",
            EqualAnyImage,
        ),
        case(
            "'2024-01-01 00:00:00+00'::timestamptz",
            "'2024-01-01 01:00:00+01'::timestamptz",
            Same,
        ),
        case(
            "'2024-01-01 00:00:00+00'::timestamptz",
            "'2024-01-01 00:00:00.000001+00'::timestamptz",
            Different,
        ),
        case(
            "'2024-01-01 00:00'::timestamp",
            "'2024-01-01 00:00'::timestamp",
            Same,
        ),
        // fixed length, by reference
        case(
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
            "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid",
            Same,
        ),
        case(
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid",
            "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12'::uuid",
            Different,
        ),
        case("'abc'::name", "'abc'::name", Same),
        case("'abc'::name", "'abd'::name", Different),
        case("'1 day'::interval", "'1 day'::interval", Same),
        case(
            "'1 day'::interval",
            "'24 hours'::interval",
            EqualStoredDifferently,
        ),
        case(
            "'1 mon'::interval",
            "'30 days'::interval",
            EqualStoredDifferently,
        ),
        case("'(1,2)'::point", "'(1,2)'::point", Image(true)),
        case("'(1,2)'::point", "'(1,3)'::point", Image(false)),
        // C strings
        case("'abc'::cstring", "'abc'::cstring", Image(true)),
        case("'abc'::cstring", "'abcd'::cstring", Image(false)),
        // numeric
        case("1.0::numeric", "1.0::numeric", Same),
        case("1.0::numeric", "1.00::numeric", EqualStoredDifferently),
        case("1::numeric", "1.0::numeric", EqualStoredDifferently),
        case("'1e3'::numeric", "1000::numeric", Same),
        case("'-0'::numeric", "0::numeric", Same),
        case("'-0.0'::numeric", "0.0::numeric", Same),
        case("'NaN'::numeric", "'NaN'::numeric", Same),
        case("'NaN'::numeric", "'Infinity'::numeric", Different),
        case(
            "12345678901234567890.123456789012345678901234567890::numeric",
            "12345678901234567890.123456789012345678901234567890::numeric",
            Same,
        ),
        case("0.1::numeric", "0.10000000000000000001::numeric", Different),
        // text and collations
        case("'abc'::text", "'abc'::text", Same),
        case("''::text", "''::text", Same),
        case("'abc'::text", "'abd'::text", Different),
        case("'abc'::text", "'abc '::text", Different),
        case("'a' COLLATE \"C\"", "'A' COLLATE \"C\"", Different),
        case(
            "'a' COLLATE livesync_t_ci",
            "'A' COLLATE livesync_t_ci",
            EqualStoredDifferently,
        ),
        case(
            "'a' COLLATE livesync_t_ci",
            "'b' COLLATE livesync_t_ci",
            Different,
        ),
        case("'é'::text", "'é'::text", Same),
        case("'a'::char(3)", "'a  '::char(3)", Same),
        case("'a'::char(3)", "'a'::char(5)", EqualStoredDifferently),
        case("'a '::varchar", "'a'::varchar", Different),
        // bytea
        case("'\\x'::bytea", "'\\x'::bytea", Same),
        case("'\\x00'::bytea", "'\\x0000'::bytea", Different),
        case("'\\xdeadbeef'::bytea", "'\\xDEADBEEF'::bytea", Same),
        case("'\\xdeadbeef'::bytea", "'\\xdeadbeee'::bytea", Different),
        // jsonb and json
        case(
            "'{\"a\":1,\"b\":2}'::jsonb",
            "'{\"b\": 2, \"a\": 1}'::jsonb",
            Same,
        ),
        case("'{\"a\":1,\"a\":2}'::jsonb", "'{\"a\":2}'::jsonb", Same),
        case(
            "'{\"a\":1}'::jsonb",
            "'{\"a\":1.0}'::jsonb",
            EqualStoredDifferently,
        ),
        case("'[1,2]'::jsonb", "'[2,1]'::jsonb", Different),
        case("'null'::jsonb", "'null'::jsonb", Same),
        case("'{\"a\":1}'::json", "'{\"a\":1}'::json", Image(true)),
        case("'{\"a\":1}'::json", "'{\"a\": 1}'::json", Image(false)),
        // arrays
        case("ARRAY[1,2]", "ARRAY[1,2]", Same),
        case("ARRAY[1,2]", "ARRAY[2,1]", Different),
        case("'{}'::int[]", "'{}'::int[]", Same),
        case("'{1,NULL}'::int[]", "'{1,NULL}'::int[]", Same),
        case("'{1,NULL}'::int[]", "'{1,2}'::int[]", Different),
        case("'[0:1]={1,2}'::int[]", "'{1,2}'::int[]", Different),
        case("ARRAY[[1,2],[3,4]]", "ARRAY[1,2,3,4]", Different),
        case("ARRAY[1.0]", "ARRAY[1.00]", EqualStoredDifferently),
        case("ARRAY['a','b']", "ARRAY['a','b']", Same),
        // composite, range, others
        case("ROW(1, 'a')", "ROW(1, 'a')", Same),
        case("ROW(1, 'a')", "ROW(1, 'b')", Different),
        case(
            "ROW(1.0, 'a')::livesync_t_pair",
            "ROW(1.00, 'a')::livesync_t_pair",
            EqualStoredDifferently,
        ),
        case(
            "ROW(1, NULL)::livesync_t_pair",
            "ROW(1, NULL)::livesync_t_pair",
            Same,
        ),
        case("'[1,3)'::int4range", "'[1,2]'::int4range", Same),
        case("'empty'::int4range", "'[1,1)'::int4range", Same),
        case("'10.0.0.1'::inet", "'10.0.0.1/32'::inet", Same),
        case("'a b'::tsvector", "'b a'::tsvector", Same),
        // NULLs: a column that stays NULL has not changed
        case("NULL::int", "NULL::int", Same),
        case("NULL::text", "'a'::text", Different),
        case("'a'::text", "NULL::text", Different),
        case("NULL::jsonb", "'null'::jsonb", Different),
        // stored forms: toast pointers, compression, short headers
        stored("x1.t", "x1.t", BIG, Same),
        stored("x1.t", "x2.t", BIG, Same),
        stored("x1.t", "x3.t", BIG, Different),
        stored("x1.t", "x4.t", BIG, Different),
        stored("x1.t", "repeat('x', 100000)", BIG, Same),
        stored("x1.j", "x2.j", BIG, Same),
        stored("x1.j", "x4.j", BIG, Different),
        stored("x1.c", "x2.c", BIG, Same),
        stored("x1.c", "repeat('ab', 3000)", BIG, Same),
        stored("x1.c", "x3.c", BIG, Different),
        stored("x1.s", "'abc'::text", BIG, Same),
        stored("x1.s", "x3.s", BIG, Different),
        stored("x1.b", "x2.b", BIG, Same),
        stored("x1.b", "x4.b", BIG, Different),
    ];

    fn setup() {
        Spi::run(
            "CREATE COLLATION livesync_t_ci
                 (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TYPE livesync_t_pair AS (n numeric, t text);
             -- t: out of line, uncompressed; c: compressed inline; j, b: toasted as
             -- the defaults choose; s: short enough for a 1-byte header.
             CREATE TABLE livesync_t_big (id int PRIMARY KEY, t text, c text, j jsonb, b bytea, s text);
             ALTER TABLE livesync_t_big ALTER t SET STORAGE EXTERNAL;
             INSERT INTO livesync_t_big
             SELECT id, t, c,
                    (SELECT jsonb_agg(CASE WHEN id = 4 AND i = 5000 THEN -i ELSE i END)
                     FROM generate_series(1, 5000) i),
                    convert_to(t, 'UTF8'), s
             FROM (VALUES
                 (1, repeat('x', 100000), repeat('ab', 3000), 'abc'),
                 (2, repeat('x', 100000), repeat('ab', 3000), 'abc'),
                 (3, repeat('y', 100000), repeat('ba', 3000), 'abd'),
                 (4, repeat('x', 99999) || 'y', repeat('ab', 2999) || 'ba', 'abc')
             ) v(id, t, c, s);",
        )
        .expect("setup");
    }

    /// Checks one case; `None` when it holds, else what went wrong.
    fn check(case: &Case) -> Option<String> {
        let equal = match case.expect {
            Image(_) => "NULL::bool".to_string(),
            _ => format!("({}) IS NOT DISTINCT FROM ({})", case.a, case.b),
        };
        let query = format!("SELECT {}, {}, {equal} {}", case.a, case.b, case.from);
        let what = format!("{} vs {}", case.a, case.b);
        with_row(&query, |columns| {
            let [a, b, equal] = columns else {
                unreachable!("three columns")
            };
            assert_eq!(a.type_oid, b.type_oid, "{what}: not of one type");
            // SAFETY: both datums are valid values of one type, described by its
            // typbyval and typlen, while `with_row` is connected.
            let ours = unsafe {
                same_column(
                    (a.datum, a.is_null),
                    (b.datum, b.is_null),
                    a.by_value,
                    a.len,
                )
            };
            if !a.is_null && !b.is_null {
                // SAFETY: as above.
                let postgres = unsafe {
                    datum_image_eq(a.datum, b.datum, a.by_value, std::ffi::c_int::from(a.len))
                };
                if ours != postgres {
                    return Some(format!(
                        "{what}: same_image says {ours}, datum_image_eq {postgres}"
                    ));
                }
            }
            let equal = (!equal.is_null).then(|| equal.datum.value() != 0);
            let expected = match case.expect {
                Same => (true, Some(true)),
                Different => (false, Some(false)),
                EqualStoredDifferently => (false, Some(true)),
                EqualAnyImage => (ours, Some(true)),
                Image(same) => (same, None),
            };
            (expected != (ours, equal)).then(|| {
                format!(
                    "{what}: expected {:?}, got same_column {ours}, IS NOT DISTINCT FROM {equal:?}",
                    case.expect
                )
            })
        })
    }

    #[pg_test]
    fn same_column_agrees_with_postgres_on_many_types() {
        setup();
        let failures: Vec<String> = CASES.iter().filter_map(check).collect();
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n{}",
            failures.len(),
            CASES.len(),
            failures.join("\n")
        );
    }

    /// The stored-form cases read what they mean to (else they would test nothing
    /// new): an out-of-line toast pointer, a compressed inline value, a 1-byte header.
    #[pg_test]
    fn the_stored_forms_are_the_intended_ones() {
        setup();
        with_row(
            "SELECT t, c, s FROM livesync_t_big WHERE id = 1",
            |columns| {
                let [t, c, s] = columns else {
                    unreachable!("three columns")
                };
                let varlena = |column: &crate::pg_test_support::Column| {
                    column.datum.cast_mut_ptr::<pg_sys::varlena>()
                };
                // SAFETY: non-null varlena datums, valid while `with_row` is connected.
                unsafe {
                    assert!(
                        pgrx::varlena::varatt_is_1b_e(varlena(t)),
                        "t is out of line"
                    );
                    assert!(pgrx::varlena::varatt_is_4b_c(varlena(c)), "c is compressed");
                    assert!(
                        pgrx::varlena::varatt_is_1b(varlena(s))
                            && !pgrx::varlena::varatt_is_1b_e(varlena(s)),
                        "s has a 1-byte header"
                    );
                }
            },
        );
    }

    /// A value with a 1-byte header and the same value with a 4-byte one (as a
    /// function builds it) are the same. (Query results always carry short values
    /// with 1-byte headers, so the cases above cannot compare these.)
    #[pg_test]
    fn short_and_long_headers_of_one_value_are_the_same() {
        setup();
        let long = pgrx::varlena::rust_str_to_text_p("abc");
        let other = pgrx::varlena::rust_str_to_text_p("abd");
        with_row("SELECT s FROM livesync_t_big WHERE id = 1", |columns| {
            let short = &columns[0];
            for (value, same) in [(&long, true), (&other, false)] {
                let value = pg_sys::Datum::from(value.as_ptr());
                // SAFETY: two valid text datums, while `with_row` is connected.
                unsafe {
                    assert_eq!(
                        same_column((short.datum, false), (value, false), false, -1),
                        same
                    );
                    assert_eq!(datum_image_eq(short.datum, value, false, -1), same);
                }
            }
        });
    }
}
