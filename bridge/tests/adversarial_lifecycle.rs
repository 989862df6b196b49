//! Adversarial: the subscribed table changes under the subscription (truncate, DDL,
//! rename, untrack, drop), compaction races a catch-up, snapshots are abandoned.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{TestDb, WsClient};
use tokio_tungstenite::tungstenite::Message;

async fn next_changes(c: &mut WsClient, wait: Duration) -> Option<Value> {
    tokio::time::timeout(wait, c.recv_changes()).await.ok()
}

fn ops(m: &Option<Value>) -> Vec<String> {
    m.as_ref()
        .map(|m| {
            m["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| format!("{}{}", c["op"].as_str().unwrap(), c["key"]))
                .collect()
        })
        .unwrap_or_default()
}

/// Held: truncate, ADD/DROP COLUMN and RENAME under a subscription arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ddl_truncate_rename_untrack_and_drop_under_a_subscription() {
    let db = TestDb::create("adv_ddl").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;
    let (mut c, _) = WsClient::hello(bridge.addr, "ddl").await;
    c.subscribe("i", "table:public.items", None, None).await;
    c.subscribe(
        "m1",
        "table:public.scores",
        Some(json!({"column": "match_id", "op": "eq", "value": 1})),
        None,
    )
    .await;
    let w = Duration::from_secs(3);
    sql.batch_execute("INSERT INTO items VALUES (1, 1, 'a', 0); TRUNCATE items; INSERT INTO items VALUES (2, 1, 'b', 0)")
        .await
        .unwrap();
    let m = next_changes(&mut c, w).await;
    eprintln!("insert; truncate; insert → {:?}", ops(&m));
    assert_eq!(
        ops(&m),
        ["insert{\"id\":1}", "truncatenull", "insert{\"id\":2}"]
    );
    assert!(next_changes(&mut c, Duration::from_millis(500))
        .await
        .is_none());

    sql.batch_execute("ALTER TABLE items ADD COLUMN extra int DEFAULT 5")
        .await
        .unwrap();
    let m = next_changes(&mut c, w).await;
    eprintln!(
        "ADD COLUMN → {:?} {}",
        ops(&m),
        m.as_ref()
            .map(|m| m["changes"][0]["delta"].to_string())
            .unwrap_or_default()
    );
    assert_eq!(ops(&m), ["schemanull"]);
    sql.batch_execute("ALTER TABLE items DROP COLUMN score; ALTER TABLE items RENAME TO items2; INSERT INTO items2 VALUES (3, 1, 'c')")
        .await
        .unwrap();
    // One transaction: the DROP COLUMN's schema change and the insert into the
    // renamed table (same relation, so the subscription keeps streaming it).
    let m = next_changes(&mut c, w).await;
    eprintln!("DROP COLUMN / RENAME TO / insert → {:?}", ops(&m));
    assert_eq!(ops(&m), ["schemanull", "insert{\"id\":3}"]);
    c.send(json!({"type": "snapshot", "id": "q", "channel": "table:public.items"}))
        .await;
    eprintln!("snapshot of the old name → {}", c.recv_reply("q").await);
    // Observation: /api/v1/sync/stats keeps the old name (table:public.items).
    let stats = bridge.state.hub.stats();
    eprintln!(
        "stats channels after rename: {:?}",
        stats
            .channels
            .iter()
            .map(|c| c.channel.clone())
            .collect::<Vec<_>>()
    );

    // Observation: the filter's key column renamed. The filtered subscription gets the
    // schema change, then nothing for its rows (the filter names a column the log no
    // longer has) — the client must re-subscribe, as "reload the table" implies.
    sql.batch_execute("ALTER TABLE scores RENAME COLUMN match_id TO game_id; INSERT INTO scores VALUES (1, 10, 1)")
        .await
        .unwrap();
    for _ in 0..2 {
        let m = next_changes(&mut c, w).await;
        eprintln!(
            "RENAME COLUMN match_id → game_id, insert game 1 → {} {:?}",
            m.as_ref().map(|m| m["sub"].to_string()).unwrap_or_default(),
            ops(&m)
        );
    }
    // Observation: untrack, then drop: subscribers are not told; they hear nothing.
    sql.batch_execute("SELECT livesync.untrack('items2'); INSERT INTO items2 VALUES (4, 1, 'd')")
        .await
        .unwrap();
    let m = next_changes(&mut c, w).await;
    eprintln!("untrack + insert → {:?}", ops(&m));
    sql.batch_execute("DROP TABLE scores").await.unwrap();
    let m = next_changes(&mut c, w).await;
    eprintln!("DROP TABLE → {:?}", ops(&m));
    c.send(json!({"type": "ping", "id": "p"})).await;
    assert_eq!(c.recv_reply("p").await["type"], "pong");
    bridge.shutdown().await;
    db.drop_db().await;
}

/// Held: compaction while a subscription catches up from the database: it gets every change
/// in order until it is told `resync_required`, never a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_racing_a_catch_up_is_a_resync_never_a_gap() {
    let db = TestDb::create("adv_compact_race").await;
    let mut config = db.config();
    config.limits.queue_capacity = 4;
    config.limits.window_changes = 100;
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    let before = support::settle(&db).await;
    sql.batch_execute(
        "DO $$ BEGIN FOR i IN 1..25000 LOOP INSERT INTO items VALUES (i, 0, repeat('x', 2000), 0); IF i % 10 = 0 THEN COMMIT; END IF; END LOOP; END $$",
    )
    .await
    .unwrap();
    let newest = support::settle(&db).await;
    while bridge.state.hub.head() < Some(newest) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut c, _) = WsClient::hello(bridge.addr, "racer").await;
    c.subscribe("s", "table:public.items", None, Some(before))
        .await;
    let mut last_id = 0i64;
    let mut last_pos = before;
    let mut compacted = false;
    let outcome: String;
    let started = Instant::now();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), c.recv())
            .await
            .expect("progress");
        match m["type"].as_str().unwrap() {
            "changes" => {
                for ch in m["changes"].as_array().unwrap() {
                    let p = ch["position"].as_i64().unwrap();
                    assert!(p > last_pos, "no duplicate");
                    last_pos = p;
                    let id = ch["key"]["id"].as_i64().unwrap();
                    if id < 1_000_000 {
                        assert_eq!(id, last_id + 1, "no gap (at position {p})");
                        last_id = id;
                    }
                }
                if last_id >= 25000 {
                    outcome = format!("got all 25,000 (compacted mid-way: {compacted})");
                    break;
                }
                if !compacted && last_id > 2000 {
                    let removed: i64 = sql
                        .query_one("SELECT livesync.compact('0 seconds')", &[])
                        .await
                        .unwrap()
                        .get(0);
                    eprintln!("compacted {removed} changes at id {last_id}");
                    compacted = true;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            "error" => {
                outcome = format!("error after id {last_id}: {m}");
                assert_eq!(m["code"], "resync_required");
                break;
            }
            _ => {}
        }
    }
    eprintln!("{outcome} in {:?}", started.elapsed());
    bridge.shutdown().await;
    db.drop_db().await;
}

/// DEFECT (the pool leaks, permanently): a client that closes its connection while a
/// snapshot is being sent leaves the snapshot task blocked forever, in an open
/// REPEATABLE READ transaction, holding one pooled connection. In ws/session.rs
/// `on_snapshot`, `forward` (an `async { … }` block that only *borrows* `pages_rx`)
/// returns when `outbox.send` fails, but `pages_rx` lives on until `tokio::join!`
/// ends; `snapshot::read` then waits forever in `pages.send(..)` (capacity 1) for a
/// receiver nobody polls. With `pool_size` such clients (browser tabs closed while
/// loading a table) every write, subscribe and snapshot of every client fails with
/// `unavailable` after the pool's 10 s wait, until the bridge restarts; the open
/// transactions also hold back VACUUM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]

async fn abandoned_snapshots_give_their_connections_back() {
    let db = TestDb::create("adv_abandon").await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items SELECT g, 0, 'x', 0 FROM generate_series(1, 2000) g")
        .await
        .unwrap();
    let mut config = db.config();
    config.pool_size = 2;
    config.limits.snapshot_page_rows = 10;
    let bridge = support::start(config).await;
    for round in 0..2 {
        let (mut c, _) = WsClient::hello(bridge.addr, &format!("abandon-{round}")).await;
        c.send(json!({"type": "snapshot", "id": "q", "channel": "table:public.items"}))
            .await;
        let first = c.recv_reply("q").await;
        assert_eq!(first["type"], "snapshot_page");
        drop(c); // the tab is closed while the table loads
    }
    // Well past the session's drain (at most 5 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let idle: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (mut c, _) = WsClient::hello(bridge.addr, "after").await;
    let started = Instant::now();
    c.send(json!({"type": "write", "id": "w", "table": "items", "op": "update", "key": {"id": 1}, "values": {"title": "t"}, "mutation_id": 1})).await;
    let r = c.recv_reply("w").await;
    eprintln!("connections open {}; bridge sessions idle in transaction: {idle}; a write afterwards: {:?} {r}", bridge.state.connections.count(), started.elapsed());
    assert_eq!(idle, 0, "snapshot transactions still open");
    assert_eq!(r["status"], "applied", "{r}");
    let _ = (
        Message::Ping(Default::default()),
        StreamExt::next(&mut c.ws),
    );
    bridge.shutdown().await;
    db.drop_db().await;
}
