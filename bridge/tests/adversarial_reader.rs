//! Adversarial: the node's reader loses its place (the log was reset, as after a
//! restore) while a client is stalled; subscribing with `since` while the reader is
//! behind a huge transaction.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{TestDb, WsClient, APP_ROLE, VIEWER_ROLE};
use tokio_tungstenite::tungstenite::Message;

async fn drain(client: &mut WsClient, for_: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + for_;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, client.ws.next()).await {
        if let Message::Text(t) = frame {
            out.push(serde_json::from_str(&t).unwrap());
        }
    }
    out
}

/// DEFECT: when the reader finds its position outside the log (`LS001`: compacted
/// past it, or the log reset/restored), `FanoutHub::reset_at` (hub/mod.rs) ends every
/// subscription and tells it with `try_send`: a client whose queue is full at that
/// moment (exactly the slow ones) never hears `resync_required`. Its subscription is
/// gone from the hub but not from the session; it silently receives nothing more.
/// docs/architecture.md: "every subscription is told to resync".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn a_stalled_client_hears_resync_when_the_reader_loses_its_place() {
    let db = TestDb::create("adv_reset").await;
    let mut config = db.config();
    config.limits.queue_capacity = 4;
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    let (mut stalled, _) = WsClient::hello(bridge.addr, "stalled").await;
    stalled
        .subscribe("s", "table:public.items", None, None)
        .await;
    let (mut reading, _) = WsClient::hello(bridge.addr, "reading").await;
    reading
        .subscribe("s", "table:public.items", None, None)
        .await;
    sql.batch_execute(
        "DO $$ BEGIN FOR i IN 1..100 LOOP INSERT INTO items VALUES (i, 0, repeat('x', 50000), 0); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    let mut seen = 0;
    while seen < 100 {
        seen += reading.recv_changes().await["changes"]
            .as_array()
            .unwrap()
            .len();
    }
    // The log is reset (as a restore of an older backup would): positions restart.
    sql.batch_execute(&format!(
        "DROP EXTENSION livesync CASCADE;
         ALTER TABLE items DROP COLUMN _livesync_version, DROP COLUMN _livesync_clocks;
         ALTER TABLE scores DROP COLUMN _livesync_version, DROP COLUMN _livesync_clocks;
         CREATE EXTENSION livesync;
         SELECT livesync.track('items'); SELECT livesync.track('scores');
         GRANT USAGE ON SCHEMA livesync TO {APP_ROLE}, {VIEWER_ROLE};"
    ))
    .await
    .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(15), reading.recv_type("error"))
        .await
        .expect("the reading client hears about the reset");
    eprintln!("reading client: {m}");
    assert_eq!(m["code"], "resync_required");
    // The stalled client now reads everything it has.
    let messages = drain(&mut stalled, Duration::from_secs(5)).await;
    let changes: usize = messages
        .iter()
        .filter(|m| m["type"] == "changes")
        .map(|m| m["changes"].as_array().unwrap().len())
        .sum();
    let told = messages.iter().any(|m| m["code"] == "resync_required");
    eprintln!(
        "stalled client: {changes} changes, told to resync: {told}; hub subscriptions {}",
        bridge.state.hub.stats().subscriptions
    );
    assert!(told, "the stalled client was never told to resync");
    bridge.shutdown().await;
    db.drop_db().await;
}

/// Held: a huge transaction keeps the reader busy; a subscribe with `since` at the
/// database's newest position (ahead of the node) or inside the huge transaction
/// waits for the node and then gets exactly what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn since_ahead_of_the_node_waits_and_gets_exactly_the_rest() {
    let db = TestDb::create("adv_ahead").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;
    let before = support::settle(&db).await;
    while bridge.state.hub.head() < Some(before) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    sql.batch_execute("INSERT INTO items SELECT g, 0, 'big', 0 FROM generate_series(1, 150000) g")
        .await
        .unwrap();
    // The sequencer may give the big transaction its positions a little after COMMIT.
    let mut newest = support::current_position(&sql).await;
    while newest < before + 150_000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        newest = support::current_position(&sql).await;
    }
    let head = bridge.state.hub.head().unwrap();
    eprintln!(
        "after the big commit ({:?}): database at {newest}, node at {head}",
        started.elapsed()
    );
    let inside = before + 149_990; // ten changes before the end of the big transaction
    let (mut a, _) = WsClient::hello(bridge.addr, "ahead").await;
    let r = a
        .subscribe("end", "table:public.items", None, Some(newest))
        .await;
    assert_eq!(r["position"], newest);
    let r = a
        .subscribe("inside", "table:public.items", None, Some(inside))
        .await;
    assert_eq!(r["position"], inside);
    sql.batch_execute("INSERT INTO items VALUES (999999, 0, 'after', 0)")
        .await
        .unwrap();
    let mut got: Vec<(String, Vec<i64>)> = Vec::new();
    while got.iter().filter(|(s, _)| s == "end").count() < 1
        || got.iter().filter(|(s, _)| s == "inside").count() < 2
    {
        let m = a.recv_changes().await;
        got.push((
            m["sub"].as_str().unwrap().to_string(),
            m["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["key"]["id"].as_i64().unwrap())
                .collect(),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Ok(m) = tokio::time::timeout(Duration::from_millis(200), a.recv_changes()).await {
        got.push((m["sub"].as_str().unwrap().to_string(), vec![-1]));
    }
    eprintln!(
        "{:?}",
        got.iter()
            .map(|(s, ids)| (s.clone(), ids.len(), ids.first().copied()))
            .collect::<Vec<_>>()
    );
    let end: Vec<_> = got.iter().filter(|(s, _)| s == "end").collect();
    let inside_msgs: Vec<_> = got.iter().filter(|(s, _)| s == "inside").collect();
    assert_eq!(end.len(), 1);
    assert_eq!(end[0].1, vec![999999]);
    assert_eq!(inside_msgs.len(), 2);
    assert_eq!(inside_msgs[0].1, (149_991..=150_000).collect::<Vec<i64>>());
    assert_eq!(inside_msgs[1].1, vec![999999]);
    bridge.shutdown().await;
    db.drop_db().await;
}

/// DEFECT (wrong rows after a log reset): catch-up pages read from the database are
/// cached by the position they start after (hub/page_cache.rs, since e3d3306), and
/// `FanoutHub::reset_at` does not clear that cache. When the log is reset (restored),
/// positions are reused: a subscriber resuming from a position read before the
/// reset is served the old log's page — rows that no longer exist, positions that
/// now mean other changes — and misses the new log's changes in that range.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn after_a_log_reset_catch_up_reads_the_new_log() {
    let db = TestDb::create("adv_reset_cache").await;
    let mut config = db.config();
    config.limits.window_changes = 20;
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    sql.batch_execute(
        "DO $$ BEGIN FOR i IN 1..100 LOOP INSERT INTO items VALUES (i, 0, 'old', 0); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    let newest = support::settle(&db).await;
    while bridge.state.hub.head() < Some(newest) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A resume from 0, before the reset: read from the database (the window holds 20).
    let (mut a, _) = WsClient::hello(bridge.addr, "before").await;
    a.subscribe("s", "table:public.items", None, Some(0)).await;
    let mut n = 0;
    while n < 101 {
        n += a.recv_changes().await["changes"].as_array().unwrap().len();
    }
    drop(a);
    sql.batch_execute(&format!(
        "DROP EXTENSION livesync CASCADE;
         ALTER TABLE items DROP COLUMN _livesync_version, DROP COLUMN _livesync_clocks;
         ALTER TABLE scores DROP COLUMN _livesync_version, DROP COLUMN _livesync_clocks;
         CREATE EXTENSION livesync;
         SELECT livesync.track('items'); SELECT livesync.track('scores');
         GRANT USAGE ON SCHEMA livesync TO {APP_ROLE}, {VIEWER_ROLE};"
    ))
    .await
    .unwrap();
    // Wait for the node to notice (its head goes back).
    let deadline = Instant::now() + Duration::from_secs(15);
    while bridge.state.hub.head() >= Some(newest) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sql.batch_execute(
        "DO $$ BEGIN FOR i IN 1001..1100 LOOP INSERT INTO items VALUES (i, 0, 'new', 0); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    let newest = support::settle(&db).await;
    while bridge.state.hub.head() < Some(newest) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut b, _) = WsClient::hello(bridge.addr, "after").await;
    b.subscribe("s", "table:public.items", None, Some(0)).await;
    let mut ids = Vec::new();
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(2), b.recv_changes()).await {
        for c in m["changes"].as_array().unwrap() {
            let id = c["key"]["id"].as_i64().unwrap();
            if id < 1_000_000 {
                // (not `settle`'s markers)
                ids.push((id, c["delta"]["title"]["new"].clone()));
            }
        }
    }
    eprintln!(
        "resume from 0 after the reset: {} changes, first {:?}, last {:?}",
        ids.len(),
        ids.first(),
        ids.last()
    );
    let expected: Vec<i64> = (1001..=1100).collect();
    assert_eq!(ids.iter().map(|(i, _)| *i).collect::<Vec<_>>(), expected);
    let _: Value = json!(null);
    bridge.shutdown().await;
    db.drop_db().await;
}

/// DEFECT: after the reader loses its place (`reset_at`), `FollowerStatus::newest_seen`
/// keeps the old log's highest position (pg/reader.rs stores only `position`;
/// `newest_seen` is a `fetch_max`), so `lag` = old newest − new position stays large
/// and `/ready` answers 503 until the new log's positions pass the old ones — hours
/// or days after a restore, though the node reads perfectly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn ready_recovers_after_a_log_reset() {
    let db = TestDb::create("adv_reset_ready").await;
    let mut config = db.config();
    config.ready_max_lag = 50;
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    sql.batch_execute(
        "DO $$ BEGIN FOR i IN 1..200 LOOP INSERT INTO items VALUES (i, 0, 'old', 0); COMMIT; END LOOP; END $$",
    )
    .await
    .unwrap();
    let newest = support::settle(&db).await;
    while bridge.state.hub.head() < Some(newest) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let http = reqwest::Client::new();
    let url = format!("http://{}/ready", bridge.addr);
    let before = http.get(&url).send().await.unwrap().status().as_u16();
    sql.batch_execute(&format!(
        "DROP EXTENSION livesync CASCADE;
         ALTER TABLE items DROP COLUMN _livesync_version, DROP COLUMN _livesync_clocks;
         ALTER TABLE scores DROP COLUMN _livesync_version, DROP COLUMN _livesync_clocks;
         CREATE EXTENSION livesync;
         SELECT livesync.track('items'); SELECT livesync.track('scores');
         GRANT USAGE ON SCHEMA livesync TO {APP_ROLE}, {VIEWER_ROLE};"
    ))
    .await
    .unwrap();
    sql.batch_execute("INSERT INTO items VALUES (1001, 0, 'new', 0)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = http.get(&url).send().await.unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    eprintln!(
        "/ready before the reset {before}; 5 s after: {status} {body}; hub head {:?}",
        bridge.state.hub.head()
    );
    bridge.shutdown().await;
    db.drop_db().await;
    assert_eq!(status, 200, "{body}");
}
