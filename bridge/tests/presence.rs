//! Presence, cursors and ephemeral broadcast on one bridge without Redis (the in-memory
//! backend), written against the protocol only (WebSocket JSON and HTTP): join →
//! `presence_state`; others get `presence_diff` joins, updates (coalesced) and leaves;
//! broadcasts reach the others (the sender only with `echo`); colors are stable per user
//! and distinct while the palette lasts; every refusal is an `error` with its code, and
//! nothing refused reaches the room. Room policies (TOML) run the binary with a config
//! file and JWT auth.
//!
//! "Nothing reached the room" is proved with markers: an allowed message sent after the
//! refused one must be the first of its kind the other member reads.

mod support;

#[path = "support/bridge_process.rs"]
mod bridge_process;
#[path = "support/rooms.rs"]
mod rooms;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use bridge_process::BridgeProcess;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use rooms::{
    assert_member, assert_no_reply, color, entry, expect_error, find, join, list, members, request,
    wait_for,
};
use serde_json::{json, Value};
use support::{TestDb, WsClient, PATIENCE};

/// Longer than any coalescing window, far shorter than the default TTL (30 s): how
/// long a diff caused by a message may take.
const PROMPT: Duration = Duration::from_secs(5);

fn session(welcome: &Value) -> String {
    welcome["session"]
        .as_str()
        .unwrap_or_else(|| panic!("welcome has a session: {welcome}"))
        .to_string()
}

/// The next `presence_diff` in `room`, within PROMPT.
async fn next_diff(client: &mut WsClient, room: &str) -> Value {
    wait_for(
        client,
        "presence_diff",
        PROMPT,
        &format!("a presence_diff in {room}"),
        |m| m["room"] == room,
        |_| {},
    )
    .await
}

async fn diff_having(client: &mut WsClient, room: &str, kind: &str, connection: &str) -> Value {
    rooms::diff_having(client, room, kind, connection, PROMPT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_diffs_broadcast_leave_and_close() {
    let db = TestDb::create("presence_basics").await;
    let bridge = support::start(db.config()).await;
    let room = "board:1";

    // Join: presence_state with self, and the members, the joiner included.
    let (mut ann, ann_welcome) = WsClient::hello(bridge.addr, "ann").await;
    let ann_id = session(&ann_welcome);
    let node = ann_welcome["node"].as_str().unwrap().to_string();
    let ann_state = json!({"name": "Ann", "cursor": null});
    let joined = join(&mut ann, "j1", room, ann_state.clone()).await;
    assert_eq!(
        joined["self"],
        ann_id.as_str(),
        "self is the welcome's session"
    );
    assert_eq!(members(&joined).len(), 1, "{joined}");
    let ann_member = find(members(&joined), &ann_id).expect("the joiner is a member");
    assert_member(ann_member, &ann_id, "ann", &node, &ann_state);
    let ann_color = color(ann_member);

    // A second member: its presence_state lists both; the first gets a diff with it.
    let (mut bob, bob_welcome) = WsClient::hello(bridge.addr, "bob").await;
    let bob_id = session(&bob_welcome);
    assert_ne!(bob_id, ann_id);
    let bob_state = json!({"name": "Bob"});
    let joined = join(&mut bob, "j1", room, bob_state.clone()).await;
    assert_eq!(joined["self"], bob_id.as_str());
    assert_eq!(members(&joined).len(), 2, "{joined}");
    assert_member(
        find(members(&joined), &ann_id).expect("ann is listed to bob"),
        &ann_id,
        "ann",
        &node,
        &ann_state,
    );
    let bob_member = find(members(&joined), &bob_id).expect("bob is listed to himself");
    assert_member(bob_member, &bob_id, "bob", &node, &bob_state);
    let bob_color = color(bob_member);
    assert_ne!(
        bob_color.to_lowercase(),
        ann_color.to_lowercase(),
        "two users, two colors"
    );
    let diff = next_diff(&mut ann, room).await;
    let joins = list(&diff, "joins");
    assert_eq!(joins.len(), 1, "one join: {diff}");
    assert_member(&joins[0], &bob_id, "bob", &node, &bob_state);
    assert_eq!(color(&joins[0]), bob_color, "the same color everywhere");
    assert!(list(&diff, "leaves").is_empty(), "{diff}");
    assert!(list(&diff, "updates").is_empty(), "{diff}");

    // A presence update: no reply; a diff of updates to every member, the updater too.
    let cursor = json!({"cursor": {"record": "7", "field": "title", "x": 10, "y": 20}});
    bob.send(json!({"type": "presence", "id": "p1", "room": room, "state": cursor}))
        .await;
    assert_no_reply(&mut bob, "p1").await;
    for (who, client) in [("ann", &mut ann), ("bob", &mut bob)] {
        let diff = next_diff(client, room).await;
        let update = entry(&diff, "updates", &bob_id)
            .unwrap_or_else(|| panic!("{who} gets bob's update: {diff}"));
        assert_member(update, &bob_id, "bob", &node, &cursor);
        assert_eq!(color(update), bob_color);
        assert!(list(&diff, "joins").is_empty(), "{diff}");
        assert!(list(&diff, "leaves").is_empty(), "{diff}");
    }
    // Bob never got a diff announcing his own join: the update was his first diff
    // (checked above: it had no joins).

    // Broadcast: the others get it as sent, with who sent it; not the sender...
    let payload = json!([1, "two", {"three": 3.5, "four": null}]);
    ann.send(json!({"type": "broadcast", "id": "b1", "room": room, "event": "cursor", "payload": payload}))
        .await;
    assert_no_reply(&mut ann, "b1").await;
    let got = bob.recv_type("broadcast").await;
    assert_eq!(got["room"], room, "{got}");
    assert_eq!(got["event"], "cursor", "{got}");
    assert_eq!(got["payload"], payload, "{got}");
    assert_eq!(got["from"]["connection"], ann_id.as_str(), "{got}");
    assert_eq!(got["from"]["user"], "ann", "{got}");
    // ... unless it asks for the echo: then ann's first broadcast is this marker.
    ann.send(json!({"type": "broadcast", "room": room, "event": "marker", "payload": "m1", "echo": true}))
        .await;
    let echoed = ann.recv_type("broadcast").await;
    assert_eq!(
        echoed["payload"], "m1",
        "the sender gets only the echoed broadcast: {echoed}"
    );
    assert_eq!(echoed["from"]["connection"], ann_id.as_str());
    let got = bob.recv_type("broadcast").await;
    assert_eq!(got["payload"], "m1", "{got}");
    // A broadcast with echo false explicitly, and one from bob to ann.
    bob.send(json!({"type": "broadcast", "room": room, "event": "ping", "payload": {"n": 1}, "echo": false}))
        .await;
    let got = ann.recv_type("broadcast").await;
    assert_eq!(got["payload"], json!({"n": 1}), "{got}");
    assert_eq!(got["from"]["user"], "bob", "{got}");

    // Joining a room already joined replaces the state and answers presence_state.
    let again = join(&mut ann, "j2", room, json!({"name": "Ann", "v": 2})).await;
    assert_eq!(members(&again).len(), 2, "no second entry for ann: {again}");
    assert_eq!(
        find(members(&again), &ann_id).unwrap()["state"],
        json!({"name": "Ann", "v": 2}),
        "{again}"
    );
    assert_eq!(color(find(members(&again), &ann_id).unwrap()), ann_color);
    let diff = wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "bob sees ann's replaced state",
        |d| entry(d, "updates", &ann_id).is_some() || entry(d, "joins", &ann_id).is_some(),
        |_| {},
    )
    .await;
    assert!(
        list(&diff, "leaves").is_empty(),
        "a rejoin is no leave: {diff}"
    );

    // Leave: `left` with the id; the others get leaves; the room is no longer joined.
    let left = request(&mut bob, json!({"type": "leave", "id": "l1", "room": room})).await;
    assert_eq!(left["type"], "left", "{left}");
    assert_eq!(left["room"], room, "{left}");
    // (ann's own rejoin may have given her an update diff first)
    let diff = diff_having(&mut ann, room, "leaves", &bob_id).await;
    let leaves = list(&diff, "leaves");
    assert_eq!(leaves.len(), 1, "{diff}");
    assert_eq!(leaves[0]["connection"], bob_id.as_str(), "{diff}");
    assert_eq!(leaves[0]["user"], "bob", "{diff}");
    expect_error(
        &mut bob,
        json!({"type": "presence", "id": "p2", "room": room, "state": {}}),
        "bad_request",
    )
    .await;
    // Bob's broadcast after leaving reaches nobody (bad_request): ann's next broadcast
    // is the later marker.
    expect_error(
        &mut bob,
        json!({"type": "broadcast", "id": "b2", "room": room, "event": "x", "payload": 1}),
        "bad_request",
    )
    .await;

    // Closing the socket (a close frame) is a leave, promptly (not after the TTL).
    let (mut carl, carl_welcome) = WsClient::hello(bridge.addr, "carl").await;
    let carl_id = session(&carl_welcome);
    join(&mut carl, "j", room, json!({})).await;
    diff_having(&mut ann, room, "joins", &carl_id).await;
    carl.send(json!({"type": "broadcast", "room": room, "event": "marker", "payload": "m2"}))
        .await;
    let got = ann.recv_type("broadcast").await;
    assert_eq!(
        got["payload"], "m2",
        "bob's refused broadcast never arrived: {got}"
    );
    let closed = Instant::now();
    carl.ws.close(None).await.unwrap();
    diff_having(&mut ann, room, "leaves", &carl_id).await;
    assert!(closed.elapsed() < PROMPT);

    // So is a connection that just goes away (TCP closed without a close frame).
    let (mut dora, dora_welcome) = WsClient::hello(bridge.addr, "dora").await;
    let dora_id = session(&dora_welcome);
    join(&mut dora, "j", room, json!({})).await;
    diff_having(&mut ann, room, "joins", &dora_id).await;
    drop(dora);
    diff_having(&mut ann, room, "leaves", &dora_id).await;

    // Ann alone again: a fresh joiner sees just her and himself.
    let (mut eve, eve_welcome) = WsClient::hello(bridge.addr, "eve").await;
    let joined = join(&mut eve, "j", room, json!({})).await;
    let listed: BTreeSet<String> = members(&joined)
        .iter()
        .map(|m| m["connection"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([ann_id.clone(), session(&eve_welcome)]),
        "{joined}"
    );

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_updates_is_coalesced_ending_on_the_last_state() {
    let db = TestDb::create("presence_coalesce").await;
    let bridge = support::start(db.config()).await;
    let room = "doc:coalesce";
    let (mut ann, ann_welcome) = WsClient::hello(bridge.addr, "ann").await;
    let ann_id = session(&ann_welcome);
    let (mut bob, _) = WsClient::hello(bridge.addr, "bob").await;
    join(&mut ann, "j", room, json!({"n": -1})).await;
    join(&mut bob, "j", room, json!({})).await;
    next_diff(&mut ann, room).await; // bob's join

    const UPDATES: i64 = 50;
    for n in 0..UPDATES {
        ann.send(
            json!({"type": "presence", "room": room, "state": {"n": n, "pad": "x".repeat(64)}}),
        )
        .await;
    }
    // Bob reads diffs until ann's last state: each diff holds ann's latest state of
    // its window, so the n's only grow, and there are fewer diffs than updates.
    for (who, client) in [("bob", &mut bob), ("ann", &mut ann)] {
        let mut seen = Vec::new();
        wait_for(
            client,
            "presence_diff",
            PROMPT,
            &format!("{who} gets a diff with ann's last state"),
            |d| {
                let n = entry(d, "updates", &ann_id).map(|u| u["state"]["n"].as_i64().unwrap());
                if let Some(n) = n {
                    let updates = list(d, "updates");
                    assert_eq!(
                        updates
                            .iter()
                            .filter(|u| u["connection"] == ann_id.as_str())
                            .count(),
                        1,
                        "one entry per member in a diff: {d}"
                    );
                    seen.push(n);
                }
                n == Some(UPDATES - 1)
            },
            |_| {},
        )
        .await;
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "{who}: diffs go forward: {seen:?}"
        );
        assert!(
            (seen.len() as i64) * 2 <= UPDATES,
            "{who}: {UPDATES} updates in a burst coalesce into fewer diffs, got {}: {seen:?}",
            seen.len()
        );
    }
    // Nothing older follows: ann's next update is the next diff bob sees of her.
    ann.send(json!({"type": "presence", "room": room, "state": {"n": "final"}}))
        .await;
    let diff = wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "the final update",
        |d| entry(d, "updates", &ann_id).is_some(),
        |_| {},
    )
    .await;
    assert_eq!(
        entry(&diff, "updates", &ann_id).unwrap()["state"],
        json!({"n": "final"}),
        "the diff after the burst's last is the next update, not a stale one: {diff}"
    );

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_keeps_its_color_across_reconnects_and_tabs() {
    let db = TestDb::create("presence_colors").await;
    let bridge = support::start(db.config()).await;
    let room = "board:colors";
    // bob first (he gets the first free color), then alice, then carol to watch.
    let (mut bob, _) = WsClient::hello(bridge.addr, "bob").await;
    let bob_state = join(&mut bob, "j", room, json!({})).await;
    let bob_color = color(find(members(&bob_state), bob_state["self"].as_str().unwrap()).unwrap());
    let (mut alice, alice_welcome) = WsClient::hello(bridge.addr, "alice").await;
    let alice_id = session(&alice_welcome);
    let state = join(&mut alice, "j", room, json!({})).await;
    let alice_color = color(find(members(&state), &alice_id).unwrap());
    assert_ne!(alice_color, bob_color);
    let (mut carol, _) = WsClient::hello(bridge.addr, "carol").await;
    join(&mut carol, "j", room, json!({})).await;

    // Two tabs of alice: two members, one user, one color.
    let (mut tab2, tab2_welcome) = WsClient::hello(bridge.addr, "alice").await;
    let tab2_id = session(&tab2_welcome);
    assert_ne!(tab2_id, alice_id, "each connection is its own member");
    let state = join(&mut tab2, "j", room, json!({"tab": 2})).await;
    let tabs: Vec<&Value> = members(&state)
        .iter()
        .filter(|m| m["user"] == "alice")
        .collect();
    assert_eq!(tabs.len(), 2, "two tabs are two members: {state}");
    assert!(
        tabs.iter().all(|m| color(m) == alice_color),
        "a user's tabs share its color: {state}"
    );
    let diff = wait_for(
        &mut carol,
        "presence_diff",
        PROMPT,
        "the second tab's join",
        |d| entry(d, "joins", &tab2_id).is_some(),
        |_| {},
    )
    .await;
    assert_eq!(color(entry(&diff, "joins", &tab2_id).unwrap()), alice_color);
    tab2.ws.close(None).await.unwrap();
    wait_for(
        &mut carol,
        "presence_diff",
        PROMPT,
        "the second tab's leave",
        |d| entry(d, "leaves", &tab2_id).is_some(),
        |_| {},
    )
    .await;

    // bob leaves: his color (the palette's first) is free. Then alice disconnects and
    // comes back: she gets her own color again, not the first free one.
    let left = request(&mut bob, json!({"type": "leave", "id": "l", "room": room})).await;
    assert_eq!(left["type"], "left", "{left}");
    alice.ws.close(None).await.unwrap();
    wait_for(
        &mut carol,
        "presence_diff",
        PROMPT,
        "alice's leave",
        |d| entry(d, "leaves", &alice_id).is_some(),
        |_| {},
    )
    .await;
    let (mut alice, alice_welcome) = WsClient::hello(bridge.addr, "alice").await;
    let state = join(&mut alice, "j", room, json!({})).await;
    let back = find(members(&state), &session(&alice_welcome)).unwrap();
    assert_eq!(
        color(back),
        alice_color,
        "a returning user keeps its color (bob's {bob_color} was free): {state}"
    );

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirteen_users_get_twelve_distinct_colors_first() {
    let db = TestDb::create("presence_palette").await;
    let bridge = support::start(db.config()).await;
    let room = "board:crowd";
    let mut clients = Vec::new();
    let mut colors = Vec::new();
    for i in 0..13 {
        let (mut client, welcome) = WsClient::hello(bridge.addr, &format!("user-{i}")).await;
        let state = join(&mut client, "j", room, json!({"i": i})).await;
        assert_eq!(members(&state).len(), i + 1, "{state}");
        let me = find(members(&state), &session(&welcome)).unwrap();
        colors.push(color(me).to_lowercase());
        // Everyone listed has the color it had when it joined.
        for (j, other) in clients.iter().enumerate() {
            let (_, id): &(WsClient, String) = other;
            assert_eq!(
                color(find(members(&state), id).unwrap()).to_lowercase(),
                colors[j],
                "{state}"
            );
        }
        clients.push((client, session(&welcome)));
    }
    let first: HashSet<&String> = colors[..12].iter().collect();
    assert_eq!(
        first.len(),
        12,
        "the first 12 users get distinct colors: {colors:?}"
    );
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_bad_request_and_too_large_reach_nobody() {
    let db = TestDb::create("presence_refusals").await;
    let bridge = support::start(db.config()).await;
    let room = "board:limits";
    let (mut ann, ann_welcome) = WsClient::hello(bridge.addr, "ann").await;
    let ann_id = session(&ann_welcome);
    let (mut bob, _) = WsClient::hello(bridge.addr, "bob").await;
    join(&mut bob, "j", room, json!({})).await;

    // Not joined: presence, broadcast and leave are bad_request, with their ids.
    for message in [
        json!({"type": "presence", "id": "p", "room": room, "state": {"x": 1}}),
        json!({"type": "broadcast", "id": "b", "room": room, "event": "e", "payload": 1}),
        json!({"type": "leave", "id": "l", "room": room}),
    ] {
        let id = message["id"].clone();
        let error = expect_error(&mut ann, message, "bad_request").await;
        assert_eq!(error["id"], id, "{error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // A state over 4096 bytes: too_large, and ann is not in the room.
    let big = json!({"blob": "x".repeat(5000)});
    expect_error(
        &mut ann,
        json!({"type": "join", "id": "big", "room": room, "state": big}),
        "too_large",
    )
    .await;
    expect_error(
        &mut ann,
        json!({"type": "presence", "id": "p2", "room": room, "state": {}}),
        "bad_request",
    )
    .await;
    // Under the limit is fine; bob's first diff is this join, with this state.
    let fine = json!({"blob": "y".repeat(3000)});
    join(&mut ann, "j", room, fine.clone()).await;
    let diff = next_diff(&mut bob, room).await;
    let joined = entry(&diff, "joins", &ann_id).unwrap_or_else(|| panic!("{diff}"));
    assert_eq!(
        joined["state"], fine,
        "the refused join left no trace: {diff}"
    );

    // An update over the limit: too_large; bob's next diff of ann is the later one.
    expect_error(
        &mut ann,
        json!({"type": "presence", "id": "p3", "room": room, "state": big}),
        "too_large",
    )
    .await;
    ann.send(json!({"type": "presence", "room": room, "state": {"after": true}}))
        .await;
    let diff = wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "ann's update",
        |d| entry(d, "updates", &ann_id).is_some(),
        |_| {},
    )
    .await;
    assert_eq!(
        entry(&diff, "updates", &ann_id).unwrap()["state"],
        json!({"after": true}),
        "{diff}"
    );

    // A broadcast payload over the limit: too_large; bob's first broadcast is the marker.
    expect_error(
        &mut ann,
        json!({"type": "broadcast", "id": "b2", "room": room, "event": "e", "payload": {"blob": "x".repeat(5000)}}),
        "too_large",
    )
    .await;
    ann.send(json!({"type": "broadcast", "room": room, "event": "marker", "payload": "m"}))
        .await;
    let got = bob.recv_type("broadcast").await;
    assert_eq!(got["payload"], "m", "{got}");

    // At most 100 rooms per connection (ann is in one): the 101st join is too_large.
    for i in 1..100 {
        join(&mut ann, &format!("r{i}"), &format!("many:{i}"), json!({})).await;
    }
    expect_error(
        &mut ann,
        json!({"type": "join", "id": "r100", "room": "many:100", "state": {}}),
        "too_large",
    )
    .await;
    // Leaving one makes room for another.
    let left = request(
        &mut ann,
        json!({"type": "leave", "id": "lx", "room": "many:1"}),
    )
    .await;
    assert_eq!(left["type"], "left", "{left}");
    join(&mut ann, "r100b", "many:100", json!({})).await;

    // Malformed: an unknown field, a missing room (the id may not be readable).
    for malformed in [
        json!({"type": "join", "id": "m1", "room": room, "colour": "red"}),
        json!({"type": "broadcast", "id": "m2", "event": "e", "payload": 1}),
    ] {
        ann.send(malformed.clone()).await;
        let error = ann.recv_type("error").await;
        assert_eq!(error["code"], "bad_request", "{malformed} → {error}");
    }

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broadcast_flood_is_rate_limited_and_nothing_is_dropped_silently() {
    let db = TestDb::create("presence_flood").await;
    let bridge = support::start(db.config()).await;
    let room = "board:flood";
    let (mut ann, _) = WsClient::hello(bridge.addr, "ann").await;
    let (mut bob, _) = WsClient::hello(bridge.addr, "bob").await;
    join(&mut ann, "j", room, json!({})).await;
    join(&mut bob, "j", room, json!({})).await;

    // 300 broadcasts at once against 100 per second (burst 100).
    const SENT: usize = 300;
    let mut frames = Vec::new();
    for i in 0..SENT {
        frames.push(
            json!({"type": "broadcast", "id": format!("f{i}"), "room": room, "event": "flood", "payload": {"i": i}})
                .to_string(),
        );
    }
    for frame in frames {
        ann.send_text(frame).await;
    }
    // Every answer to the flood comes before the pong of a ping sent after it.
    let pong = request(&mut ann, json!({"type": "ping", "id": "after-flood"})).await;
    assert_eq!(pong["type"], "pong");
    let mut limited = BTreeSet::new();
    for m in ann.pending.drain(..) {
        if m["type"] == "error" {
            assert_eq!(m["code"], "rate_limited", "{m}");
            let id = m["id"].as_str().unwrap_or_else(|| panic!("{m}"));
            limited.insert(id.trim_start_matches('f').parse::<usize>().unwrap());
        }
    }
    let accepted: BTreeSet<usize> = (0..SENT).filter(|i| !limited.contains(i)).collect();
    assert!(!limited.is_empty(), "a flood of {SENT} gets rate_limited");
    assert!(
        accepted.len() >= 100,
        "the burst (100) passes: {} accepted",
        accepted.len()
    );

    // A marker once the bucket refills (retried while it is itself rate limited).
    let deadline = Instant::now() + PATIENCE;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = format!("marker-{attempt}");
        ann.send(json!({"type": "broadcast", "id": id, "room": room, "event": "marker", "payload": "end"}))
            .await;
        let pong = request(
            &mut ann,
            json!({"type": "ping", "id": format!("pm{attempt}")}),
        )
        .await;
        assert_eq!(pong["type"], "pong");
        match ann.pending.iter().position(|m| m["id"] == id.as_str()) {
            None => break,
            Some(i) => {
                let m = ann.pending.remove(i).unwrap();
                assert_eq!(m["code"], "rate_limited", "{m}");
            }
        }
        assert!(Instant::now() < deadline, "the rate limit never refilled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Bob got exactly the broadcasts that were not refused, in order, then the marker.
    let mut received = Vec::new();
    loop {
        let got = bob.recv_type("broadcast").await;
        if got["event"] == "marker" {
            break;
        }
        received.push(got["payload"]["i"].as_u64().unwrap() as usize);
    }
    assert_eq!(
        received.len(),
        accepted.len(),
        "broadcasts received = broadcasts not answered rate_limited ({} of {SENT} were)",
        limited.len()
    );
    assert_eq!(
        received,
        accepted.iter().copied().collect::<Vec<_>>(),
        "the same ones, in order"
    );

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_room_needs_select_on_the_table() {
    let db = TestDb::create("presence_table_room").await;
    let owner = db.connect().await;
    owner
        .batch_execute(
            "CREATE TABLE secrets (id int PRIMARY KEY, body text);
             SELECT livesync.track('secrets');",
        )
        .await
        .unwrap();
    let bridge = support::start(db.config()).await;
    let (mut ann, ann_welcome) = WsClient::hello(bridge.addr, "ann").await;
    let (mut bob, _) = WsClient::hello(bridge.addr, "bob").await;
    // The app role may read items: its table room is joined like any room.
    join(&mut ann, "j1", "table:public.items", json!({"row": 1})).await;
    // It may not read secrets: forbidden, and the room never hears of it.
    let error = expect_error(
        &mut bob,
        json!({"type": "join", "id": "j2", "room": "table:public.secrets", "state": {}}),
        "forbidden",
    )
    .await;
    assert_eq!(error["id"], "j2");
    expect_error(
        &mut bob,
        json!({"type": "broadcast", "id": "b", "room": "table:public.secrets", "event": "e", "payload": 1}),
        "bad_request",
    )
    .await;
    join(&mut bob, "j3", "table:public.items", json!({})).await;
    let diff = next_diff(&mut ann, "table:public.items").await;
    assert_eq!(list(&diff, "joins").len(), 1, "{diff}");
    assert_ne!(
        list(&diff, "joins")[0]["connection"],
        ann_welcome["session"],
        "{diff}"
    );
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_reports_the_memory_backend() {
    let db = TestDb::create("presence_http").await;
    let bridge = support::start(db.config()).await;
    let base = format!("http://{}", bridge.addr);
    let http = reqwest::Client::new();
    // Ready once the database side is (LISTEN, the reader): poll.
    let ready: Value = rooms::eventually(PATIENCE, "/ready 200", || async {
        let r = http.get(format!("{base}/ready")).send().await.unwrap();
        if r.status() == 200 {
            r.json().await.ok()
        } else {
            None
        }
    })
    .await;
    assert_eq!(ready["presence"]["backend"], "memory", "{ready}");
    assert_eq!(ready["presence"]["healthy"], true, "{ready}");

    let (mut ann, _) = WsClient::hello(bridge.addr, "ann").await;
    let (mut bob, _) = WsClient::hello(bridge.addr, "bob").await;
    join(&mut ann, "j", "board:stats", json!({})).await;
    join(&mut bob, "j", "board:stats", json!({})).await;
    join(&mut bob, "j2", "board:other", json!({})).await;
    for n in 0..10 {
        ann.send(json!({"type": "presence", "room": "board:stats", "state": {"n": n}}))
            .await;
    }
    ann.send(json!({"type": "broadcast", "room": "board:stats", "event": "e", "payload": 1}))
        .await;
    bob.recv_type("broadcast").await;
    wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "ann's last update",
        |d| list(d, "updates").iter().any(|u| u["state"]["n"] == 9),
        |_| {},
    )
    .await;
    let stats: Value = http
        .get(format!("{base}/api/v1/sync/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let p = &stats["presence"];
    assert_eq!(p["backend"], "memory", "{stats}");
    assert_eq!(p["healthy"], true, "{stats}");
    assert_eq!(p["rooms"], 2, "{p}");
    assert_eq!(p["members"], 3, "{p}");
    for counter in [
        "presence_updates",
        "coalesced_updates",
        "diffs_sent",
        "broadcasts",
    ] {
        assert!(
            p[counter].as_u64().is_some_and(|n| n > 0),
            "{counter} counts: {p}"
        );
    }
    assert_eq!(p["redis_errors"], 0, "{p}");

    let cleanup = http
        .post(format!("{base}/api/v1/sync/cleanup"))
        .send()
        .await
        .unwrap();
    assert_eq!(cleanup.status(), 200);
    let cleanup: Value = cleanup.json().await.unwrap();
    assert_eq!(
        cleanup["presence_swept"], 0,
        "live members are not stale: {cleanup}"
    );

    bridge.shutdown().await;
    db.drop_db().await;
}

// ---- Room policies (TOML) with JWT auth: the binary with a config file. ----

const SECRET: &str = "presence-test-secret-long-enough";

fn token(sub: &str, tier: Option<Value>) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut claims = json!({"sub": sub, "exp": exp});
    if let Some(tier) = tier {
        claims["tier"] = tier;
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn hello_as(bridge: &BridgeProcess, sub: &str, tier: Option<Value>) -> (WsClient, String) {
    let mut client = WsClient::connect(bridge.addr).await;
    client
        .send(
            json!({"type": "hello", "client_id": "tab", "token": token(sub, tier), "protocol": 1}),
        )
        .await;
    let welcome = client.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let id = session(&welcome);
    (client, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_policies_decide_who_joins_and_broadcasts() {
    let db = TestDb::create("presence_policy").await;
    let file = std::env::temp_dir().join(format!(
        "livesync-presence-policy-{}.toml",
        std::process::id()
    ));
    std::fs::write(
        &file,
        r#"
[[rooms]]
pattern = "match:*"
join = { claim = "tier", any_of = ["spectator", "referee"] }
broadcast = { claim = "tier", any_of = ["referee"] }

[[rooms]]
pattern = "board:*"
join = "authenticated"
broadcast = "authenticated"
"#,
    )
    .unwrap();
    let bridge = BridgeProcess::start(
        &db,
        "policy-node",
        &[
            ("LIVESYNC_CONFIG", file.display().to_string()),
            ("LIVESYNC_JWT_SECRET", SECRET.to_string()),
        ],
    )
    .await;
    let room = "match:1";

    let (mut referee, referee_id) = hello_as(&bridge, "rita", Some(json!("referee"))).await;
    let state = join(&mut referee, "j", room, json!({})).await;
    assert_eq!(
        find(members(&state), &referee_id).unwrap()["user"],
        "rita",
        "the user is the token's sub: {state}"
    );
    let (mut spectator, spectator_id) = hello_as(&bridge, "sam", Some(json!("spectator"))).await;
    join(&mut spectator, "j", room, json!({})).await;
    let diff = next_diff(&mut referee, room).await;
    assert!(entry(&diff, "joins", &spectator_id).is_some(), "{diff}");

    // A tier not listed, or no tier claim at all: the join is forbidden.
    let (mut player, _) = hello_as(&bridge, "pat", Some(json!("player"))).await;
    let error = expect_error(
        &mut player,
        json!({"type": "join", "id": "pj", "room": room, "state": {}}),
        "forbidden",
    )
    .await;
    assert_eq!(error["id"], "pj");
    let (mut nobody, _) = hello_as(&bridge, "nina", None).await;
    expect_error(
        &mut nobody,
        json!({"type": "join", "id": "nj", "room": room, "state": {}}),
        "forbidden",
    )
    .await;
    // An array claim matches when any element does: coach is also a referee. The
    // referee's next diff is coach's join: the refused joins never reached the room.
    let (mut coach, coach_id) = hello_as(&bridge, "cora", Some(json!(["coach", "referee"]))).await;
    join(&mut coach, "j", room, json!({"coach": true})).await;
    let diff = next_diff(&mut referee, room).await;
    assert_eq!(list(&diff, "joins").len(), 1, "{diff}");
    assert_eq!(
        list(&diff, "joins")[0]["connection"],
        coach_id.as_str(),
        "{diff}"
    );

    // The spectator may join, not broadcast: forbidden, and nobody receives it. Proof:
    // the first broadcast the referee and the spectator get is coach's later marker.
    let error = expect_error(
        &mut spectator,
        json!({"type": "broadcast", "id": "sb", "room": room, "event": "cheer", "payload": "go!", "echo": true}),
        "forbidden",
    )
    .await;
    assert_eq!(error["id"], "sb");
    coach
        .send(json!({"type": "broadcast", "room": room, "event": "marker", "payload": "whistle"}))
        .await;
    for (who, client) in [("referee", &mut referee), ("spectator", &mut spectator)] {
        let got = client.recv_type("broadcast").await;
        assert_eq!(
            got["payload"], "whistle",
            "{who}'s first broadcast is the marker, not the forbidden one: {got}"
        );
        assert_eq!(got["from"]["user"], "cora");
    }
    // The referee broadcasts; the spectator hears it.
    referee
        .send(json!({"type": "broadcast", "id": "rb", "room": room, "event": "card", "payload": {"color": "yellow"}}))
        .await;
    let got = spectator.recv_type("broadcast").await;
    assert_eq!(got["payload"], json!({"color": "yellow"}), "{got}");
    assert_eq!(got["from"]["connection"], referee_id.as_str(), "{got}");

    // "authenticated": with auth on, any valid token; a room no rule matches: anyone.
    for r in ["board:7", "lobby"] {
        join(&mut player, "pb", r, json!({})).await;
        join(&mut nobody, "nb", r, json!({})).await;
        player
            .send(json!({"type": "broadcast", "id": "pbb", "room": r, "event": "hi", "payload": r}))
            .await;
        let got = nobody.recv_type("broadcast").await;
        assert_eq!(got["payload"], r, "{got}");
        assert!(
            !player.pending.iter().any(|m| m["id"] == "pbb"),
            "no error for an allowed broadcast"
        );
    }

    drop(bridge);
    let _ = std::fs::remove_file(&file);
    db.drop_db().await;
}
