//! Adversarial: presence, cursors and broadcast (issue 13) driven the way a demanding
//! user would: real bridges (in-process, or the binary when it must be paused), a
//! private `redis-server` on a free port, real WebSocket clients. Each test names the
//! defect it pins down; all assert the protocol (docs/protocol.md, "Presence and
//! broadcast"), never internals, except the node's own room count in stats.

mod support;

#[path = "support/bridge_process.rs"]
mod bridge_process;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rooms.rs"]
mod rooms;

use std::collections::HashMap;
use std::time::Duration;

use bridge_process::BridgeProcess;
use livesync_bridge::RunningBridge;
use redis_server::RedisServer;
use rooms::{entry, eventually, find, join, list, members, request, wait_for};
use serde_json::{json, Value};
use support::{TestDb, WsClient};

/// How long a diff or broadcast may take to arrive (a few heartbeat periods).
const PROMPT: Duration = Duration::from_secs(8);

fn session(welcome: &Value) -> String {
    welcome["session"]
        .as_str()
        .unwrap_or_else(|| panic!("welcome has a session: {welcome}"))
        .to_string()
}

/// An in-process bridge on `db`, named `node`, on `redis` (None: in memory).
async fn bridge_on(db: &TestDb, node: &str, redis: Option<&RedisServer>) -> RunningBridge {
    let mut config = db.config();
    config.node_name = node.to_string();
    config.redis_url = redis.map(RedisServer::url);
    config.presence.ttl = Duration::from_millis(3000);
    support::start(config).await
}

/// A JSON value nested `depth` objects deep: `{"a":{"a":...{"a":1}}}`.
fn nested(depth: usize) -> Value {
    let text = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
    let mut de = serde_json::Deserializer::from_str(&text);
    de.disable_recursion_limit();
    serde::Deserialize::deserialize(&mut de).expect("nested JSON")
}

/// Reads what a client has received so far (until `quiet` passes with nothing new).
async fn drain(client: &mut WsClient, quiet: Duration) -> Vec<Value> {
    let mut out: Vec<Value> = client.pending.drain(..).collect();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(quiet, client.ws.next()).await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            out.push(serde_json::from_str(&text).expect("JSON text frames"));
        }
    }
    out
}

use futures_util::StreamExt;

// ---- LocalRoom leak: leaving with an update still pending keeps the room forever ----

/// Found: `RoomHub::leave` keeps a room whose flush is running ("flushing"), and the
/// flush, finding nothing pending, clears the flag and returns without removing the
/// now empty room. Every room left right after a `presence` stayed in the node's map
/// for good (stats `rooms` counted it; the liveness tick walked it forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_left_with_an_update_in_flight_is_not_kept_forever() {
    let db = TestDb::create("advp_leak").await;
    let bridge = bridge_on(&db, "leak-a", None).await;
    let (mut ann, _) = WsClient::hello(bridge.addr, "ann").await;
    for i in 0..30 {
        let room = format!("doc:leak:{i}");
        join(&mut ann, &format!("j{i}"), &room, json!({})).await;
        ann.send(json!({"type": "presence", "room": room, "state": {"i": i}}))
            .await;
        let left = request(
            &mut ann,
            json!({"type": "leave", "id": format!("l{i}"), "room": room}),
        )
        .await;
        assert_eq!(left["type"], "left", "{left}");
    }
    let state = bridge.state.clone();
    eventually(
        Duration::from_secs(5),
        "the node to forget the rooms it has no member in",
        || {
            let stats = state.rooms.stats();
            async move { (stats.rooms == 0 && stats.members == 0).then_some(()) }
        },
    )
    .await;
    drop(ann);
    bridge.shutdown().await;
    db.drop_db().await;
}

// ---- Deep states vanish between nodes ----

/// Found: a state the bridge accepts (nested 124 deep: the client's frame is 125 deep,
/// within serde_json's 128) travels between nodes inside an envelope 5 levels deeper;
/// the receiving node's subscriber could not parse it ("recursion limit exceeded") and
/// dropped the diff with a warning: members on other nodes never heard of that join
/// (nor of a broadcast nested as deep), while members on the same node did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deeply_nested_state_or_payload_reaches_the_other_nodes() {
    let db = TestDb::create("advp_deep").await;
    let redis = RedisServer::start();
    let a = bridge_on(&db, "deep-a", Some(&redis)).await;
    let b = bridge_on(&db, "deep-b", Some(&redis)).await;
    let room = "board:deep";
    let (mut bob, _) = WsClient::hello(b.addr, "bob").await;
    join(&mut bob, "j", room, json!({})).await;
    let (mut ann, ann_welcome) = WsClient::hello(a.addr, "ann").await;
    let ann_id = session(&ann_welcome);
    let deep = nested(124);
    let state = join(&mut ann, "j", room, deep.clone()).await;
    assert_eq!(find(members(&state), &ann_id).unwrap()["state"], deep);
    let diff = wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "ann's deep join on the other node",
        |d| entry(d, "joins", &ann_id).is_some(),
        |_| {},
    )
    .await;
    assert_eq!(entry(&diff, "joins", &ann_id).unwrap()["state"], deep);

    let payload = nested(124);
    ann.send(json!({"type": "broadcast", "room": room, "event": "deep", "payload": payload}))
        .await;
    let got = tokio::time::timeout(PROMPT, bob.recv_type("broadcast"))
        .await
        .expect("the deep broadcast reaches the other node");
    assert_eq!(got["payload"], payload);

    drop((ann, bob));
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

// ---- A coalesced update delivered after the member's leave ----

/// What an observer believes about `actor` after each message; returns the first
/// message that contradicts the order join → updates → leave (an update or a leave of
/// a member not present, or a join of one present).
fn first_out_of_order(messages: &[Value], room: &str, actor: &str) -> Option<String> {
    let mut present = true; // the actor is in the room when observation starts
    for m in messages {
        if m["type"] == "presence_state" && m["room"] == room {
            present = find(members(m), actor).is_some();
            continue;
        }
        if m["type"] != "presence_diff" || m["room"] != room {
            continue;
        }
        if entry(m, "joins", actor).is_some() {
            if present {
                return Some(format!("a join of a member present: {m}"));
            }
            present = true;
        }
        if entry(m, "updates", actor).is_some() && !present {
            return Some(format!("an update after the member's leave: {m}"));
        }
        if entry(m, "leaves", actor).is_some() {
            if !present {
                return Some(format!("a leave of a member not present: {m}"));
            }
            present = false;
        }
    }
    None
}

/// Found: `presence` then `leave` right away. The room's flush had taken the pending
/// state and written it to the store just before the leave removed the member; the
/// flush then delivered (and published) its `updates` diff after the leave's diff:
/// observers saw the member leave and then get an update, i.e. come back as a ghost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_never_arrives_after_its_members_leave() {
    let db = TestDb::create("advp_order").await;
    let redis = RedisServer::start();
    let a = bridge_on(&db, "order-a", Some(&redis)).await;
    let b = bridge_on(&db, "order-b", Some(&redis)).await;
    let room = "board:order";
    let (mut near, _) = WsClient::hello(a.addr, "near").await;
    let (mut far, _) = WsClient::hello(b.addr, "far").await;
    join(&mut near, "j", room, json!({})).await;
    join(&mut far, "j", room, json!({})).await;
    let (mut actor, actor_welcome) = WsClient::hello(a.addr, "actor").await;
    let actor_id = session(&actor_welcome);
    join(&mut actor, "j0", room, json!({})).await;
    // Let both observers see the first join before recording.
    for o in [&mut near, &mut far] {
        wait_for(
            o,
            "presence_diff",
            PROMPT,
            "the actor's first join",
            |d| entry(d, "joins", &actor_id).is_some(),
            |_| {},
        )
        .await;
    }
    // Busy neighbours on the actor's node: each flush of the room writes a batch of
    // states, so a leave lands among them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut busy = Vec::new();
    for n in 0..30 {
        let (mut c, _) = WsClient::hello(a.addr, &format!("busy{n}")).await;
        join(&mut c, "j", room, json!({})).await;
        let stop = stop.clone();
        busy.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.send(json!({"type": "presence", "room": room, "state": {"k": k}}))
                    .await;
                k += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
                // Keep its socket drained.
                while let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(1), c.ws.next()).await
                {
                }
            }
            c
        }));
    }
    for i in 0..100 {
        actor
            .send(json!({"type": "presence", "room": room, "state": {"i": i}}))
            .await;
        let left = request(
            &mut actor,
            json!({"type": "leave", "id": format!("l{i}"), "room": room}),
        )
        .await;
        assert_eq!(left["type"], "left", "{left}");
        join(&mut actor, &format!("j{}", i + 1), room, json!({})).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in busy {
        drop(t.await.unwrap());
    }
    for (name, o) in [("same node", &mut near), ("other node", &mut far)] {
        let seen = drain(o, Duration::from_millis(1500)).await;
        if let Some(bad) = first_out_of_order(&seen, room, &actor_id) {
            panic!("observer on the {name}: {bad}");
        }
    }
    drop((near, far, actor));
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

// ---- A node paused past the TTL ----

/// Applies presence messages of `room` to a client's view of its members.
fn apply_view(view: &mut HashMap<String, Value>, m: &Value, room: &str) {
    if m["room"] != room {
        return;
    }
    if m["type"] == "presence_state" {
        view.clear();
        for member in members(m) {
            view.insert(
                member["connection"].as_str().unwrap().into(),
                member.clone(),
            );
        }
    } else if m["type"] == "presence_diff" {
        for j in list(m, "joins").into_iter().chain(list(m, "updates")) {
            view.insert(j["connection"].as_str().unwrap().into(), j);
        }
        for l in list(m, "leaves") {
            view.remove(l["connection"].as_str().unwrap());
        }
    }
}

/// Found: node A is SIGSTOPped longer than the TTL; B reaps A's members and publishes
/// their leaves, which A's clients read when A resumes (they are told that they and
/// their neighbour on A left). A's heartbeat then puts its members back, publishing
/// the joins to every member *but those put back*, whose fresh `presence_state` was
/// supposed to tell them (it is sent after a broker reconnect, not after a heartbeat
/// found members missing): A's clients stayed believing they were alone on B's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_paused_past_the_ttl_gives_its_clients_their_room_back() {
    let db = TestDb::create("advp_pause").await;
    let redis = RedisServer::start();
    let ttl = Duration::from_millis(1500);
    let env = vec![
        ("REDIS_URL", redis.url()),
        ("LIVESYNC_PRESENCE_TTL_MS", ttl.as_millis().to_string()),
    ];
    let a = BridgeProcess::start(&db, "pause-a", &env).await;
    let b = BridgeProcess::start(&db, "pause-b", &env).await;
    let room = "board:pause";
    let (mut zed, zed_welcome) = WsClient::hello(b.addr, "zed").await;
    let zed_id = session(&zed_welcome);
    join(&mut zed, "j", room, json!({})).await;
    let (mut xan, xan_welcome) = WsClient::hello(a.addr, "xan").await;
    let xan_id = session(&xan_welcome);
    let (mut yul, yul_welcome) = WsClient::hello(a.addr, "yul").await;
    let yul_id = session(&yul_welcome);
    let mut xan_view = HashMap::new();
    let state = join(&mut xan, "j", room, json!({"who": "xan"})).await;
    apply_view(&mut xan_view, &state, room);
    join(&mut yul, "j", room, json!({"who": "yul"})).await;

    let pid = a.pid().expect("node A runs").to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    // B reaps A: zed sees xan and yul leave.
    let result = tokio::time::timeout(Duration::from_secs(15), async {
        let mut gone = (false, false);
        while !(gone.0 && gone.1) {
            let d = zed.recv_type("presence_diff").await;
            gone.0 |= entry(&d, "leaves", &xan_id).is_some();
            gone.1 |= entry(&d, "leaves", &yul_id).is_some();
        }
    })
    .await;
    signal("-CONT");
    result.expect("the paused node's members are reaped within the TTL");
    // A resumes and puts them back: zed sees them again...
    wait_for(
        &mut zed,
        "presence_diff",
        PROMPT,
        "yul back after A resumed",
        |d| entry(d, "joins", &yul_id).is_some(),
        |_| {},
    )
    .await;
    // ...and xan, told meanwhile that yul (and xan itself) left, must end up seeing
    // the room as it is: itself, yul and zed.
    let deadline = tokio::time::Instant::now() + PROMPT;
    loop {
        for m in drain(&mut xan, Duration::from_millis(200)).await {
            apply_view(&mut xan_view, &m, room);
        }
        let mut seen: Vec<&String> = xan_view.keys().collect();
        seen.sort();
        let mut want = vec![&xan_id, &yul_id, &zed_id];
        want.sort();
        if seen == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "xan (on the paused node) believes the room holds {seen:?}, not {want:?}"
        );
    }
    drop((xan, yul, zed));
    drop((a, b));
    db.drop_db().await;
}

// ---- Held: join and close at once leaves no ghost; tabs share a color ----

/// Held: connections that join and close without waiting for anything leave no member
/// behind, in the store (a later joiner's `presence_state`) or in the observer's view.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_and_close_at_once_leaves_no_ghost() {
    let db = TestDb::create("advp_ghost").await;
    let redis = RedisServer::start();
    let a = bridge_on(&db, "ghost-a", Some(&redis)).await;
    let b = bridge_on(&db, "ghost-b", Some(&redis)).await;
    let room = "board:ghost";
    let (mut obs, obs_welcome) = WsClient::hello(b.addr, "obs").await;
    let obs_id = session(&obs_welcome);
    let state = join(&mut obs, "j", room, json!({})).await;
    let mut view = HashMap::new();
    apply_view(&mut view, &state, room);
    let mut ghosts = Vec::new();
    for i in 0..20 {
        let (mut c, w) = WsClient::hello(a.addr, &format!("ghost{i}")).await;
        ghosts.push(session(&w));
        c.send(json!({"type": "join", "id": "j", "room": room, "state": {"i": i}}))
            .await;
        c.send(json!({"type": "presence", "room": room, "state": {"i": -i}}))
            .await;
        let _ = c.ws.close(None).await;
    }
    let (mut late, late_welcome) = WsClient::hello(b.addr, "late").await;
    let late_id = session(&late_welcome);
    eventually(PROMPT, "a store holding no ghost", || {
        let addr = b.addr;
        async move {
            let (mut probe, _) = WsClient::hello(addr, "probe").await;
            let state = join(&mut probe, "p", room, json!({})).await;
            // The observer and the probe, nobody else.
            (members(&state).len() == 2).then_some(())
        }
    })
    .await;
    join(&mut late, "j", room, json!({})).await;
    for m in drain(&mut obs, Duration::from_millis(1000)).await {
        apply_view(&mut view, &m, room);
    }
    for g in &ghosts {
        assert!(!view.contains_key(g), "the observer still sees ghost {g}");
    }
    assert!(view.contains_key(&late_id) && view.contains_key(&obs_id));
    drop((obs, late));
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

/// Held: six tabs of one user opened at once on two nodes, with five other users
/// joining at the same moment: one color for the user's tabs, distinct colors among
/// users; a tab leaving removes that tab only; a new tab later gets the same color.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_tabs_share_one_color_and_leave_alone() {
    let db = TestDb::create("advp_tabs").await;
    let redis = RedisServer::start();
    let a = bridge_on(&db, "tabs-a", Some(&redis)).await;
    let b = bridge_on(&db, "tabs-b", Some(&redis)).await;
    let room = "board:tabs";
    let addrs = [a.addr, b.addr];
    let mut tasks = Vec::new();
    for i in 0..11 {
        let user = if i < 6 {
            "ann".to_string()
        } else {
            format!("u{i}")
        };
        let addr = addrs[i % 2];
        tasks.push(tokio::spawn(async move {
            let (mut c, w) = WsClient::hello(addr, &user).await;
            join(&mut c, "j", room, json!({})).await;
            (user, session(&w), c)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let (mut probe, _) = WsClient::hello(a.addr, "probe").await;
    let state = join(&mut probe, "p", room, json!({})).await;
    let mut colors: HashMap<String, String> = HashMap::new();
    for m in members(&state) {
        let user = m["user"].as_str().unwrap().to_string();
        let color = rooms::color(m);
        if let Some(c) = colors.get(&user) {
            assert_eq!(*c, color, "{user}'s tabs share one color: {state}");
        }
        colors.insert(user, color);
    }
    assert_eq!(colors.len(), 7, "{state}");
    let mut distinct: Vec<&String> = colors.values().collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        7,
        "distinct colors while the palette lasts: {colors:?}"
    );
    // One of ann's tabs leaves: only that one.
    let (_, tab0, c0) = &mut clients[0];
    let tab0 = tab0.clone();
    let left = request(c0, json!({"type": "leave", "id": "l", "room": room})).await;
    assert_eq!(left["type"], "left");
    rooms::diff_having(&mut probe, room, "leaves", &tab0, PROMPT).await;
    let (mut probe2, _) = WsClient::hello(b.addr, "probe2").await;
    let state = join(&mut probe2, "p", room, json!({})).await;
    let anns = members(&state)
        .iter()
        .filter(|m| m["user"] == "ann")
        .count();
    assert_eq!(anns, 5, "{state}");
    let (mut again, _) = WsClient::hello(b.addr, "ann").await;
    let state = join(&mut again, "j", room, json!({})).await;
    for m in members(&state).iter().filter(|m| m["user"] == "ann") {
        assert_eq!(rooms::color(m), colors["ann"], "{state}");
    }
    drop((clients, probe, probe2, again));
    a.shutdown().await;
    b.shutdown().await;
    db.drop_db().await;
}

// ---- Room names ----

/// Found: a room name starting with `}` gives its Redis keys an empty hash tag
/// (`livesync:presence:{}x}:members`), so on Redis Cluster the seven keys of the room
/// hash to different slots and every script fails with CROSSSLOT: such a room
/// answered `unavailable` forever (and counted Redis errors). Now refused up front as
/// `bad_request` on every backend; other braces, unicode and long names still work,
/// and empty or over-long names are refused without touching the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn odd_room_names_are_served_or_refused_cleanly() {
    let db = TestDb::create("advp_names").await;
    let bridge = bridge_on(&db, "names-a", None).await;
    let (mut ann, _) = WsClient::hello(bridge.addr, "ann").await;
    for (i, room) in ["}x", "}", ""].iter().enumerate() {
        rooms::expect_error(
            &mut ann,
            json!({"type": "join", "id": format!("bad{i}"), "room": room}),
            "bad_request",
        )
        .await;
    }
    let long = "r".repeat(1025);
    rooms::expect_error(
        &mut ann,
        json!({"type": "join", "id": "long", "room": long}),
        "bad_request",
    )
    .await;
    for (i, room) in ["a}b", "{x", "{}", "{", "доска:42 ✓", &"r".repeat(1024)]
        .iter()
        .enumerate()
    {
        let state = join(&mut ann, &format!("ok{i}"), room, json!({})).await;
        assert_eq!(members(&state).len(), 1, "{state}");
    }
    let stats = bridge.state.rooms.stats();
    assert_eq!(stats.rooms, 6, "only the rooms joined: {stats:?}");
    drop(ann);
    bridge.shutdown().await;
    db.drop_db().await;
}
