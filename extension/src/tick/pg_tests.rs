//! `snapshot_xmax_xip`, which reads a `pg_snapshot` value's bytes by hand (the tick
//! stores one per tick and reads the previous one back), checked against
//! PostgreSQL's own `pg_snapshot_xmax` and `pg_snapshot_xip`.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use super::super::snapshot_xmax_xip;
    use crate::pg_test_support::{text, with_row, Column};
    use pgrx::prelude::*;
    use std::ffi::CString;

    /// What Postgres says of the `pg_snapshot` that `source` (an expression over
    /// `from`) yields, checked against what the parser reads from its datum.
    /// Returns the datum's xip count (for the callers' own checks).
    fn check(source: &str, from: &str) -> usize {
        let query = format!(
            "SELECT s, pg_snapshot_xmax(s)::text,
                    array_to_string(ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x), ',')
             FROM (SELECT {source} AS s {from}) q"
        );
        with_row(&query, |columns| {
            let [snapshot, xmax, xip] = columns else {
                unreachable!("three columns")
            };
            let expected = expected(xmax, xip);
            // SAFETY: a non-null pg_snapshot datum, valid while `with_row` is connected.
            let parsed = unsafe { snapshot_xmax_xip(snapshot.datum) };
            assert_eq!(parsed, expected, "{source} {from}");
            expected.1.len()
        })
    }

    fn expected(xmax: &Column, xip: &Column) -> (u64, Vec<u64>) {
        parse_expected(&text(xmax).expect("xmax"), &text(xip).expect("xip"))
    }

    /// `pg_snapshot_xmax` and the comma-joined `pg_snapshot_xip`, as text.
    fn parse_expected(xmax: &str, xip: &str) -> (u64, Vec<u64>) {
        let xip = xip
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().expect("a u64 xid"))
            .collect();
        (xmax.parse().expect("a u64 xmax"), xip)
    }

    /// The snapshot `text` parsed both from a query result (which stores a short
    /// value with a 1-byte header) and straight from `pg_snapshot_in` (4-byte header,
    /// as `pg_current_snapshot` returns it to the tick).
    fn check_literal(text: &str) {
        check(&format!("'{text}'::pg_snapshot"), "");
        let input = CString::new(text).expect("no NUL");
        // SAFETY: pg_snapshot_in takes a C string and returns a palloc'd pg_snapshot.
        let datum = unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::pg_snapshot_in,
                &[Some(pg_sys::Datum::from(input.as_ptr()))],
            )
            .expect("pg_snapshot_in returns a value")
        };
        let fields = Spi::get_two_with_args::<String, String>(
            "SELECT pg_snapshot_xmax($1::pg_snapshot)::text,
                    array_to_string(ARRAY(SELECT x::text FROM pg_snapshot_xip($1::pg_snapshot) x), ',')",
            &[text.into()],
        )
        .expect("pg_snapshot_xmax, pg_snapshot_xip");
        let expected = parse_expected(&fields.0.expect("xmax"), &fields.1.expect("xip"));
        // SAFETY: a pg_snapshot datum just built.
        assert_eq!(unsafe { snapshot_xmax_xip(datum) }, expected, "{text}");
    }

    #[pg_test]
    fn reads_hand_picked_snapshots() {
        for text in [
            "1:1:",
            "10:20:",
            "10:20:10",
            "10:20:19",
            "10:20:10,11,19",
            // Duplicates are dropped by Postgres's input; the reader sees what is stored.
            "10:20:11,11,12",
            // Full transaction ids past the first epoch, and near the top of the range.
            // (An xmin or xmax whose low 32 bits are 0 is not a valid snapshot.)
            "4294967297:4294967400:4294967297,4294967399",
            "9223372036854775000:9223372036854775807:9223372036854775001",
            "18446744073709551000:18446744073709551615:18446744073709551001,18446744073709551614",
        ] {
            check_literal(text);
        }
    }

    /// Many snapshots of random shape: xmin, a span, and a sorted xip list in it.
    #[pg_test]
    fn reads_random_snapshots() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64*: a fixed sequence, so a failure can be reproduced.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for round in 0..300 {
            let valid = |xid: u64| if xid as u32 == 0 { xid + 1 } else { xid };
            let xmin = valid(3 + next() % (1 << (8 + round % 50)));
            let xmax = valid(xmin + next() % 5000);
            let span = xmax - xmin;
            let mut xip: Vec<u64> = if span == 0 {
                Vec::new()
            } else {
                (0..next() % 40).map(|_| xmin + next() % span).collect()
            };
            xip.sort_unstable();
            let list: Vec<String> = xip.iter().map(u64::to_string).collect();
            check_literal(&format!("{xmin}:{xmax}:{}", list.join(",")));
        }
    }

    #[pg_test]
    fn reads_the_current_snapshot() {
        check("pg_current_snapshot()", "");
        // SAFETY: as the tick calls it, with the test's active snapshot.
        let datum = unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::pg_current_snapshot, &[])
                .expect("pg_current_snapshot returns a value")
        };
        // What Postgres prints of that very datum ("xmin:xmax:xip"): a second
        // pg_current_snapshot() could see another transaction end meanwhile.
        // SAFETY: pg_snapshot_out takes the pg_snapshot datum just built and returns a
        // palloc'd C string.
        let printed = unsafe {
            let out = pgrx::direct_function_call_as_datum(pg_sys::pg_snapshot_out, &[Some(datum)])
                .expect("pg_snapshot_out returns a value");
            std::ffi::CStr::from_ptr(out.cast_mut_ptr::<std::ffi::c_char>())
                .to_str()
                .expect("a snapshot prints as ASCII")
                .to_owned()
        };
        let mut parts = printed.split(':');
        let (_xmin, xmax, xip) = (
            parts.next(),
            parts.next().expect("an xmax"),
            parts.next().unwrap_or(""),
        );
        // SAFETY: a pg_snapshot datum just built.
        let parsed = unsafe { snapshot_xmax_xip(datum) };
        assert_eq!(parsed, parse_expected(xmax, xip), "{printed}");
    }

    /// Snapshots as a table stores them (the tick keeps its own in
    /// `livesync._sequencer`): with a 1-byte header, compressed inline, compressed
    /// out of line, and out of line uncompressed.
    #[pg_test]
    fn reads_stored_snapshots() {
        Spi::run(
            "CREATE TABLE livesync_t_snapshots (id int PRIMARY KEY, s pg_snapshot, s_ext pg_snapshot);
             ALTER TABLE livesync_t_snapshots ALTER s_ext SET STORAGE EXTERNAL;
             INSERT INTO livesync_t_snapshots
             SELECT id, snapshot, snapshot FROM (
                 SELECT id, (xmin || ':' || xmax || ':' || string_agg(x::text, ',' ORDER BY x))::pg_snapshot
                 FROM (VALUES (1, 10, 20, 1), (2, 1000, 1500, 1), (3, 1000, 200000, 7))
                      v(id, xmin, xmax, step),
                      generate_series(xmin + 5, xmax - 1, step) x
                 GROUP BY id, xmin, xmax) s(id, snapshot);",
        )
        .expect("setup");
        for (id, xips) in [
            (1, (15..20).count()),
            (2, (1005..1500).count()),
            (3, (1005..200_000).step_by(7).count()),
        ] {
            for column in ["s", "s_ext"] {
                let from = format!("FROM livesync_t_snapshots WHERE id = {id}");
                assert_eq!(check(column, &from), xips, "{column} of row {id}");
            }
        }
        with_row(
            "SELECT a.s, b.s, c.s, c.s_ext
             FROM livesync_t_snapshots a, livesync_t_snapshots b, livesync_t_snapshots c
             WHERE a.id = 1 AND b.id = 2 AND c.id = 3",
            |columns| {
                let varlena = |i: usize| columns[i].datum.cast_mut_ptr::<pg_sys::varlena>();
                // SAFETY: non-null varlena datums, valid while `with_row` is connected.
                unsafe {
                    assert!(
                        pgrx::varlena::varatt_is_1b(varlena(0))
                            && !pgrx::varlena::varatt_is_1b_e(varlena(0)),
                        "a small snapshot is stored with a 1-byte header"
                    );
                    assert!(
                        pgrx::varlena::varatt_is_4b_c(varlena(1)),
                        "compressed inline"
                    );
                    assert!(
                        pgrx::varlena::varatt_is_1b_e(varlena(2)),
                        "compressed, out of line"
                    );
                    assert!(pgrx::varlena::varatt_is_1b_e(varlena(3)), "out of line");
                }
            },
        );
    }
}
