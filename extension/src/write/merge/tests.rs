//! The per-column merge rules of docs/sql.md ("Decisions", "Policies"), with
//! Postgres's typed arithmetic replaced by integer arithmetic on JSON numbers.

use super::*;
use proptest::prelude::*;
use serde_json::json;

/// `TypedOps` on JSON integers (and strings, for `max` / `min`), NULL counting as
/// zero in `sum` as the SQL does (`coalesce(v.a, 0) + ...`).
struct IntOps;

fn int(value: &Value) -> i64 {
    match value {
        Value::Null => 0,
        other => other.as_i64().expect("the tests merge integers"),
    }
}

fn ordered<'v>(a: &'v Value, b: &'v Value) -> (&'v Value, &'v Value) {
    let a_first = match (a, b) {
        (Value::String(x), Value::String(y)) => x <= y,
        _ => int(a) <= int(b),
    };
    if a_first {
        (a, b)
    } else {
        (b, a)
    }
}

impl TypedOps for IntOps {
    fn sum(&mut self, _column: &str, theirs: &Value, mine: &Value, base: &Value) -> Value {
        json!(int(theirs) + (int(mine) - int(base)))
    }
    fn greatest(&mut self, _column: &str, a: &Value, b: &Value) -> Value {
        ordered(a, b).1.clone()
    }
    fn least(&mut self, _column: &str, a: &Value, b: &Value) -> Value {
        ordered(a, b).0.clone()
    }
    fn not_a_list(&mut self, error: crate::error::LivesyncError) -> ! {
        panic!("{error}")
    }
}

/// A merge's result in a comparable form.
#[derive(Debug, PartialEq)]
enum Got {
    Write(Value),
    Keep,
    Manual,
    NeedsBase,
}

/// The decision and the reported outcome (`None`: nothing contested).
fn merge_with(
    policy: Policy,
    base: Option<&Value>,
    mine: &Value,
    theirs: &Value,
    their_clock: Option<&Hlc>,
    my_clock: &Hlc,
) -> (Got, Option<&'static str>) {
    let input = ColumnInput {
        column: "c",
        policy,
        base,
        mine,
        theirs,
        their_clock,
    };
    match merge_column(&input, my_clock, &mut IntOps) {
        ColumnMerge::NeedsBase => (Got::NeedsBase, None),
        ColumnMerge::Settled { decision, contest } => {
            if let Some(contest) = &contest {
                // The report always describes the inputs as given.
                assert_eq!(contest.column, "c");
                assert_eq!(contest.base.as_ref(), base);
                assert_eq!(&contest.mine, mine);
                assert_eq!(&contest.theirs, theirs);
                assert_eq!(contest.policy, policy);
            }
            let got = match decision {
                Decision::Write(value) => Got::Write(value),
                Decision::Keep => Got::Keep,
                Decision::Manual => Got::Manual,
            };
            (got, contest.map(|c| c.outcome))
        }
    }
}

fn clock(wall_ms: u64, counter: u64, node: &str) -> Hlc {
    Hlc {
        wall_ms,
        counter,
        node: node.to_string(),
    }
}

/// A merge whose clocks do not matter (every policy but `lww`).
fn merge(
    policy: Policy,
    base: Option<Value>,
    mine: Value,
    theirs: Value,
) -> (Got, Option<&'static str>) {
    merge_with(
        policy,
        base.as_ref(),
        &mine,
        &theirs,
        None,
        &clock(1, 0, "n"),
    )
}

const ALL: [Policy; 10] = [
    Policy::Lww,
    Policy::ServerWins,
    Policy::ClientWins,
    Policy::Max,
    Policy::Min,
    Policy::Sum,
    Policy::Union,
    Policy::Append,
    Policy::Concat,
    Policy::Manual,
];

#[test]
fn only_the_client_changed_it_applies_under_every_policy() {
    for policy in ALL {
        let got = merge(policy, Some(json!(1)), json!(5), json!(1));
        assert_eq!(got, (Got::Write(json!(5)), None), "{policy:?}");
    }
}

#[test]
fn both_made_the_same_change_is_nothing_to_do_except_for_sum() {
    for policy in ALL {
        let got = merge(policy, Some(json!(1)), json!(5), json!(5));
        if policy == Policy::Sum {
            // Two devices that each added 4 from 1 make 9.
            assert_eq!(got, (Got::Write(json!(9)), Some("merged")));
        } else {
            assert_eq!(got, (Got::Keep, None), "{policy:?}");
        }
    }
}

#[test]
fn lww_the_later_clock_wins_and_ties_go_to_the_greater_node() {
    let (base, mine, theirs) = (json!("a"), json!("mine"), json!("theirs"));
    let lww = |my: Hlc, their: Hlc| {
        merge_with(Policy::Lww, Some(&base), &mine, &theirs, Some(&their), &my)
    };
    let mine_wins = (Got::Write(json!("mine")), Some("mine"));
    let theirs_wins = (Got::Keep, Some("theirs"));
    assert_eq!(lww(clock(20, 0, "a"), clock(10, 9, "z")), mine_wins);
    assert_eq!(lww(clock(10, 0, "z"), clock(20, 0, "a")), theirs_wins);
    assert_eq!(lww(clock(10, 2, "a"), clock(10, 1, "z")), mine_wins);
    assert_eq!(lww(clock(10, 1, "b"), clock(10, 1, "a")), mine_wins);
    assert_eq!(lww(clock(10, 1, "a"), clock(10, 1, "b")), theirs_wins);
    // The very same clock is not later: the stored value stays.
    assert_eq!(lww(clock(10, 1, "a"), clock(10, 1, "a")), theirs_wins);
}

#[test]
fn lww_a_stored_value_without_a_clock_loses_to_any_clock() {
    let got = merge_with(
        Policy::Lww,
        None,
        &json!(2),
        &json!(1),
        None,
        &clock(0, 0, ""),
    );
    assert_eq!(got, (Got::Write(json!(2)), Some("mine")));
}

#[test]
fn server_wins_client_wins_and_manual() {
    let contested = |policy| merge(policy, Some(json!(0)), json!(2), json!(1));
    assert_eq!(contested(Policy::ServerWins), (Got::Keep, Some("theirs")));
    assert_eq!(
        contested(Policy::ClientWins),
        (Got::Write(json!(2)), Some("mine"))
    );
    assert_eq!(contested(Policy::Manual), (Got::Manual, Some("manual")));
}

#[test]
fn without_a_base_value_every_differing_column_is_contested() {
    assert_eq!(
        merge(Policy::ClientWins, None, json!(2), json!(1)),
        (Got::Write(json!(2)), Some("mine"))
    );
    assert_eq!(
        merge(Policy::Manual, None, json!(2), json!(1)),
        (Got::Manual, Some("manual"))
    );
    // ... but one that already holds the client's value is not.
    assert_eq!(
        merge(Policy::Manual, None, json!(2), json!(2)),
        (Got::Keep, None)
    );
}

#[test]
fn max_and_min_report_the_side_they_kept() {
    let contested = |policy, mine, theirs| merge(policy, Some(json!(0)), mine, theirs);
    assert_eq!(
        contested(Policy::Max, json!(7), json!(3)),
        (Got::Write(json!(7)), Some("mine"))
    );
    assert_eq!(
        contested(Policy::Max, json!(3), json!(7)),
        (Got::Keep, Some("theirs"))
    );
    assert_eq!(
        contested(Policy::Min, json!(3), json!(7)),
        (Got::Write(json!(3)), Some("mine"))
    );
    assert_eq!(
        contested(Policy::Min, json!(7), json!(3)),
        (Got::Keep, Some("theirs"))
    );
    assert_eq!(
        contested(Policy::Max, json!("b"), json!("a")),
        (Got::Write(json!("b")), Some("mine"))
    );
}

#[test]
fn sum_needs_the_base_value() {
    assert_eq!(
        merge(Policy::Sum, None, json!(2), json!(1)),
        (Got::NeedsBase, None)
    );
    // Even when the stored value already equals the client's: an increment from an
    // unknown base cannot be told from a repeat.
    assert_eq!(
        merge(Policy::Sum, None, json!(2), json!(2)),
        (Got::NeedsBase, None)
    );
}

#[test]
fn sum_adds_the_clients_delta_to_the_stored_value() {
    assert_eq!(
        merge(Policy::Sum, Some(json!(10)), json!(13), json!(15)),
        (Got::Write(json!(18)), Some("merged"))
    );
    // NULL counts as zero.
    assert_eq!(
        merge(Policy::Sum, Some(Value::Null), json!(1), json!(5)),
        (Got::Write(json!(6)), Some("merged"))
    );
}

#[test]
fn union_is_a_set_that_keeps_what_others_removed_removed() {
    // Base [a, b, c]; another device removed b and added d; this one removed c and
    // added e.
    let got = merge(
        Policy::Union,
        Some(json!(["a", "b", "c"])),
        json!(["a", "b", "e"]),
        json!(["a", "c", "d", "d"]),
    );
    assert_eq!(got, (Got::Write(json!(["a", "d", "e"])), Some("merged")));
}

#[test]
fn append_keeps_the_stored_duplicates_and_adds_the_clients_new_items_once() {
    let got = merge(
        Policy::Append,
        Some(json!(["a", "b"])),
        json!(["a", "b", "x"]),
        json!(["a", "b", "a", "y"]),
    );
    assert_eq!(
        got,
        (Got::Write(json!(["a", "b", "a", "y", "x"])), Some("merged"))
    );
    // Both appending the same item keeps one.
    let got = merge(
        Policy::Append,
        Some(json!(["a"])),
        json!(["a", "x"]),
        json!(["a", "y", "x"]),
    );
    assert_eq!(got, (Got::Keep, Some("theirs")));
}

#[test]
fn list_merges_without_a_base_add_every_item_sent_and_remove_nothing() {
    let got = merge(Policy::Union, None, json!(["b", "c"]), json!(["a", "b"]));
    assert_eq!(got, (Got::Write(json!(["a", "b", "c"])), Some("merged")));
    let got = merge(Policy::Append, None, json!(["a"]), json!(["a", "a"]));
    assert_eq!(got, (Got::Keep, Some("theirs")));
}

#[test]
fn list_merges_take_null_as_empty() {
    let got = merge(Policy::Union, Some(json!(["y"])), json!(["x"]), Value::Null);
    assert_eq!(got, (Got::Write(json!(["x"])), Some("mine")));
    let got = merge(Policy::Append, Some(json!([])), Value::Null, json!(["x"]));
    assert_eq!(got, (Got::Keep, Some("theirs")));
}

#[test]
fn list_items_are_equal_exactly_when_their_json_is() {
    // Objects whatever their key order; numbers only as spelled (1 and 1.0 differ).
    let got = merge(
        Policy::Union,
        None,
        json!([{"b": 1, "a": 2}, 1.0]),
        json!([{"a": 2, "b": 1}, 1]),
    );
    assert_eq!(
        got,
        (
            Got::Write(json!([{"a": 2, "b": 1}, 1, 1.0])),
            Some("merged")
        )
    );
}

#[test]
fn a_list_merge_of_a_value_that_is_not_an_array_is_an_error_naming_the_column() {
    for (policy, name) in [(Policy::Union, "union"), (Policy::Append, "append")] {
        let long = "x".repeat(200);
        let panic =
            std::panic::catch_unwind(|| merge(policy, Some(json!([])), json!(["a"]), json!(long)))
                .expect_err("a string cannot be merged as a list");
        let message = panic
            .downcast_ref::<String>()
            .expect("not_a_list's message");
        assert!(
            message.starts_with(&format!(
                "column \"c\" has policy {name}, which merges arrays, but its value \"xxx"
            )),
            "{message}"
        );
        // The value is cut short.
        assert!(message.ends_with("... is not an array"), "{message}");
        assert!(message.len() < 200, "{message}");
    }
}

#[test]
fn concat_keeps_both_texts() {
    let got = merge(
        Policy::Concat,
        Some(json!("a")),
        json!("mine"),
        json!("theirs"),
    );
    assert_eq!(
        got,
        (Got::Write(json!("theirs\n---\nmine")), Some("merged"))
    );
    // Only one side is text: that one.
    assert_eq!(
        merge(Policy::Concat, Some(json!("a")), json!("mine"), Value::Null),
        (Got::Write(json!("mine")), Some("mine"))
    );
    assert_eq!(
        merge(
            Policy::Concat,
            Some(json!("a")),
            Value::Null,
            json!("theirs")
        ),
        (Got::Keep, Some("theirs"))
    );
}

#[test]
fn a_contest_reports_as_the_result_documents() {
    let contest = Contest {
        column: "n".into(),
        base: None,
        mine: json!(2),
        theirs: json!(1),
        policy: Policy::Manual,
        outcome: "manual",
    };
    assert_eq!(
        contest.to_json(Some(7)),
        json!({"column": "n", "base": null, "mine": 2, "theirs": 1,
               "policy": "manual", "outcome": "manual", "conflict_id": 7})
    );
    assert_eq!(contest.to_json(None).get("conflict_id"), None);
}

#[test]
fn truncated_cuts_long_values_on_a_character_boundary() {
    assert_eq!(truncated(&json!("short")), "\"short\"");
    let long = truncated(&json!("é".repeat(100)));
    assert!(long.len() <= 80 && long.ends_with("..."), "{long}");
}

#[test]
fn policy_names_round_trip_and_an_unknown_name_is_manual() {
    for policy in ALL {
        assert_eq!(Policy::from_name(policy.name()), policy);
    }
    assert_eq!(Policy::from_name("LWW"), Policy::Manual);
    assert_eq!(Policy::from_name(""), Policy::Manual);
}

// ---- properties ----

/// Small items from a small alphabet, so lists share items often.
fn item() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0..6i64).prop_map(|n| json!(n)),
        "[a-e]".prop_map(Value::String),
        (0..3i64).prop_map(|n| json!({ "id": n })),
    ]
}

fn list() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(item(), 0..8)
}

fn id(item: &Value) -> String {
    item.to_string()
}

fn ids(items: &[Value]) -> HashSet<String> {
    items.iter().map(id).collect()
}

fn lists(set: bool, base: Option<&[Value]>, mine: &[Value], theirs: &[Value]) -> Vec<Value> {
    let base = base.map(|b| Value::Array(b.to_vec()));
    let merged = merge_lists(
        "c",
        base.as_ref(),
        &Value::Array(mine.to_vec()),
        &Value::Array(theirs.to_vec()),
        set,
        &mut IntOps,
    );
    match merged {
        Value::Array(items) => items,
        other => panic!("a list merge returned {other}"),
    }
}

/// Applies a merge's decision to the stored value.
fn applied(got: Got, stored: &Value) -> Value {
    match got {
        Got::Write(value) => value,
        Got::Keep | Got::Manual => stored.clone(),
        Got::NeedsBase => panic!("needs a base"),
    }
}

proptest! {
    /// `union` never loses an item only one side added, never keeps an item the
    /// client removed, and holds each item once: exactly
    /// (theirs - (base - mine)) + (mine - base), as a set.
    #[test]
    fn union_is_the_three_way_set_merge(base in list(), mine in list(), theirs in list()) {
        let merged = lists(true, Some(&base), &mine, &theirs);
        let (b, m, t) = (ids(&base), ids(&mine), ids(&theirs));
        let expected: HashSet<String> = t
            .iter()
            .filter(|x| !b.contains(*x) || m.contains(*x))
            .chain(m.difference(&b))
            .cloned()
            .collect();
        prop_assert_eq!(ids(&merged), expected);
        prop_assert_eq!(ids(&merged).len(), merged.len(), "duplicates in {:?}", merged);
    }

    /// Which of two devices' edits from one base lands first does not change the set.
    #[test]
    fn union_is_symmetric_in_the_two_sides(base in list(), a in list(), b in list()) {
        let ab = lists(true, Some(&base), &a, &b);
        let ba = lists(true, Some(&base), &b, &a);
        prop_assert_eq!(ids(&ab), ids(&ba));
    }

    /// With no base every item sent is added: the union of both.
    #[test]
    fn union_without_a_base_is_the_union(mine in list(), theirs in list()) {
        let merged = lists(true, None, &mine, &theirs);
        prop_assert_eq!(ids(&merged), &ids(&mine) | &ids(&theirs));
    }

    /// `append`: the stored list in order with its duplicates, minus what the client
    /// removed, then each item the client added that is not already there, in the
    /// client's order.
    #[test]
    fn append_keeps_order_and_duplicates(base in list(), mine in list(), theirs in list()) {
        let merged = lists(false, Some(&base), &mine, &theirs);
        let (b, m) = (ids(&base), ids(&mine));
        let removed = |x: &Value| b.contains(&id(x)) && !m.contains(&id(x));
        let kept: Vec<&Value> = theirs.iter().filter(|x| !removed(x)).collect();
        prop_assert!(merged.len() >= kept.len());
        prop_assert_eq!(&merged[..kept.len()].iter().collect::<Vec<_>>(), &kept);
        let tail = &merged[kept.len()..];
        // Every item only the client added is there, once, in the client's order.
        let added: Vec<String> = {
            let mut seen: HashSet<String> = kept.iter().map(|x| id(x)).collect();
            mine.iter()
                .map(id)
                .filter(|x| !b.contains(x) && seen.insert(x.clone()))
                .collect()
        };
        prop_assert_eq!(tail.iter().map(id).collect::<Vec<_>>(), added);
    }

    /// A list merge's result does not depend on hashing (each call hashes with new
    /// random keys).
    #[test]
    fn list_merges_are_deterministic(base in list(), mine in list(), theirs in list(), set: bool) {
        let first = lists(set, Some(&base), &mine, &theirs);
        for _ in 0..3 {
            prop_assert_eq!(&lists(set, Some(&base), &mine, &theirs), &first);
        }
    }

    /// `sum` adds both deltas, including two equal ones, whichever lands first.
    #[test]
    fn sum_adds_both_deltas(base in -1_000_000i64..1_000_000, d1 in -1000i64..1000, d2 in -1000i64..1000) {
        let write = |stored: i64, delta: i64| {
            let stored = json!(stored);
            let got = merge(Policy::Sum, Some(json!(base)), json!(base + delta), stored.clone()).0;
            int(&applied(got, &stored))
        };
        prop_assert_eq!(write(write(base, d1), d2), base + d1 + d2);
        prop_assert_eq!(write(write(base, d2), d1), base + d1 + d2);
    }

    /// `lww`: two writes of one column converge to the value of the later clock in
    /// either order, from a stored value with or without a clock.
    #[test]
    fn lww_converges_to_the_later_clock(
        a in (0u64..4, 0u64..4, "[ab]"), b in (0u64..4, 0u64..4, "[ab]"),
        stored_clock in proptest::option::of((0u64..2, 0u64..2, "[ab]")),
    ) {
        let ca = clock(a.0, a.1, &a.2);
        let cb = clock(b.0, b.1, &b.2);
        prop_assume!(ca != cb);
        let start = stored_clock.map(|(w, c, n)| clock(w, c, &n));
        prop_assume!(start.as_ref().is_none_or(|s| s < &ca && s < &cb));
        let run = |first: (&Hlc, Value), second: (&Hlc, Value)| {
            let (mut value, mut value_clock) = (json!("start"), start.clone());
            for (my_clock, mine) in [first, second] {
                let got = merge_with(Policy::Lww, Some(&json!("base")), &mine, &value,
                                     value_clock.as_ref(), my_clock).0;
                if let Got::Write(written) = got {
                    value = written;
                    value_clock = Some(my_clock.clone());
                }
            }
            value
        };
        let ab = run((&ca, json!("a")), (&cb, json!("b")));
        let ba = run((&cb, json!("b")), (&ca, json!("a")));
        let later = if ca > cb { json!("a") } else { json!("b") };
        prop_assert_eq!(&ab, &later);
        prop_assert_eq!(&ba, &later);
    }

    /// `max` / `min` keep the greater / smaller value and report the side it came
    /// from; the stored side is never rewritten.
    #[test]
    fn max_and_min_pick_a_side(mine in -5i64..5, theirs in -5i64..5, max: bool) {
        prop_assume!(mine != theirs);
        let policy = if max { Policy::Max } else { Policy::Min };
        let (got, outcome) = merge(policy, Some(json!(100)), json!(mine), json!(theirs));
        let mine_wins = if max { mine > theirs } else { mine < theirs };
        if mine_wins {
            prop_assert_eq!((got, outcome), (Got::Write(json!(mine)), Some("mine")));
        } else {
            prop_assert_eq!((got, outcome), (Got::Keep, Some("theirs")));
        }
    }

    /// `truncated` never splits a character and stays within 80 bytes.
    #[test]
    fn truncated_is_a_prefix(text in "\\PC{0,120}") {
        let full = json!(text).to_string();
        let cut = truncated(&json!(text));
        prop_assert!(cut.len() <= 80);
        let kept = cut.strip_suffix("...").unwrap_or(&cut);
        prop_assert!(full.starts_with(kept));
        prop_assert_eq!(cut == full, full.len() <= 80);
    }
}
