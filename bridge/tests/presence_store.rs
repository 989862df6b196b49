//! Presence and room events (bridge/src/presence): the same behaviour from the
//! in-memory and the Redis implementations, several nodes on one Redis, and Redis
//! going away and coming back. Each Redis test runs a `redis-server` of its own.

#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livesync_bridge::presence::memory::{MemoryBroker, MemoryPresence};
use livesync_bridge::presence::palette::{self, PALETTE};
use livesync_bridge::presence::redis::{RedisBroker, RedisPresence};
use livesync_bridge::presence::{
    BrokerEvent, Member, PresenceError, PresenceSettings, PresenceStore, RoomBroker, RoomEvent,
};
use redis_server::RedisServer;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::mpsc;

const TTL: Duration = Duration::from_secs(2);

fn settings(node: &str) -> PresenceSettings {
    let mut s = PresenceSettings::new(node);
    s.ttl = TTL;
    s
}

fn redis_store(server: &RedisServer, node: &str) -> Arc<dyn PresenceStore> {
    Arc::new(RedisPresence::new(&server.url(), &settings(node)).expect("store"))
}

fn memory_stores(a: &str, b: &str) -> (Arc<dyn PresenceStore>, Arc<dyn PresenceStore>) {
    let first = MemoryPresence::new(&settings(a));
    let second = first.peer(b);
    (Arc::new(first), Arc::new(second))
}

/// Polls `f` until it returns `Some`, failing the test after `within`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn connections(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.connection.as_str()).collect()
}

// ---------------------------------------------------------------------------------
// join / update / leave / members

async fn basics(store: Arc<dyn PresenceStore>) {
    let node = store.node().to_string();
    let room = "doc:1";
    // Exactly as sent: empty arrays stay arrays, numbers keep their digits.
    let state: Value =
        serde_json::from_str(r#"{"sel":[],"x":1.50,"n":12345678901234567890}"#).expect("json");
    let ada1 = store.join(room, "n-1", "ada", state.clone()).await.unwrap();
    assert_eq!(ada1.member.user, "ada");
    assert_eq!(ada1.member.node, node);
    assert_eq!(ada1.member.color, PALETTE[0]);
    assert_eq!(
        serde_json::to_string(&ada1.member.state).unwrap(),
        r#"{"n":12345678901234567890,"sel":[],"x":1.50}"#
    );
    assert!(ada1.member.joined_at > 1_600_000_000_000);
    assert_eq!(connections(&ada1.members), ["n-1"]);
    assert!(ada1.expired.is_empty());

    let bob = store.join(room, "n-2", "bob", json!({})).await.unwrap();
    assert_eq!(bob.member.color, PALETTE[1]);
    assert_eq!(connections(&bob.members), ["n-1", "n-2"]);

    // A second tab of ada: a second connection of the same user, same color.
    let ada2 = store.join(room, "n-3", "ada", json!(null)).await.unwrap();
    assert_eq!(ada2.member.color, PALETTE[0]);
    assert_eq!(ada2.members.len(), 3);

    // Joining again with the same connection: new state, same color and joined_at.
    let again = store
        .join(room, "n-1", "ada", json!({"cursor": 3}))
        .await
        .unwrap();
    assert_eq!(again.member.color, PALETTE[0]);
    assert_eq!(again.member.joined_at, ada1.member.joined_at);
    assert_eq!(again.members.len(), 3);

    let updated = store
        .update(room, "n-2", json!({"cursor": [1, 2]}))
        .await
        .unwrap()
        .expect("bob is a member");
    assert_eq!(updated.state, json!({"cursor": [1, 2]}));
    assert_eq!(updated.color, PALETTE[1]);
    assert!(store
        .update(room, "nobody", json!(1))
        .await
        .unwrap()
        .is_none());

    let members = store.members(room).await.unwrap();
    assert_eq!(connections(&members), ["n-1", "n-2", "n-3"]);
    assert_eq!(members[0].state, json!({"cursor": 3}));
    assert_eq!(members[1].state, json!({"cursor": [1, 2]}));
    assert_eq!(store.stats().members, 3);
    assert_eq!(store.stats().rooms, 1);

    let left = store.leave(room, "n-2").await.unwrap().expect("bob was in");
    assert_eq!(left.user, "bob");
    assert!(store.leave(room, "n-2").await.unwrap().is_none());
    assert_eq!(
        connections(&store.members(room).await.unwrap()),
        ["n-1", "n-3"]
    );
    // Other rooms are untouched; an unknown room is empty.
    assert!(store.members("doc:2").await.unwrap().is_empty());

    // Bob's color was freed: carol gets it; bob, back, keeps his color only if free.
    let carol = store.join(room, "n-4", "carol", json!({})).await.unwrap();
    assert_eq!(carol.member.color, PALETTE[1]);
    let bob_back = store.join(room, "n-5", "bob", json!({})).await.unwrap();
    assert_eq!(bob_back.member.color, PALETTE[2]);
    // Carol leaves, bob leaves and comes back: his (new) color is remembered.
    store.leave(room, "n-4").await.unwrap();
    store.leave(room, "n-5").await.unwrap();
    let dave = store.join(room, "n-6", "dave", json!({})).await.unwrap();
    assert_eq!(dave.member.color, PALETTE[1]);
    let bob_again = store.join(room, "n-7", "bob", json!({})).await.unwrap();
    assert_eq!(bob_again.member.color, PALETTE[2]);

    assert!(matches!(
        store.join("", "n-9", "eve", json!({})).await,
        Err(PresenceError::Invalid { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basics_in_memory() {
    let (store, _) = memory_stores("node-a", "node-b");
    basics(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basics_in_redis() {
    let server = RedisServer::start();
    basics(redis_store(&server, "node-a")).await;
}

// ---------------------------------------------------------------------------------
// colors across nodes

async fn colors_across_nodes(a: Arc<dyn PresenceStore>, b: Arc<dyn PresenceStore>) {
    let room = "board";
    let joins = (0..PALETTE.len()).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            let connection = format!("{}-{i}", store.node());
            store
                .join(room, &connection, &format!("user{i}"), json!({}))
                .await
                .unwrap()
                .member
        }
    });
    let members = futures_util::future::join_all(joins).await;
    let colors: HashSet<&str> = members.iter().map(|m| m.color.as_str()).collect();
    assert_eq!(
        colors.len(),
        PALETTE.len(),
        "two users got one color: {members:?}"
    );
    // Palette exhausted: a new user gets the color their id hashes to.
    let extra = a.join(room, "x-1", "latecomer", json!({})).await.unwrap();
    assert_eq!(extra.member.color, palette::hashed("latecomer"));

    // user3 leaves through node b and comes back through node a: same color.
    let user3 = members.iter().find(|m| m.user == "user3").unwrap();
    b.leave(room, &user3.connection).await.unwrap().unwrap();
    let back = a.join(room, "a-back", "user3", json!({})).await.unwrap();
    assert_eq!(back.member.color, user3.color);
    assert_eq!(back.members.len(), PALETTE.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colors_are_distinct_and_stable_across_nodes_in_memory() {
    let (a, b) = memory_stores("node-a", "node-b");
    colors_across_nodes(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn colors_are_distinct_and_stable_across_nodes_in_redis() {
    let server = RedisServer::start();
    colors_across_nodes(
        redis_store(&server, "node-a"),
        redis_store(&server, "node-b"),
    )
    .await;
}

// ---------------------------------------------------------------------------------
// liveness

/// A member whose connection is no longer heartbeated is swept within the TTL (plus
/// one sweep); the live one stays.
async fn member_expiry(store: Arc<dyn PresenceStore>) {
    let room = "ride:7";
    store.join(room, "c-live", "ada", json!({})).await.unwrap();
    let joined = Instant::now();
    store.join(room, "c-gone", "bob", json!({})).await.unwrap();
    let live = vec!["c-live".to_string()];
    let swept = eventually(TTL * 3, "the silent member to be swept", || {
        let store = store.clone();
        let live = live.clone();
        async move {
            store.heartbeat(&live).await.unwrap();
            let swept = store.sweep().await.unwrap();
            (!swept.is_empty()).then_some(swept)
        }
    })
    .await;
    let elapsed = joined.elapsed();
    assert!(
        elapsed >= TTL - Duration::from_millis(100),
        "swept early: {elapsed:?}"
    );
    assert!(
        elapsed <= TTL + Duration::from_millis(1000),
        "swept late: {elapsed:?}"
    );
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].room, room);
    assert_eq!(connections(&swept[0].leaves), ["c-gone"]);
    assert_eq!(connections(&store.members(room).await.unwrap()), ["c-live"]);
    assert_eq!(store.stats().members, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_members_expire_in_memory() {
    let (store, _) = memory_stores("node-a", "node-b");
    member_expiry(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_members_expire_in_redis() {
    let server = RedisServer::start();
    member_expiry(redis_store(&server, "node-a")).await;
}

/// Node a stops heartbeating: node b removes a's members (and only them) within the
/// TTL, from every room.
async fn dead_node(a: Arc<dyn PresenceStore>, b: Arc<dyn PresenceStore>) {
    a.join("r1", "a-1", "ada", json!({})).await.unwrap();
    a.join("r2", "a-2", "ada", json!({})).await.unwrap();
    b.join("r1", "b-1", "bob", json!({})).await.unwrap();
    let a_live = vec!["a-1".to_string(), "a-2".to_string()];
    let b_live = vec!["b-1".to_string()];
    a.heartbeat(&a_live).await.unwrap();
    b.heartbeat(&b_live).await.unwrap();
    let last_beat = Instant::now();
    let mut gone: Vec<(String, String)> = Vec::new();
    let deadline = last_beat + TTL + Duration::from_millis(1500);
    while gone.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "node a's members not reaped in time: {gone:?}"
        );
        b.heartbeat(&b_live).await.unwrap();
        for swept in b.sweep().await.unwrap() {
            for m in swept.leaves {
                gone.push((swept.room.clone(), m.connection));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last_beat.elapsed() >= TTL - Duration::from_millis(100));
    gone.sort();
    assert_eq!(
        gone,
        [
            ("r1".to_string(), "a-1".to_string()),
            ("r2".to_string(), "a-2".to_string())
        ]
    );
    assert_eq!(connections(&b.members("r1").await.unwrap()), ["b-1"]);
    assert!(b.members("r2").await.unwrap().is_empty());
    // Reaped once: later sweeps find nothing more.
    assert!(b.sweep().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_nodes_are_reaped_in_memory() {
    let (a, b) = memory_stores("node-a", "node-b");
    dead_node(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_nodes_are_reaped_in_redis() {
    let server = RedisServer::start();
    dead_node(
        redis_store(&server, "node-a"),
        redis_store(&server, "node-b"),
    )
    .await;
}

/// A node reaped while it could not heartbeat (it was only slow) puts its live members
/// back at its next heartbeat, with their colors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_node_that_comes_back_restores_its_members() {
    let server = RedisServer::start();
    let a = redis_store(&server, "node-a");
    let b = redis_store(&server, "node-b");
    let ada = a
        .join("r", "a-1", "ada", json!({"x": 1}))
        .await
        .unwrap()
        .member;
    b.join("r", "b-1", "bob", json!({})).await.unwrap();
    let b_live = vec!["b-1".to_string()];
    eventually(TTL * 3, "node a to be reaped", || {
        let b = b.clone();
        let b_live = b_live.clone();
        async move {
            b.heartbeat(&b_live).await.unwrap();
            (!b.sweep().await.unwrap().is_empty()).then_some(())
        }
    })
    .await;
    assert_eq!(connections(&b.members("r").await.unwrap()), ["b-1"]);
    let restored = a.heartbeat(&["a-1".to_string()]).await.unwrap();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].0, "r");
    assert_eq!(restored[0].1.color, ada.color);
    assert_eq!(restored[0].1.joined_at, ada.joined_at);
    assert_eq!(restored[0].1.state, json!({"x": 1}));
    assert_eq!(connections(&b.members("r").await.unwrap()), ["a-1", "b-1"]);
}

// ---------------------------------------------------------------------------------
// broker

fn broadcast(text: &str, from: &str) -> RoomEvent {
    RoomEvent::Broadcast {
        event: "cursor".into(),
        payload: RawValue::from_string(format!(r#"{{"text":"{text}"}}"#)).unwrap(),
        from_connection: from.into(),
        from_user: "ada".into(),
    }
}

/// The next room event, skipping nothing: anything else fails the test.
async fn next_room_event(rx: &mut mpsc::Receiver<BrokerEvent>) -> (String, String, String) {
    let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an event within 5 s")
        .expect("the broker is alive");
    match event {
        BrokerEvent::Room {
            room,
            origin,
            event: RoomEvent::Broadcast { payload, .. },
        } => (room, origin, payload.get().to_string()),
        other => panic!("unexpected {other:?}"),
    }
}

async fn broker_delivery(
    a: Arc<dyn RoomBroker>,
    mut a_rx: mpsc::Receiver<BrokerEvent>,
    b: Arc<dyn RoomBroker>,
    mut b_rx: mpsc::Receiver<BrokerEvent>,
) {
    a.subscribe("r1").await.unwrap();
    b.subscribe("r1").await.unwrap();
    b.publish("r1", &broadcast("one", "b-1")).await.unwrap();
    assert_eq!(
        next_room_event(&mut a_rx).await,
        ("r1".into(), "node-b".into(), r#"{"text":"one"}"#.into())
    );
    // b never gets its own event back: the first thing it receives is a's.
    a.publish("r1", &broadcast("two", "a-1")).await.unwrap();
    assert_eq!(
        next_room_event(&mut b_rx).await,
        ("r1".into(), "node-a".into(), r#"{"text":"two"}"#.into())
    );
    // Counted subscriptions: two subscribes need two unsubscribes.
    a.subscribe("r1").await.unwrap();
    a.unsubscribe("r1").await.unwrap();
    b.publish("r1", &broadcast("three", "b-1")).await.unwrap();
    assert_eq!(next_room_event(&mut a_rx).await.2, r#"{"text":"three"}"#);
    a.unsubscribe("r1").await.unwrap();
    // Unsubscribed from r1: a's next event is r2's, not r1's.
    a.subscribe("r2").await.unwrap();
    b.publish("r1", &broadcast("four", "b-1")).await.unwrap();
    b.publish("r2", &broadcast("five", "b-1")).await.unwrap();
    assert_eq!(
        next_room_event(&mut a_rx).await,
        ("r2".into(), "node-b".into(), r#"{"text":"five"}"#.into())
    );
    assert!(a.healthy() && b.healthy());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_delivers_to_other_nodes_in_memory() {
    let (a, a_rx) = MemoryBroker::new(&settings("node-a"));
    let (b, b_rx) = a.peer("node-b");
    broker_delivery(Arc::new(a), a_rx, Arc::new(b), b_rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_delivers_to_other_nodes_in_redis() {
    let server = RedisServer::start();
    let (a, a_rx) = RedisBroker::new(&server.url(), &settings("node-a")).unwrap();
    let (b, b_rx) = RedisBroker::new(&server.url(), &settings("node-b")).unwrap();
    let (quiet, mut quiet_rx) = RedisBroker::new(&server.url(), &settings("node-c")).unwrap();
    quiet.subscribe("r1").await.unwrap();
    broker_delivery(Arc::new(a), a_rx, Arc::new(b), b_rx).await;
    // The subscriber's keep-alive pings (every 2 s here) do not break the connection:
    // an idle subscriber gets the room's events and nothing else (no Reconnected).
    let mut seen = 0;
    let idle_until = tokio::time::Instant::now() + Duration::from_millis(4500);
    while let Ok(event) = tokio::time::timeout_at(idle_until, quiet_rx.recv()).await {
        match event {
            Some(BrokerEvent::Room { room, .. }) if room == "r1" => seen += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, 4, "r1 had four events from other nodes");
    assert!(quiet.healthy());
}

// ---------------------------------------------------------------------------------
// Redis down and back

fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, PresenceError>, started: Instant) {
    assert!(
        matches!(result, Err(PresenceError::Unavailable(_))),
        "expected Unavailable, got {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?} to fail",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_heals() {
    let mut server = RedisServer::start();
    let a = redis_store(&server, "node-a");
    let b = redis_store(&server, "node-b");
    let (broker_a, mut rx_a) = RedisBroker::new(&server.url(), &settings("node-a")).unwrap();
    let (broker_b, _rx_b) = RedisBroker::new(&server.url(), &settings("node-b")).unwrap();
    broker_a.subscribe("r").await.unwrap();
    let ada = a
        .join("r", "a-1", "ada", json!({"x": 1}))
        .await
        .unwrap()
        .member;
    let bob = b.join("r", "b-1", "bob", json!({})).await.unwrap().member;
    assert_ne!(ada.color, bob.color);

    server.kill();
    let t = Instant::now();
    assert_unavailable(a.join("r", "a-2", "carol", json!({})).await, t);
    let t = Instant::now();
    assert_unavailable(a.members("r").await, t);
    let t = Instant::now();
    assert_unavailable(a.heartbeat(&["a-1".to_string()]).await, t);
    let t = Instant::now();
    assert_unavailable(broker_b.publish("r", &broadcast("lost", "b-1")).await, t);
    assert!(!a.healthy());
    eventually(Duration::from_secs(5), "the broker to notice", || async {
        (!broker_a.healthy()).then_some(())
    })
    .await;

    // Back, empty (nothing was saved).
    server.restart();
    let restored = eventually(Duration::from_secs(10), "node a to re-register", || {
        let a = a.clone();
        async move { a.reregister().await.ok() }
    })
    .await;
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].1.color, ada.color);
    assert_eq!(restored[0].1.joined_at, ada.joined_at);
    assert!(a.healthy());
    // Node b heals through its heartbeat.
    let restored = b.heartbeat(&["b-1".to_string()]).await.unwrap();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].1.color, bob.color);
    let members = a.members("r").await.unwrap();
    assert_eq!(connections(&members), ["a-1", "b-1"]);
    assert_eq!(members[0].state, json!({"x": 1}));

    // The broker resubscribed by itself and says so.
    let event = tokio::time::timeout(Duration::from_secs(10), rx_a.recv())
        .await
        .expect("Reconnected within 10 s");
    assert!(matches!(event, Some(BrokerEvent::Reconnected)), "{event:?}");
    assert!(broker_a.healthy());
    eventually(
        Duration::from_secs(5),
        "publishing to work again",
        || async { broker_b.publish("r", &broadcast("back", "b-1")).await.ok() },
    )
    .await;
    assert_eq!(next_room_event(&mut rx_a).await.2, r#"{"text":"back"}"#);
}

// ---------------------------------------------------------------------------------
// Redis Cluster

/// Three masters on local ports, slots spread over them.
fn start_cluster() -> Vec<RedisServer> {
    let servers: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(
                redis_server::free_port(),
                &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
            )
        })
        .collect();
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli");
    assert!(
        out.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !servers
        .iter()
        .all(|s| s.command("CLUSTER INFO").contains("cluster_state:ok"))
    {
        assert!(Instant::now() < deadline, "cluster never became ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_runs_the_same_code() {
    let servers = start_cluster();
    let url = format!(
        "redis+cluster://{}",
        servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let store = |node: &str| -> Arc<dyn PresenceStore> {
        Arc::new(RedisPresence::new(&url, &settings(node)).expect("store"))
    };
    // First, while no other node has gone quiet.
    dead_node(store("node-a"), store("node-b")).await;
    basics(store("node-c")).await;
    colors_across_nodes(store("node-d"), store("node-e")).await;
    // The rooms above landed on more than one master.
    let holding = servers
        .iter()
        .filter(|s| !s.command("DBSIZE").trim().ends_with(":0"))
        .count();
    assert!(holding >= 2, "all keys on one master");
    let (a, a_rx) = RedisBroker::new(&url, &settings("node-a")).unwrap();
    let (b, b_rx) = RedisBroker::new(&url, &settings("node-b")).unwrap();
    broker_delivery(Arc::new(a), a_rx, Arc::new(b), b_rx).await;
}
