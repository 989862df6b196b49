//! Changes committed with plain SQL reach WebSocket subscribers: every one of a
//! table's subscribers (filtered ones only when the filter matches), in commit order,
//! each transaction whole in one message; resumes with `since` get exactly what they
//! missed, from the node's window or from the database; past compaction they are told
//! to resync, and a snapshot plus the changes after it converge to the table.

mod support;

use serde_json::{json, Value};
use support::{table_rows, Replica, TestDb, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_rows_reach_every_subscriber_whole_and_in_commit_order() {
    let db = TestDb::create("fanout").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;

    let mut plain = Vec::new();
    for i in 0..3 {
        let (mut client, welcome) = WsClient::hello(bridge.addr, &format!("plain-{i}")).await;
        assert_eq!(welcome["protocol"], 1);
        assert!(welcome["heartbeat_ms"].as_u64().unwrap() > 0);
        client
            .subscribe("s", "table:public.items", None, None)
            .await;
        plain.push(client);
    }
    let (mut match1, _) = WsClient::hello(bridge.addr, "match1").await;
    match1
        .subscribe(
            "m1",
            "table:public.scores",
            Some(json!({"column": "match_id", "op": "eq", "value": 1})),
            None,
        )
        .await;
    let (mut match23, _) = WsClient::hello(bridge.addr, "match23").await;
    match23
        .subscribe(
            "m23",
            "table:public.scores",
            Some(json!({"column": "match_id", "op": "in", "value": [2, 3]})),
            None,
        )
        .await;

    // Two transactions on items, the first touching three rows and scores too.
    sql.batch_execute(
        "BEGIN;
         INSERT INTO items VALUES (1, 1, 'one', 0), (2, 1, 'two', 0);
         INSERT INTO scores VALUES (1, 10, 5), (2, 20, 7);
         UPDATE items SET title = 'uno' WHERE id = 1;
         COMMIT;
         DELETE FROM items WHERE id = 2;",
    )
    .await
    .unwrap();

    for client in &mut plain {
        let first = client.recv_changes().await;
        assert_eq!(first["sub"], "s");
        let changes = first["changes"].as_array().unwrap();
        // The items changes of the first transaction, whole, in position order.
        let ops: Vec<&str> = changes.iter().map(|c| c["op"].as_str().unwrap()).collect();
        assert_eq!(ops, ["insert", "insert", "update"], "{first}");
        let positions: Vec<i64> = changes
            .iter()
            .map(|c| c["position"].as_i64().unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert!(first["position"].as_i64().unwrap() >= *positions.last().unwrap());
        let insert = &changes[0];
        assert_eq!(insert["key"], json!({"id": 1}));
        assert_eq!(insert["delta"]["title"], json!({"new": "one"}));
        assert!(insert["version"].as_i64().unwrap() > 0);
        assert_eq!(insert["actor"], "postgres");
        assert!(insert["committed_at"].as_str().unwrap().contains('T'));
        assert!(insert["tx"].as_i64().unwrap() > 0);
        assert!(insert.get("client_id").is_none());
        assert_eq!(
            changes[2]["delta"],
            json!({"title": {"old": "one", "new": "uno"}})
        );
        // All changes of one transaction carry its tx.
        assert!(changes.iter().all(|c| c["tx"] == insert["tx"]));

        let second = client.recv_changes().await;
        let changes = second["changes"].as_array().unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0]["op"], "delete");
        assert_eq!(changes[0]["key"], json!({"id": 2}));
        assert_eq!(second["position"], changes[0]["position"]);
        assert!(second["position"].as_i64() > first["position"].as_i64());
    }

    let m1 = match1.recv_changes().await;
    let keys: Vec<&Value> = m1["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["key"])
        .collect();
    assert_eq!(keys, [&json!({"match_id": 1, "player": 10})]);
    let m23 = match23.recv_changes().await;
    let keys: Vec<&Value> = m23["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["key"])
        .collect();
    assert_eq!(keys, [&json!({"match_id": 2, "player": 20})]);

    // A later change of match 1 only: match23 hears nothing of it, match1 does.
    sql.batch_execute("UPDATE scores SET points = 6 WHERE match_id = 1; UPDATE scores SET points = 8 WHERE match_id = 2")
        .await
        .unwrap();
    let m1 = match1.recv_changes().await;
    assert_eq!(
        m1["changes"][0]["delta"],
        json!({"points": {"old": 5, "new": 6}})
    );
    let m23 = match23.recv_changes().await;
    assert_eq!(
        m23["changes"][0]["delta"],
        json!({"points": {"old": 7, "new": 8}})
    );
    assert_eq!(m23["changes"].as_array().unwrap().len(), 1);

    bridge.shutdown().await;
    db.drop_db().await;
}

/// Resume after 1,000 missed changes: exactly those, then live ones, nothing twice.
async fn resume_gets_exactly_what_was_missed(name: &str, window_changes: usize) {
    let db = TestDb::create(name).await;
    let mut config = db.config();
    config.limits.window_changes = window_changes;
    let bridge = support::start(config).await;
    let sql = db.connect().await;

    let (mut client, _) = WsClient::hello(bridge.addr, "resumer").await;
    client
        .subscribe("s", "table:public.items", None, None)
        .await;
    sql.batch_execute("INSERT INTO items VALUES (0, 0, 'before', 0)")
        .await
        .unwrap();
    let seen = client.recv_changes().await;
    let last = seen["position"].as_i64().unwrap();
    drop(client);

    for i in 1..=1000 {
        sql.execute("INSERT INTO items VALUES ($1, 0, 'missed', 0)", &[&i])
            .await
            .unwrap();
    }
    let newest = support::settle(&db).await;
    // Wait until the node has read them, so the window (if large enough) holds them.
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while bridge.state.hub.head() < Some(newest) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader never caught up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let (mut client, _) = WsClient::hello(bridge.addr, "resumer").await;
    let subscribed = client
        .subscribe("s", "table:public.items", None, Some(last))
        .await;
    assert_eq!(subscribed["position"], last);
    let mut ids = Vec::new();
    let mut previous = last;
    while ids.len() < 1001 {
        let message = client.recv_changes().await;
        for change in message["changes"].as_array().unwrap() {
            let position = change["position"].as_i64().unwrap();
            assert!(
                position > previous,
                "positions go forward: {position} after {previous}"
            );
            previous = position;
            ids.push(change["key"]["id"].as_i64().unwrap());
        }
    }
    // The 1,000 missed rows, then the marker `settle` wrote.
    assert_eq!(ids[..1000], (1..=1000).collect::<Vec<_>>());
    assert!(ids[1000] >= 1_000_000);
    // Then live, no duplicate at the seam.
    sql.batch_execute("INSERT INTO items VALUES (5000, 0, 'live', 0)")
        .await
        .unwrap();
    let live = client.recv_changes().await;
    assert_eq!(live["changes"].as_array().unwrap().len(), 1);
    assert_eq!(live["changes"][0]["key"], json!({"id": 5000}));
    assert!(live["changes"][0]["position"].as_i64().unwrap() > previous);

    let stats = bridge.state.hub.stats();
    if window_changes < 1000 {
        assert!(
            stats.window_start > last,
            "the window no longer covers the resume point"
        );
    } else {
        assert!(
            stats.window_start <= last,
            "the window still covers the resume point"
        );
    }
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_from_the_window() {
    resume_gets_exactly_what_was_missed("resume_window", 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_from_the_database() {
    resume_gets_exactly_what_was_missed("resume_database", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_compaction_a_resume_is_told_to_resync_and_a_snapshot_converges() {
    let db = TestDb::create("resync").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items SELECT g, 0, 'old', 0 FROM generate_series(1, 50) g")
        .await
        .unwrap();
    // The first transaction of a fresh log takes positions 1 to 50.
    let old = 40;
    sql.batch_execute("UPDATE items SET score = 1 WHERE id <= 10")
        .await
        .unwrap();
    // Compact everything: the log keeps nothing at or before the newest position.
    let removed: i64 = sql
        .query_one("SELECT livesync.compact('-0 seconds'::interval)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(removed > 0);

    let (mut client, _) = WsClient::hello(bridge.addr, "late").await;
    client
        .send(
            json!({"type": "subscribe", "id": "s", "channel": "table:public.items", "since": old}),
        )
        .await;
    let error = client.recv_reply("s").await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "resync_required", "{error}");
    assert_eq!(error["sqlstate"], "LS001");

    // Resync: snapshot, subscribe from its position, apply.
    let mut replica = Replica::load_snapshot(&mut client, "snap", "table:public.items").await;
    client
        .subscribe("s", "table:public.items", None, Some(replica.position))
        .await;
    sql.batch_execute(
        "UPDATE items SET title = 'new' WHERE id = 3; DELETE FROM items WHERE id = 4",
    )
    .await
    .unwrap();
    let target = support::settle(&db).await;
    while replica.position < target {
        let message = client.recv_changes().await;
        replica.apply(&message);
    }
    support::assert_same_rows(&replica.values(), &table_rows(&sql).await, "after resync");
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_and_the_changes_after_it_converge_under_concurrent_writers() {
    let db = TestDb::create("snapshot_converge").await;
    let mut config = db.config();
    config.limits.snapshot_page_rows = 50; // several pages
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    sql.batch_execute(
        "INSERT INTO items SELECT g, g % 7, 'row ' || g, 0 FROM generate_series(1, 400) g",
    )
    .await
    .unwrap();

    // Writers update, insert and delete while clients snapshot and subscribe.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let writer = db.connect().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0i32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 3000 {
                n += 1;
                let id = (n * 7 + w * 13) % 400 + 1;
                let result = match n % 5 {
                    0 => writer.execute("DELETE FROM items WHERE id = $1", &[&id]).await,
                    1 => {
                        writer
                            .execute(
                                "INSERT INTO items VALUES ($1, 0, 'again', 0) ON CONFLICT (id) DO UPDATE SET title = 'upserted'",
                                &[&id],
                            )
                            .await
                    }
                    _ => writer.execute("UPDATE items SET score = score + 1 WHERE id = $1", &[&id]).await,
                };
                result.expect("writer statement");
            }
        }));
    }
    let mut replicas = Vec::new();
    for i in 0..3 {
        let (mut client, _) = WsClient::hello(bridge.addr, &format!("snap-{i}")).await;
        let replica = Replica::load_snapshot(&mut client, "snap", "table:public.items").await;
        client
            .subscribe("s", "table:public.items", None, Some(replica.position))
            .await;
        replicas.push((client, replica));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let target = support::settle(&db).await;
    let expected = table_rows(&sql).await;
    for (client, replica) in &mut replicas {
        while replica.position < target {
            let message = client.recv_changes().await;
            replica.apply(&message);
        }
        support::assert_same_rows(
            &replica.values(),
            &expected,
            "a replica converges to the table",
        );
    }
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declared_filter_column_filters_updates_and_a_row_leaving_it_is_a_delete() {
    let db = TestDb::create("filter_columns").await;
    let sql = db.connect().await;
    sql.batch_execute(
        "SELECT livesync.set_filter_columns('items', ARRAY['match_id']);
         INSERT INTO items VALUES (1, 1, 'one', 0), (2, 2, 'two', 0);",
    )
    .await
    .unwrap();
    let bridge = db.start_bridge().await;
    let (mut client, _) = WsClient::hello(bridge.addr, "filtered").await;
    // Not declared: refused with a reason.
    client
        .send(json!({"type": "subscribe", "id": "t", "channel": "table:public.items", "filter": {"column": "title", "op": "eq", "value": "one"}}))
        .await;
    let refused = client.recv_reply("t").await;
    assert_eq!(refused["code"], "bad_request");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("set_filter_columns"),
        "{refused}"
    );
    client
        .subscribe(
            "m1",
            "table:public.items",
            Some(json!({"column": "match_id", "op": "eq", "value": 1})),
            None,
        )
        .await;

    // An update of row 1 that leaves match_id alone: sent. Row 2's: not.
    sql.batch_execute(
        "UPDATE items SET score = 5 WHERE id = 2; UPDATE items SET score = 7 WHERE id = 1",
    )
    .await
    .unwrap();
    let message = client.recv_changes().await;
    let change = &message["changes"][0];
    assert_eq!(change["key"], json!({"id": 1}));
    assert_eq!(
        change["delta"],
        json!({"score": {"old": 0, "new": 7}}),
        "the delta is still only what changed"
    );
    // Row 1 leaves match 1: a delete for this subscriber.
    sql.batch_execute("UPDATE items SET match_id = 2 WHERE id = 1")
        .await
        .unwrap();
    let message = client.recv_changes().await;
    let change = &message["changes"][0];
    assert_eq!(change["op"], "delete", "{message}");
    assert_eq!(change["left_filter"], true);
    assert_eq!(change["key"], json!({"id": 1}));
    // Row 2 enters match 1: an update carrying the change that made it match.
    sql.batch_execute("UPDATE items SET title = 'still two' WHERE id = 2; UPDATE items SET match_id = 1 WHERE id = 2")
        .await
        .unwrap();
    let message = client.recv_changes().await;
    let change = &message["changes"][0];
    assert_eq!(change["key"], json!({"id": 2}));
    assert_eq!(change["op"], "update");
    assert_eq!(
        change["delta"]["match_id"],
        json!({"old": 2, "new": 1}),
        "{message}"
    );
    bridge.shutdown().await;
    db.drop_db().await;
}
