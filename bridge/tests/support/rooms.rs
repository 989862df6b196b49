//! Client-side helpers for rooms (presence and broadcast, docs: the presence contract):
//! join, find members, read messages of one kind with a deadline.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::WsClient;

/// Sends `join` and returns its `presence_state` (fails on anything else).
pub async fn join(client: &mut WsClient, id: &str, room: &str, state: Value) -> Value {
    let reply = request(
        client,
        json!({"type": "join", "id": id, "room": room, "state": state}),
    )
    .await;
    assert_eq!(reply["type"], "presence_state", "join {room}: {reply}");
    assert_eq!(reply["id"], id, "the join's id is echoed: {reply}");
    assert_eq!(reply["room"], room, "{reply}");
    reply
}

/// Sends a message carrying an `id` and returns the message answering it.
pub async fn request(client: &mut WsClient, message: Value) -> Value {
    let id = message["id"]
        .as_str()
        .expect("request() wants a string id")
        .to_string();
    client.send(message).await;
    client.recv_reply(&id).await
}

/// Sends a message carrying an `id` and asserts it is answered by an `error` of `code`.
pub async fn expect_error(client: &mut WsClient, message: Value, code: &str) -> Value {
    let sent = message.to_string();
    let reply = request(client, message).await;
    assert_eq!(reply["type"], "error", "{sent} → {reply}");
    assert_eq!(reply["code"], code, "{sent} → {reply}");
    reply
}

/// A ping round trip; then asserts nothing answered request `id` before the pong (a
/// request that succeeds silently, as `presence` and `broadcast` do).
pub async fn assert_no_reply(client: &mut WsClient, id: &str) {
    let ping = format!("ping-after-{id}");
    let pong = request(client, json!({"type": "ping", "id": ping})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    if let Some(reply) = client.pending.iter().find(|m| m["id"] == id) {
        panic!("request {id} succeeds silently, yet was answered: {reply}");
    }
}

/// The members of a `presence_state`.
pub fn members(state: &Value) -> &Vec<Value> {
    state["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members is an array: {state}"))
}

/// The member with `connection` in a list of members, if there.
pub fn find<'a>(members: &'a [Value], connection: &str) -> Option<&'a Value> {
    members.iter().find(|m| m["connection"] == connection)
}

/// The entry of `connection` in `list` (`members`, `joins`, `leaves` or `updates`).
pub fn entry<'a>(message: &'a Value, list: &str, connection: &str) -> Option<&'a Value> {
    message[list]
        .as_array()
        .and_then(|l| l.iter().find(|m| m["connection"] == connection))
}

/// A list of a message (`joins`, `leaves`, `updates`, `members`); absent is empty.
pub fn list(message: &Value, name: &str) -> Vec<Value> {
    message[name].as_array().cloned().unwrap_or_default()
}

/// The next `presence_diff` in `room` whose `kind` list (`joins`, `leaves`, `updates`)
/// has `connection`, within `within`; diffs before it may only carry updates.
pub async fn diff_having(
    client: &mut WsClient,
    room: &str,
    kind: &str,
    connection: &str,
    within: Duration,
) -> Value {
    wait_for(
        client,
        "presence_diff",
        within,
        &format!("a presence_diff in {room} with {connection} in {kind}"),
        |m| m["room"] == room && entry(m, kind, connection).is_some(),
        |skipped| {
            assert!(
                list(skipped, "joins").is_empty() && list(skipped, "leaves").is_empty(),
                "an unexpected diff while waiting for {connection} in {kind}: {skipped}"
            )
        },
    )
    .await
}

/// A member's color, checked to be `#rrggbb`.
pub fn color(member: &Value) -> String {
    let c = member["color"]
        .as_str()
        .unwrap_or_else(|| panic!("a member has a color: {member}"));
    assert!(
        c.len() == 7 && c.starts_with('#') && c[1..].chars().all(|ch| ch.is_ascii_hexdigit()),
        "a color is #rrggbb: {member}"
    );
    c.to_string()
}

/// Asserts the fields a Member carries.
pub fn assert_member(member: &Value, connection: &str, user: &str, node: &str, state: &Value) {
    assert_eq!(member["connection"], connection, "{member}");
    assert_eq!(member["user"], user, "{member}");
    assert_eq!(member["node"], node, "{member}");
    assert_eq!(&member["state"], state, "{member}");
    color(member);
    for t in ["joined_at", "last_seen"] {
        let ms = member[t]
            .as_i64()
            .unwrap_or_else(|| panic!("{t} is a number: {member}"));
        assert!(
            ms > 1_600_000_000_000 && ms < 4_000_000_000_000,
            "{t} is in milliseconds since 1970: {member}"
        );
    }
}

/// Reads messages of `kind` (others are kept for later) until one satisfies `pred`,
/// failing after `within`. Messages of `kind` that do not satisfy it are passed to
/// `skipped` (so a test can assert what may come before).
pub async fn wait_for(
    client: &mut WsClient,
    kind: &str,
    within: Duration,
    what: &str,
    mut pred: impl FnMut(&Value) -> bool,
    mut skipped: impl FnMut(&Value),
) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message = tokio::time::timeout(left, client.recv_type(kind))
            .await
            .unwrap_or_else(|_| panic!("{what}: not within {within:?}"));
        if pred(&message) {
            return message;
        }
        skipped(&message);
    }
}

/// The next message of `kind` within `within`, or None.
pub async fn next_within(client: &mut WsClient, kind: &str, within: Duration) -> Option<Value> {
    tokio::time::timeout(within, client.recv_type(kind))
        .await
        .ok()
}

/// Polls `f` every 100 ms until it returns `Some`, failing after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out ({within:?}) waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of a Prometheus metric's samples (all label sets), None when absent.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let rest = match line.strip_prefix(name) {
            Some(rest) if rest.starts_with(' ') || rest.starts_with('{') => rest,
            _ => continue,
        };
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
