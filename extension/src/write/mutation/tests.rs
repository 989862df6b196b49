//! A mutation's shape checks (docs/sql.md, `livesync.write` "Errors" and
//! `livesync.write_batch`): what is accepted, and which error and SQLSTATE the rest
//! gets.

use super::*;
use proptest::prelude::*;
use serde_json::json;

const TABLE: u32 = 16_384;

fn args() -> MutationArgs {
    MutationArgs {
        relid: Some(pg_sys::Oid::from(TABLE)),
        op: Some("update".into()),
        key: Some(json!({"id": 1})),
        new_values: Some(json!({"title": "x"})),
        base_version: None,
        base_values: None,
        client_id: None,
        mutation_id: None,
        hlc: None,
    }
}

/// A change to the arguments of a well-formed mutation.
type Change = fn(&mut MutationArgs);

fn checked(change: impl FnOnce(&mut MutationArgs)) -> Result<Mutation, WriteError> {
    let mut args = args();
    change(&mut args);
    args.check()
}

/// `from_json` with every table name resolving to `TABLE`, except "missing".
fn from_json(item: Value) -> Result<MutationArgs, WriteError> {
    MutationArgs::from_json_resolving(&item, |name| match name {
        "missing" => Err(WriteError::UnknownTable(name.into())),
        _ => Ok(pg_sys::Oid::from(TABLE)),
    })
}

fn error_of<T>(result: Result<T, WriteError>) -> (String, &'static str) {
    match result {
        Ok(_) => panic!("accepted"),
        Err(e) => (e.to_string(), e.sqlstate().code()),
    }
}

#[test]
fn ops_parse_by_name() {
    for op in [Op::Insert, Op::Update, Op::Upsert, Op::Delete] {
        assert_eq!(Op::parse(op.name()).unwrap(), op);
    }
    let err = Op::parse("UPDATE").unwrap_err();
    assert_eq!(err.to_string(), "unknown write operation \"UPDATE\"");
    assert_eq!(err.sqlstate().code(), "22023");
    assert_eq!(
        err.hint().as_deref(),
        Some("Use insert, update, upsert or delete.")
    );
}

#[test]
fn every_op_needs_select_and_update_and_its_own_privilege() {
    let mode = |bits: u32| bits as pg_sys::AclMode;
    let always = mode(pg_sys::ACL_SELECT | pg_sys::ACL_UPDATE);
    assert_eq!(Op::Insert.privileges(), always | mode(pg_sys::ACL_INSERT));
    assert_eq!(Op::Upsert.privileges(), always | mode(pg_sys::ACL_INSERT));
    assert_eq!(Op::Update.privileges(), always);
    assert_eq!(Op::Delete.privileges(), always | mode(pg_sys::ACL_DELETE));
}

#[test]
fn a_well_formed_mutation_passes_unchanged() {
    let m = checked(|a| {
        a.base_version = Some(7);
        a.base_values = Some(json!({"title": "w"}));
        a.client_id = Some("phone".into());
        a.mutation_id = Some(3);
        a.hlc = Some("1:2".into());
    })
    .unwrap();
    assert_eq!(m.relid, pg_sys::Oid::from(TABLE));
    assert_eq!(m.op, Op::Update);
    assert_eq!(Value::Object(m.key), json!({"id": 1}));
    assert_eq!(Value::Object(m.new_values), json!({"title": "x"}));
    assert_eq!(m.base_version, Some(7));
    assert_eq!(
        m.base_values.map(Value::Object),
        Some(json!({"title": "w"}))
    );
    let id = m.id.unwrap();
    assert_eq!((id.client_id.as_str(), id.mutation_id), ("phone", 3));
    assert_eq!(m.hlc.as_deref(), Some("1:2"));
    assert!(m.raw.is_none());
}

#[test]
fn missing_arguments_are_22023() {
    let cases: [(Change, &str); 6] = [
        (|a| a.relid = None, "rel is required"),
        (|a| a.op = None, "op is required"),
        (|a| a.key = None, "key is required"),
        (|a| a.key = Some(Value::Null), "key is required"),
        (|a| a.new_values = None, "new_values is required"),
        (
            |a| a.new_values = Some(Value::Null),
            "new_values is required",
        ),
    ];
    for (change, message) in cases {
        assert_eq!(error_of(checked(change)), (message.to_string(), "22023"));
    }
}

#[test]
fn a_delete_needs_no_new_values() {
    let m = checked(|a| {
        a.op = Some("delete".into());
        a.new_values = None;
    })
    .unwrap();
    assert!(m.new_values.is_empty());
}

#[test]
fn key_new_values_and_base_values_must_be_objects() {
    for (change, what) in [
        ((|a| a.key = Some(json!([1]))) as Change, "key"),
        (|a| a.new_values = Some(json!("x")), "new_values"),
        (|a| a.base_values = Some(json!(1)), "base_values"),
    ] {
        assert_eq!(
            error_of(checked(change)),
            (format!("{what} must be a JSON object"), "22023")
        );
    }
    // A NULL base is no base.
    assert!(checked(|a| a.base_values = Some(Value::Null))
        .unwrap()
        .base_values
        .is_none());
}

#[test]
fn client_id_and_mutation_id_come_together() {
    let half = "client_id and mutation_id must be given together".to_string();
    assert_eq!(
        error_of(checked(|a| a.client_id = Some("c".into()))),
        (half.clone(), "22023")
    );
    assert_eq!(
        error_of(checked(|a| a.mutation_id = Some(1))),
        (half, "22023")
    );
}

#[test]
fn a_client_id_may_be_256_bytes_long() {
    let with_id = |client_id: String| {
        checked(|a| {
            a.client_id = Some(client_id);
            a.mutation_id = Some(1);
        })
    };
    assert!(with_id("é".repeat(128)).is_ok());
    assert_eq!(
        error_of(with_id(format!("{}x", "é".repeat(128)))),
        (
            "client_id is 257 bytes long; at most 256 are accepted".into(),
            "22023"
        )
    );
}

#[test]
fn an_unknown_op_is_refused_before_the_rest_is_looked_at() {
    let (message, sqlstate) = error_of(checked(|a| {
        a.op = Some("merge".into());
        a.key = None;
    }));
    assert_eq!(
        (message.as_str(), sqlstate),
        ("unknown write operation \"merge\"", "22023")
    );
}

#[test]
fn a_batch_element_has_the_arguments_of_write() {
    let args = from_json(json!({
        "rel": "public.todos", "op": "upsert", "key": {"id": 1},
        "new_values": {"done": true}, "base_version": 4, "base_values": {"done": false},
        "client_id": "c", "mutation_id": 9, "hlc": "1:0",
    }))
    .unwrap();
    assert_eq!(args.relid, Some(pg_sys::Oid::from(TABLE)));
    assert_eq!(args.op.as_deref(), Some("upsert"));
    assert_eq!(args.key, Some(json!({"id": 1})));
    assert_eq!(args.new_values, Some(json!({"done": true})));
    assert_eq!(args.base_version, Some(4));
    assert_eq!(args.base_values, Some(json!({"done": false})));
    assert_eq!(args.client_id.as_deref(), Some("c"));
    assert_eq!(args.mutation_id, Some(9));
    assert_eq!(args.hlc.as_deref(), Some("1:0"));
    // JSON nulls are absent arguments.
    let args = from_json(json!({"rel": null, "op": null, "base_version": null})).unwrap();
    assert!(args.relid.is_none() && args.op.is_none() && args.base_version.is_none());
    assert_eq!(error_of(args.check()), ("rel is required".into(), "22023"));
}

#[test]
fn a_batch_element_of_the_wrong_shape_is_22023() {
    let cases = [
        (json!([1]), "each mutation must be a JSON object"),
        (json!(null), "each mutation must be a JSON object"),
        (
            json!({"rel": "t", "ops": "insert"}),
            "unknown mutation field \"ops\"",
        ),
        (json!({"rel": 1}), "mutation field rel must be a string"),
        (
            json!({"op": ["insert"]}),
            "mutation field op must be a string",
        ),
        (
            json!({"client_id": 5}),
            "mutation field client_id must be a string",
        ),
        (json!({"hlc": 5}), "mutation field hlc must be a string"),
        (
            json!({"base_version": "4"}),
            "mutation field base_version must be an integer",
        ),
        (
            json!({"base_version": 4.5}),
            "mutation field base_version must be an integer",
        ),
        (
            json!({"mutation_id": 9223372036854775808u64}),
            "mutation field mutation_id must be an integer",
        ),
    ];
    for (item, message) in cases {
        assert_eq!(
            error_of(from_json(item.clone())),
            (message.to_string(), "22023"),
            "{item}"
        );
    }
}

#[test]
fn a_batch_element_naming_a_missing_table_is_42p01() {
    assert_eq!(
        error_of(from_json(json!({"rel": "missing"}))),
        ("relation \"missing\" does not exist".into(), "42P01")
    );
}

const FIELDS: [&str; 9] = [
    "rel",
    "op",
    "key",
    "new_values",
    "base_version",
    "base_values",
    "client_id",
    "mutation_id",
    "hlc",
];

fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "[a-z]{0,4}".prop_map(Value::String),
        Just(json!({"id": 1})),
        Just(json!([1])),
    ]
}

proptest! {
    /// A batch element is accepted exactly when it is an object of known fields,
    /// each NULL or of its type (strings for rel, op, client_id and hlc; integers for
    /// base_version and mutation_id; anything for the JSON fields, which `check`
    /// looks at).
    #[test]
    fn batch_elements_are_accepted_exactly_when_well_typed(
        fields in prop::collection::btree_map(
            prop_oneof![prop::sample::select(FIELDS.to_vec()).prop_map(String::from), "[a-z_]{1,12}"],
            any_json(),
            0..6,
        ),
    ) {
        let well_typed = fields.iter().all(|(name, value)| match name.as_str() {
            "rel" | "op" | "client_id" | "hlc" => value.is_null() || value.is_string(),
            "base_version" | "mutation_id" => value.is_null() || value.is_i64(),
            "key" | "new_values" | "base_values" => true,
            _ => false,
        });
        let item = Value::Object(fields.into_iter().collect());
        let result = from_json(item.clone());
        prop_assert_eq!(result.is_ok(), well_typed, "{}", item);
        if let Err(e) = result {
            prop_assert_eq!(e.sqlstate().code(), "22023");
        }
    }
}
