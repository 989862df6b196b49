//! Clocks as docs/sql.md describes them: `"<unix ms>:<counter>[:<node>]"`, ordered
//! by wall time, then counter, then node.

use super::*;
use proptest::prelude::*;

const NOW: u64 = 1_764_072_000_000;
const SKEW: u64 = 60_000;

fn clock(wall_ms: u64, counter: u64, node: &str) -> Hlc {
    Hlc {
        wall_ms,
        counter,
        node: node.to_string(),
    }
}

fn parse(text: &str) -> Result<Hlc, WriteError> {
    Hlc::parse_at(text, "client", NOW, SKEW)
}

/// The text form a client sends.
fn format(clock: &Hlc) -> String {
    format!("{}:{}:{}", clock.wall_ms, clock.counter, clock.node)
}

#[test]
fn parses_the_documented_forms() {
    assert_eq!(
        parse("1764072000000:0:phone-1").unwrap(),
        clock(NOW, 0, "phone-1")
    );
    // The node defaults to the client's.
    assert_eq!(parse("5:7").unwrap(), clock(5, 7, "client"));
    // Everything after the second colon is the node.
    assert_eq!(parse("5:7:a:b").unwrap(), clock(5, 7, "a:b"));
}

#[test]
fn rejects_malformed_clocks_with_22023() {
    for text in [
        "",
        "5",
        "5:",
        ":5",
        "5:7:",
        "a:7",
        "5:b",
        "-5:7",
        "5:-7",
        " 5:7",
        "5 :7",
        "5.0:7",
        "18446744073709551616:0",
        "0:18446744073709551616",
    ] {
        let err = parse(text).expect_err(text);
        assert!(matches!(&err, WriteError::BadHlc(t) if t == text), "{text}");
        assert_eq!(err.sqlstate().code(), "22023");
        assert_eq!(err.to_string(), format!("invalid hlc \"{text}\""));
        assert!(err
            .hint()
            .is_some_and(|h| h.contains("<unix ms>:<counter>")));
    }
}

#[test]
fn a_wall_time_beyond_the_allowed_skew_is_clamped() {
    assert_eq!(
        parse(&format!("{}:3", NOW + SKEW)).unwrap().wall_ms,
        NOW + SKEW
    );
    assert_eq!(
        parse(&format!("{}:3", NOW + SKEW + 1)).unwrap().wall_ms,
        NOW + SKEW
    );
    assert_eq!(
        parse(&format!("{}:3", u64::MAX)).unwrap().wall_ms,
        NOW + SKEW
    );
    // The counter and node survive the clamp.
    assert_eq!(
        Hlc::parse_at("99:4:n", "c", 10, 0).unwrap(),
        clock(10, 4, "n")
    );
    // A skew so large that now + skew overflows does not wrap around.
    assert_eq!(
        Hlc::parse_at("99:4:n", "c", u64::MAX - 1, u64::MAX)
            .unwrap()
            .wall_ms,
        99
    );
}

#[test]
fn orders_by_wall_then_counter_then_node() {
    assert!(clock(2, 0, "a") > clock(1, 99, "z"));
    assert!(clock(1, 2, "a") > clock(1, 1, "z"));
    assert!(clock(1, 1, "b") > clock(1, 1, "a"));
    assert!(clock(1, 1, "b") > clock(1, 1, ""));
}

#[test]
fn a_server_stamp_is_now_when_the_row_holds_no_later_clock() {
    let seen = [clock(NOW - 5, 9, "x")];
    assert_eq!(
        Hlc::stamp(NOW, seen.into_iter(), "srv"),
        clock(NOW, 0, "srv")
    );
    assert_eq!(
        Hlc::stamp(NOW, std::iter::empty(), "srv"),
        clock(NOW, 0, "srv")
    );
}

#[test]
fn a_server_stamp_follows_the_latest_clock_of_the_row() {
    // A client clock ahead of the server's: the stamp follows it (receive rule).
    let seen = [
        clock(NOW + 50, 1, "x"),
        clock(NOW + 50, 4, "y"),
        clock(NOW, 9, "z"),
    ];
    assert_eq!(
        Hlc::stamp(NOW, seen.into_iter(), "srv"),
        clock(NOW + 50, 5, "srv")
    );
}

#[test]
fn a_server_stamp_after_a_clocks_last_counter_is_in_the_next_millisecond() {
    // A client may send any counter; the stamp is still after it.
    let seen = [clock(NOW + 50, u64::MAX, "x")];
    assert_eq!(
        Hlc::stamp(NOW, seen.into_iter(), "srv"),
        clock(NOW + 51, 0, "srv")
    );
    let text = format!("{}:{}:x", NOW + 50, u64::MAX);
    let seen = [parse(&text).unwrap()];
    assert!(Hlc::stamp(NOW, seen.clone().into_iter(), "srv") > seen[0]);
}

#[test]
fn column_clock_entries_round_trip() {
    let entry = clock(NOW, 3, "phone:1").to_entry();
    assert_eq!(entry, serde_json::json!([NOW, 3, "phone:1"]));
    let mut stored = entry.as_array().unwrap().clone();
    stored.push(serde_json::json!(-42));
    let parsed = ColumnClock::from_json(&Value::Array(stored)).unwrap();
    assert_eq!(parsed.clock, clock(NOW, 3, "phone:1"));
    assert_eq!(parsed.value_hash, -42);
    // The clock describes the value only while its hash matches.
    assert_eq!(parsed.for_hash(Some(-42)), Some(&clock(NOW, 3, "phone:1")));
    assert_eq!(parsed.for_hash(Some(42)), None);
    assert_eq!(parsed.for_hash(None), None);
}

#[test]
fn malformed_column_clock_entries_are_ignored() {
    use serde_json::json;
    for entry in [
        json!(null),
        json!({}),
        json!([]),
        json!([1, 2, "n"]),
        json!([-1, 2, "n", 0]),
        json!([1, 2.5, "n", 0]),
        json!([1, 2, 3, 0]),
        json!([1, 2, "n", "0"]),
        json!(["1", 2, "n", 0]),
    ] {
        assert!(ColumnClock::from_json(&entry).is_none(), "{entry}");
    }
}

fn any_clock() -> impl Strategy<Value = Hlc> {
    // Few distinct values, so that equal walls, counters and nodes are common.
    (
        prop_oneof![0u64..3, Just(u64::MAX - 1), Just(u64::MAX)],
        prop_oneof![0u64..3, Just(u64::MAX - 1), Just(u64::MAX)],
        "[ab:]{0,2}",
    )
        .prop_map(|(wall_ms, counter, node)| Hlc {
            wall_ms,
            counter,
            node,
        })
}

proptest! {
    /// The order is the lexicographic order of (wall, counter, node), hence total:
    /// exactly one of <, =, > holds, and it is antisymmetric.
    #[test]
    fn the_order_is_lexicographic_and_total(a in any_clock(), b in any_clock()) {
        let key = |c: &Hlc| (c.wall_ms, c.counter, c.node.clone());
        prop_assert_eq!(a.cmp(&b), key(&a).cmp(&key(&b)));
        let holds = [a < b, a == b, a > b];
        prop_assert_eq!(holds.iter().filter(|&&h| h).count(), 1);
        prop_assert_eq!(a < b, b > a);
        prop_assert_eq!(a == b, b == a);
    }

    #[test]
    fn the_order_is_transitive(a in any_clock(), b in any_clock(), c in any_clock()) {
        if a <= b && b <= c {
            prop_assert!(a <= c);
        }
        if a < b && b < c {
            prop_assert!(a < c);
        }
    }

    /// What a client formats, the server parses back (node included, colons and all),
    /// unless its wall time is beyond the skew.
    #[test]
    fn parse_inverts_format(
        wall_ms in 0..=NOW + SKEW,
        counter: u64,
        node in "[^\\x00]{1,12}",
    ) {
        let sent = Hlc { wall_ms, counter, node };
        prop_assert_eq!(parse(&format(&sent)).unwrap(), sent);
    }

    /// No text makes parsing panic; what parses has a wall time within the skew.
    #[test]
    fn parse_never_panics(text in "[0-9:a-z-]{0,30}") {
        if let Ok(parsed) = parse(&text) {
            prop_assert!(parsed.wall_ms <= NOW + SKEW);
            prop_assert!(!parsed.node.is_empty());
        }
    }

    /// A server stamp is after (in wall time and counter) every clock the row holds,
    /// whatever their order, and never before now. (Below the last millisecond, after
    /// which there is no later clock: wall times are clamped to now plus the skew.)
    #[test]
    fn a_stamp_is_after_every_clock_seen(
        now in 0u64..4,
        seen in prop::collection::vec(
            any_clock().prop_filter("not the last millisecond", |c| c.wall_ms < u64::MAX),
            0..5,
        ),
    ) {
        let stamp = Hlc::stamp(now, seen.clone().into_iter(), "srv");
        prop_assert!(stamp.wall_ms >= now);
        prop_assert_eq!(stamp.node.as_str(), "srv");
        for c in &seen {
            prop_assert!(
                (stamp.wall_ms, stamp.counter) > (c.wall_ms, c.counter),
                "stamp {:?} is not after {:?}", stamp, c
            );
        }
    }

    /// A column's stored clock entry reads back as the clock that wrote it.
    #[test]
    fn column_clock_entries_round_trip_any_clock(c in any_clock(), hash: i64) {
        let mut entry = c.to_entry().as_array().unwrap().clone();
        entry.push(serde_json::json!(hash));
        let parsed = ColumnClock::from_json(&Value::Array(entry)).unwrap();
        prop_assert_eq!(&parsed.clock, &c);
        prop_assert_eq!(parsed.value_hash, hash);
    }
}
