//! Presence across bridge processes sharing one database and one Redis (a
//! `redis-server` of each test's own, on a free port): members, cursors and broadcasts
//! cross nodes; a SIGKILLed node's members leave within the TTL and keep their colors
//! when they come back elsewhere; Redis restarting empty costs presence only while it is
//! down (changes keep streaming) and presence recovers without restarting the bridges;
//! stats and metrics count it all. Black-box: the binary, WebSocket JSON and HTTP.

mod support;

#[path = "support/bridge_process.rs"]
mod bridge_process;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rooms.rs"]
mod rooms;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bridge_process::BridgeProcess;
use redis_server::RedisServer;
use rooms::{
    assert_member, color, diff_having, entry, eventually, expect_error, find, join, list, members,
    metric, request, wait_for,
};
use serde_json::{json, Value};
use support::{TestDb, WsClient, PATIENCE};

const TTL: Duration = Duration::from_millis(3000);
/// How long a cross-node diff or broadcast may take (several heartbeat periods).
const PROMPT: Duration = Duration::from_secs(8);

fn session(welcome: &Value) -> String {
    welcome["session"]
        .as_str()
        .unwrap_or_else(|| panic!("welcome has a session: {welcome}"))
        .to_string()
}

/// A database, a private Redis, and one bridge process per name, all on that Redis.
async fn cluster(name: &str, nodes: &[&str]) -> (TestDb, RedisServer, Vec<BridgeProcess>) {
    let db = TestDb::create(name).await;
    let redis = RedisServer::start();
    let mut bridges = Vec::new();
    for node in nodes {
        bridges.push(BridgeProcess::start(&db, node, &node_env(&redis)).await);
    }
    (db, redis, bridges)
}

fn node_env(redis: &RedisServer) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", redis.url()),
        ("LIVESYNC_PRESENCE_TTL_MS", TTL.as_millis().to_string()),
    ]
}

/// `/ready`: status and its presence object.
async fn ready(node: &BridgeProcess) -> (u16, Value) {
    let (status, body) = node.get_json("/ready").await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_cursors_broadcasts_and_writes_cross_nodes() {
    let (db, _redis, nodes) = cluster("pnodes_cross", &["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    for node in [a, b] {
        let (status, body) = ready(node).await;
        assert_eq!(status, 200);
        assert_eq!(body["presence"]["backend"], "redis", "{body}");
        assert_eq!(body["presence"]["healthy"], true, "{body}");
    }
    let room = "board:cross";

    let (mut ann, ann_welcome) = WsClient::hello(a.addr, "ann").await;
    assert_eq!(ann_welcome["node"], "node-a");
    let ann_id = session(&ann_welcome);
    let ann_state = json!({"name": "Ann"});
    let state = join(&mut ann, "j", room, ann_state.clone()).await;
    let ann_color = color(find(members(&state), &ann_id).unwrap());
    ann.subscribe("s", "table:public.items", None, None).await;

    // A member joining on B: listed to itself with ann (node-a); ann hears of it.
    let (mut bob, bob_welcome) = WsClient::hello(b.addr, "bob").await;
    assert_eq!(bob_welcome["node"], "node-b");
    let bob_id = session(&bob_welcome);
    let bob_state = json!({"name": "Bob"});
    let state = join(&mut bob, "j", room, bob_state.clone()).await;
    assert_eq!(members(&state).len(), 2, "{state}");
    let listed_ann = find(members(&state), &ann_id).expect("ann is listed on node B");
    assert_member(listed_ann, &ann_id, "ann", "node-a", &ann_state);
    assert_eq!(color(listed_ann), ann_color, "one color on every node");
    let bob_member = find(members(&state), &bob_id).unwrap();
    assert_member(bob_member, &bob_id, "bob", "node-b", &bob_state);
    let bob_color = color(bob_member);
    assert_ne!(bob_color.to_lowercase(), ann_color.to_lowercase());
    let diff = diff_having(&mut ann, room, "joins", &bob_id, PROMPT).await;
    let joined = entry(&diff, "joins", &bob_id).unwrap();
    assert_member(joined, &bob_id, "bob", "node-b", &bob_state);
    assert_eq!(color(joined), bob_color);

    // B's cursor updates reach A, ending on the last one.
    for x in 0..10 {
        bob.send(json!({"type": "presence", "room": room, "state": {"cursor": {"record": "7", "field": "title", "x": x, "y": 20}}}))
            .await;
    }
    let diff = wait_for(
        &mut ann,
        "presence_diff",
        PROMPT,
        "bob's last cursor on node A",
        |d| entry(d, "updates", &bob_id).is_some_and(|u| u["state"]["cursor"]["x"] == 9),
        |d| assert!(list(d, "leaves").is_empty(), "{d}"),
    )
    .await;
    let update = entry(&diff, "updates", &bob_id).unwrap();
    assert_eq!(update["node"], "node-b", "{update}");
    assert_eq!(color(update), bob_color);
    // Bob gets his own updates too, and never heard of his own join (from his node,
    // or back through Redis).
    let diff = wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "bob's last cursor on node B",
        |d| entry(d, "updates", &bob_id).is_some_and(|u| u["state"]["cursor"]["x"] == 9),
        |d| assert!(entry(d, "joins", &bob_id).is_none(), "{d}"),
    )
    .await;
    assert!(entry(&diff, "joins", &bob_id).is_none(), "{diff}");

    // Broadcasts both ways.
    bob.send(json!({"type": "broadcast", "room": room, "event": "cursor", "payload": {"x": 1, "y": [2, 3]}}))
        .await;
    let got = tokio::time::timeout(PROMPT, ann.recv_type("broadcast"))
        .await
        .expect("bob's broadcast reaches node A");
    assert_eq!(got["room"], room, "{got}");
    assert_eq!(got["event"], "cursor", "{got}");
    assert_eq!(got["payload"], json!({"x": 1, "y": [2, 3]}), "{got}");
    assert_eq!(got["from"]["connection"], bob_id.as_str(), "{got}");
    assert_eq!(got["from"]["user"], "bob", "{got}");
    ann.send(json!({"type": "broadcast", "room": room, "event": "hi", "payload": "from a", "echo": true}))
        .await;
    let got = tokio::time::timeout(PROMPT, bob.recv_type("broadcast"))
        .await
        .expect("ann's broadcast reaches node B");
    assert_eq!(got["payload"], "from a", "{got}");
    assert_eq!(got["from"]["connection"], ann_id.as_str(), "{got}");
    let echo = ann.recv_type("broadcast").await;
    assert_eq!(
        echo["payload"], "from a",
        "ann's first broadcast is her echo (bob's own was not echoed to him): {echo}"
    );

    // A row written through B's socket reaches A's subscriber.
    let result = request(
        &mut bob,
        json!({"type": "write", "id": "w", "table": "items", "op": "insert", "key": {"id": 42},
               "values": {"id": 42, "title": "written on b", "score": 1}, "mutation_id": 1}),
    )
    .await;
    assert_eq!(result["type"], "write_result", "{result}");
    assert_eq!(result["status"], "applied", "{result}");
    let changes = ann.recv_changes().await;
    let change = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == json!({"id": 42}))
        .unwrap_or_else(|| panic!("the write reaches node A: {changes}"))
        .clone();
    assert_eq!(change["op"], "insert", "{change}");
    assert_eq!(change["delta"]["title"]["new"], "written on b", "{change}");
    assert_eq!(change["client_id"], "bob", "{change}");

    // Leaving on B is a leave on A.
    let left = request(&mut bob, json!({"type": "leave", "id": "l", "room": room})).await;
    assert_eq!(left["type"], "left", "{left}");
    diff_having(&mut ann, room, "leaves", &bob_id, PROMPT).await;

    drop(nodes);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_nodes_members_leave_within_the_ttl_and_keep_their_colors() {
    let (db, _redis, mut nodes) = cluster("pnodes_kill", &["node-a", "node-b"]).await;
    let room = "board:kill";
    let (mut ann, ann_welcome) = WsClient::hello(nodes[0].addr, "ann").await;
    let ann_id = session(&ann_welcome);
    join(&mut ann, "j", room, json!({})).await;
    let mut before = BTreeMap::new();
    let mut on_b = Vec::new();
    for user in ["bob", "bea"] {
        let (mut client, welcome) = WsClient::hello(nodes[1].addr, user).await;
        let id = session(&welcome);
        let state = join(&mut client, "j", room, json!({"user": user})).await;
        before.insert(user, color(find(members(&state), &id).unwrap()));
        diff_having(&mut ann, room, "joins", &id, PROMPT).await;
        on_b.push((client, id));
    }

    // SIGKILL node B: no leave is ever sent by it; A sweeps its members within the TTL.
    let killed = Instant::now();
    nodes[1].kill();
    let mut gone: Vec<String> = Vec::new();
    while gone.len() < on_b.len() {
        let diff = wait_for(
            &mut ann,
            "presence_diff",
            TTL + Duration::from_secs(10),
            "B's members leaving on A",
            |d| !list(d, "leaves").is_empty(),
            |d| assert!(list(d, "joins").is_empty(), "{d}"),
        )
        .await;
        for leave in list(&diff, "leaves") {
            let id = leave["connection"].as_str().unwrap().to_string();
            assert!(
                on_b.iter().any(|(_, b)| *b == id),
                "only B's members leave: {diff}"
            );
            assert_eq!(leave["node"], "node-b", "{diff}");
            gone.push(id);
        }
    }
    let took = killed.elapsed();
    let dead: Vec<String> = on_b.iter().map(|(_, id)| id.clone()).collect();
    let bound = TTL + TTL / 3 + Duration::from_millis(1500);
    assert!(
        took <= bound,
        "B's members left after {took:?}, more than TTL + a sweep period + slack ({bound:?})"
    );
    gone.sort();
    gone.dedup();
    assert_eq!(gone.len(), 2, "each leaves once");
    // Their clients see the connection end.
    for (client, _) in &mut on_b {
        while client.recv_raw().await.is_some() {}
    }

    // They reconnect to A — bea first, so the first free color would be bob's — and
    // each gets the color they had.
    for user in ["bea", "bob"] {
        let (mut client, welcome) = WsClient::hello(nodes[0].addr, user).await;
        let id = session(&welcome);
        let state = join(&mut client, "j", room, json!({"user": user, "back": true})).await;
        let me = find(members(&state), &id).unwrap();
        assert_eq!(me["node"], "node-a");
        assert_eq!(
            color(me),
            before[user],
            "{user} keeps its color across nodes: {state}"
        );
        assert!(
            !members(&state)
                .iter()
                .any(|m| dead.iter().any(|d| m["connection"] == d.as_str())),
            "no member of the dead node is listed: {state}"
        );
        let diff = diff_having(&mut ann, room, "joins", &id, PROMPT).await;
        assert_eq!(color(entry(&diff, "joins", &id).unwrap()), before[user]);
        on_b.push((client, id));
    }
    assert!(!ann_id.is_empty());

    drop(nodes);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_recovers_after_redis_restarts_empty_while_changes_keep_flowing() {
    let (db, mut redis, nodes) = cluster("pnodes_redis", &["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let room = "board:outage";

    // Two early users take the palette's first colors and leave, so ann's and bob's
    // colors are not what a fresh assignment would give them.
    let mut early = Vec::new();
    for user in ["early-1", "early-2"] {
        let (mut client, welcome) = WsClient::hello(a.addr, user).await;
        join(&mut client, "j", room, json!({})).await;
        early.push((client, session(&welcome)));
    }
    let (mut ann, ann_welcome) = WsClient::hello(a.addr, "ann").await;
    let ann_id = session(&ann_welcome);
    let state = join(&mut ann, "j", room, json!({"who": "ann"})).await;
    let ann_color = color(find(members(&state), &ann_id).unwrap());
    let ann_joined_at = find(members(&state), &ann_id).unwrap()["joined_at"].clone();
    let (mut bob, bob_welcome) = WsClient::hello(b.addr, "bob").await;
    let bob_id = session(&bob_welcome);
    let state = join(&mut bob, "j", room, json!({"who": "bob"})).await;
    let bob_color = color(find(members(&state), &bob_id).unwrap());
    let bob_joined_at = find(members(&state), &bob_id).unwrap()["joined_at"].clone();
    diff_having(&mut ann, room, "joins", &bob_id, PROMPT).await;
    for (mut client, id) in early {
        let left = request(
            &mut client,
            json!({"type": "leave", "id": "l", "room": room}),
        )
        .await;
        assert_eq!(left["type"], "left");
        diff_having(&mut ann, room, "leaves", &id, PROMPT).await;
        diff_having(&mut bob, room, "leaves", &id, PROMPT).await;
    }
    let (mut watcher, _) = WsClient::hello(a.addr, "watcher").await;
    watcher
        .subscribe("s", "table:public.items", None, None)
        .await;
    let sql = db.connect().await;

    // Redis dies.
    redis.kill();
    for node in [a, b] {
        eventually(
            PATIENCE,
            &format!("{} reports presence unhealthy", node.node),
            || async {
                let (status, body) = ready(node).await;
                assert_eq!(
                    status, 200,
                    "presence down is degraded, not unready: {body}"
                );
                (body["presence"]["healthy"] == false).then_some(())
            },
        )
        .await;
    }
    let (_, body) = ready(a).await;
    assert_eq!(body["presence"]["backend"], "redis", "{body}");
    // join, presence and broadcast: unavailable.
    let (mut carl, carl_welcome) = WsClient::hello(a.addr, "carl").await;
    let carl_id = session(&carl_welcome);
    let error = expect_error(
        &mut carl,
        json!({"type": "join", "id": "j0", "room": room, "state": {}}),
        "unavailable",
    )
    .await;
    assert_eq!(error["id"], "j0");
    expect_error(
        &mut ann,
        json!({"type": "presence", "id": "p0", "room": room, "state": {"who": "ann", "n": 0}}),
        "unavailable",
    )
    .await;
    expect_error(
        &mut ann,
        json!({"type": "broadcast", "id": "b0", "room": room, "event": "e", "payload": 0}),
        "unavailable",
    )
    .await;
    // Changes still stream.
    sql.batch_execute("INSERT INTO items VALUES (7, 0, 'during the outage', 0)")
        .await
        .unwrap();
    let changes = watcher.recv_changes().await;
    assert_eq!(changes["changes"][0]["key"], json!({"id": 7}), "{changes}");
    assert_eq!(
        changes["changes"][0]["delta"]["title"]["new"],
        "during the outage"
    );
    let (status, body) = ready(a).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["presence"]["healthy"], false, "{body}");

    // Redis comes back on the same port with no data; the bridges are not restarted.
    redis.restart();
    for node in [a, b] {
        eventually(
            PATIENCE,
            &format!("{} reports presence healthy", node.node),
            || async {
                let (status, body) = ready(node).await;
                (status == 200 && body["presence"]["healthy"] == true).then_some(())
            },
        )
        .await;
    }
    // The members are registered again, with their colors: a fresh joiner lists them.
    let deadline = Instant::now() + PATIENCE;
    let mut attempt = 0;
    let state = loop {
        attempt += 1;
        let id = format!("j{attempt}");
        let reply = request(
            &mut carl,
            json!({"type": "join", "id": id, "room": room, "state": {"who": "carl"}}),
        )
        .await;
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "unavailable", "{reply}");
        } else {
            assert_eq!(reply["type"], "presence_state", "{reply}");
            let m = members(&reply);
            if find(m, &ann_id).is_some() && find(m, &bob_id).is_some() {
                break reply;
            }
        }
        assert!(
            Instant::now() < deadline,
            "ann and bob are not listed again after Redis came back: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let m = members(&state);
    assert_eq!(m.len(), 3, "ann, bob and carl: {state}");
    assert_member(
        find(m, &ann_id).unwrap(),
        &ann_id,
        "ann",
        "node-a",
        &json!({"who": "ann"}),
    );
    assert_member(
        find(m, &bob_id).unwrap(),
        &bob_id,
        "bob",
        "node-b",
        &json!({"who": "bob"}),
    );
    assert_eq!(color(find(m, &ann_id).unwrap()), ann_color, "{state}");
    assert_eq!(color(find(m, &bob_id).unwrap()), bob_color, "{state}");
    assert_eq!(
        find(m, &ann_id).unwrap()["joined_at"],
        ann_joined_at,
        "{state}"
    );
    assert_eq!(
        find(m, &bob_id).unwrap()["joined_at"],
        bob_joined_at,
        "{state}"
    );
    let carl_color = color(find(m, &carl_id).unwrap());
    assert!(
        carl_color != ann_color && carl_color != bob_color,
        "a distinct color for carl: {state}"
    );
    // Bob, on B, hears of carl's join. (Diffs before it may re-announce the members
    // put back — never as leaves; a client's own join is checked at the end.)
    let mut after = Vec::new();
    wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "carl's join on node B",
        |d| entry(d, "joins", &carl_id).is_some(),
        |d| after.push(d.clone()),
    )
    .await;

    // Cross-node broadcasts and diffs flow again.
    bob.send(json!({"type": "broadcast", "id": "b1", "room": room, "event": "back", "payload": "bob is back"}))
        .await;
    let got = tokio::time::timeout(PROMPT, ann.recv_type("broadcast"))
        .await
        .expect("bob's broadcast reaches node A after the outage");
    assert_eq!(got["payload"], "bob is back", "{got}");
    assert_eq!(got["from"]["connection"], bob_id.as_str());
    assert!(
        !bob.pending.iter().any(|m| m["id"] == "b1"),
        "no error for bob's broadcast"
    );
    ann.send(
        json!({"type": "presence", "id": "p1", "room": room, "state": {"who": "ann", "n": 1}}),
    )
    .await;
    let diff = wait_for(
        &mut bob,
        "presence_diff",
        PROMPT,
        "ann's update on node B after the outage",
        |d| entry(d, "updates", &ann_id).is_some_and(|u| u["state"]["n"] == 1),
        |d| after.push(d.clone()),
    )
    .await;
    assert_eq!(color(entry(&diff, "updates", &ann_id).unwrap()), ann_color);
    assert!(
        !ann.pending.iter().any(|m| m["id"] == "p1"),
        "no error for ann's update"
    );
    // Every local member was given the room's state anew (docs/protocol.md): ann's
    // lists bob with his color.
    let fresh = wait_for(
        &mut ann,
        "presence_state",
        PROMPT,
        "a fresh presence_state for ann",
        |m| m["room"] == room && find(members(m), &bob_id).is_some(),
        |_| {},
    )
    .await;
    assert_eq!(fresh["self"], ann_id.as_str(), "{fresh}");
    assert_eq!(color(find(members(&fresh), &bob_id).unwrap()), bob_color);

    // The outage was counted.
    let (_, stats) = a.get_json("/api/v1/sync/stats").await;
    assert!(
        stats["presence"]["redis_errors"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{stats}"
    );
    assert_eq!(stats["presence"]["healthy"], true, "{stats}");
    let text = a.metrics().await;
    assert!(
        metric(&text, "livesync_redis_errors_total").is_some_and(|n| n > 0.0),
        "livesync_redis_errors_total counts the outage"
    );

    // Nothing during the recovery told a member it left, nor that it joined itself:
    // "a join's diff goes to every member but the joiner".
    let ann_got: Vec<Value> = ann
        .pending
        .iter()
        .filter(|m| m["type"] == "presence_diff")
        .cloned()
        .collect();
    for (who, own, got) in [("ann", &ann_id, &ann_got), ("bob", &bob_id, &after)] {
        for d in got.iter() {
            for id in [&ann_id, &bob_id] {
                assert!(
                    entry(d, "leaves", id).is_none(),
                    "{who}: {id} never left during the outage: {d}"
                );
            }
            assert!(
                entry(d, "joins", own).is_none(),
                "{who} is told of its own join when its node puts it back after the outage: {d}"
            );
        }
    }

    drop(nodes);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_and_metrics_count_presence() {
    let (db, _redis, nodes) = cluster("pnodes_stats", &["node-a", "node-b"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let room = "board:stats";
    let (mut ann, ann_welcome) = WsClient::hello(a.addr, "ann").await;
    let (mut amy, _) = WsClient::hello(a.addr, "amy").await;
    let (mut bob, bob_welcome) = WsClient::hello(b.addr, "bob").await;
    let ann_id = session(&ann_welcome);
    let bob_id = session(&bob_welcome);
    join(&mut ann, "j", room, json!({})).await;
    join(&mut amy, "j", room, json!({})).await;
    join(&mut bob, "j", room, json!({})).await;
    for n in 0..20 {
        ann.send(json!({"type": "presence", "room": room, "state": {"n": n}}))
            .await;
        bob.send(json!({"type": "presence", "room": room, "state": {"n": n}}))
            .await;
    }
    for client in [&mut ann, &mut bob] {
        client
            .send(json!({"type": "broadcast", "room": room, "event": "e", "payload": 1}))
            .await;
    }
    for (client, other) in [(&mut bob, &ann_id), (&mut ann, &bob_id)] {
        wait_for(
            client,
            "presence_diff",
            PROMPT,
            "the other's last update",
            |d| entry(d, "updates", other).is_some_and(|u| u["state"]["n"] == 19),
            |_| {},
        )
        .await;
        tokio::time::timeout(PROMPT, client.recv_type("broadcast"))
            .await
            .expect("the other's broadcast");
    }
    amy.recv_type("broadcast").await;

    for (node, members_here) in [(a, 2), (b, 1)] {
        let stats = eventually(PATIENCE, "counters up to date", || async {
            let (status, stats) = node.get_json("/api/v1/sync/stats").await;
            assert_eq!(status, 200);
            let p = &stats["presence"];
            let counted = [
                "presence_updates",
                "coalesced_updates",
                "diffs_sent",
                "broadcasts",
            ]
            .iter()
            .all(|c| p[c].as_u64().is_some_and(|n| n > 0));
            counted.then_some(stats)
        })
        .await;
        let p = &stats["presence"];
        assert_eq!(p["backend"], "redis", "{}: {p}", node.node);
        assert_eq!(p["healthy"], true, "{}: {p}", node.node);
        assert_eq!(p["rooms"], 1, "{}: this node's rooms: {p}", node.node);
        assert_eq!(
            p["members"], members_here,
            "{}: this node's members: {p}",
            node.node
        );
        assert!(p["redis_errors"].as_u64().is_some(), "{p}");

        // The gauges are refreshed periodically (every TTL / 3): poll them.
        let text = eventually(PATIENCE, "the presence gauges", || async {
            let text = node.metrics().await;
            (metric(&text, "livesync_presence_rooms") == Some(1.0)
                && metric(&text, "livesync_presence_members") == Some(members_here as f64))
            .then_some(text)
        })
        .await;
        let value = |name: &str| {
            metric(&text, name).unwrap_or_else(|| panic!("{}: /metrics has {name}", node.node))
        };
        for counter in [
            "livesync_presence_updates_total",
            "livesync_presence_coalesced_total",
            "livesync_presence_diffs_total",
            "livesync_broadcasts_total",
        ] {
            assert!(value(counter) > 0.0, "{}: {counter} counts", node.node);
        }
    }

    // Cleanup sweeps stale members now: none are stale, none are swept.
    let cleanup = reqwest::Client::new()
        .post(format!("{}/api/v1/sync/cleanup", a.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(cleanup.status(), 200);
    let cleanup: Value = cleanup.json().await.unwrap();
    assert_eq!(cleanup["presence_swept"], 0, "{cleanup}");

    // A member leaving is counted down.
    let left = request(&mut amy, json!({"type": "leave", "id": "l", "room": room})).await;
    assert_eq!(left["type"], "left");
    eventually(PATIENCE, "members back to 1 on node A", || async {
        let (_, stats) = a.get_json("/api/v1/sync/stats").await;
        (stats["presence"]["members"] == 1).then_some(())
    })
    .await;

    drop(nodes);
    db.drop_db().await;
}
