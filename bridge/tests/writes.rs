//! Writes through the socket: the result is what `livesync.write` returns, a retried
//! mutation id is applied once, a role without the privilege gets `forbidden` and
//! changes nothing, the echo of a client's own write carries its ids, and a batch
//! replays an offline queue (also over HTTP).

mod support;

use serde_json::{json, Value};
use support::{TestDb, WsClient, APP_ROLE, VIEWER_ROLE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_returns_livesync_writes_result_and_is_echoed_with_its_ids() {
    let db = TestDb::create("ws_write").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;
    let (mut client, _) = WsClient::hello(bridge.addr, "writer-1").await;
    client
        .subscribe("s", "table:public.items", None, None)
        .await;

    let write = json!({"type": "write", "id": "w1", "table": "items", "op": "insert",
                       "key": {"id": 7}, "values": {"id": 7, "title": "seven", "score": 1}, "mutation_id": 1});
    client.send(write.clone()).await;
    let result = client.recv_reply("w1").await;
    assert_eq!(result["type"], "write_result", "{result}");
    assert_eq!(result["status"], "applied");
    let version = result["version"].as_i64().unwrap();
    // The row is committed when the result arrives.
    let row = sql
        .query_one(
            "SELECT title, _livesync_version FROM items WHERE id = 7",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "seven");
    assert_eq!(row.get::<_, i64>(1), version);
    // The same as livesync.write says for the replay (as the same role: a mutation is
    // its writer's): its first result.
    sql.batch_execute(&format!("SET ROLE {APP_ROLE}"))
        .await
        .unwrap();
    let direct: Value = sql
        .query_one(
            "SELECT livesync.write('items', 'insert', '{\"id\": 7}', '{\"id\": 7, \"title\": \"seven\", \"score\": 1}', NULL, NULL, 'writer-1', 1)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    sql.batch_execute("RESET ROLE").await.unwrap();
    let mut expected = direct.as_object().unwrap().clone();
    expected.insert("type".into(), "write_result".into());
    expected.insert("id".into(), "w1".into());
    assert_eq!(result, Value::Object(expected));

    // The echo carries client_id and mutation_id, and the session's actor.
    let echo = client.recv_changes().await;
    assert_eq!(echo["changes"][0]["client_id"], "writer-1");
    assert_eq!(echo["changes"][0]["mutation_id"], 1);
    assert_eq!(echo["changes"][0]["actor"], "writer-1");

    // Retried: same result, applied once.
    client.send(json!({"type": "write", "id": "w1-again", "table": "items", "op": "insert",
                       "key": {"id": 7}, "values": {"id": 7, "title": "CHANGED", "score": 1}, "mutation_id": 1}))
        .await;
    let again = client.recv_reply("w1-again").await;
    assert_eq!(again["status"], "applied");
    assert_eq!(again["version"], result["version"]);
    let title: String = sql
        .query_one("SELECT title FROM items WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(title, "seven");
    let changes: i64 = sql
        .query_one(
            "SELECT count(*) FROM livesync.changes_since(0, 100000) WHERE mutation_id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(changes, 1, "the retried mutation was logged once");

    // A conflicting update from an old base merges per policy and says so.
    client
        .send(
            json!({"type": "write", "id": "w2", "table": "items", "op": "update", "key": {"id": 7},
                       "values": {"score": 5}, "base_version": version, "mutation_id": 2}),
        )
        .await;
    let merged = client.recv_reply("w2").await;
    assert_eq!(merged["status"], "applied");
    sql.batch_execute("UPDATE items SET title = 'by sql' WHERE id = 7")
        .await
        .unwrap();
    client
        .send(
            json!({"type": "write", "id": "w3", "table": "items", "op": "update", "key": {"id": 7},
                       "values": {"score": 9}, "base_version": version, "mutation_id": 3}),
        )
        .await;
    let merged = client.recv_reply("w3").await;
    assert_eq!(merged["status"], "merged", "{merged}");

    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_role_without_update_privilege_is_forbidden_and_changes_nothing() {
    let db = TestDb::create("ws_forbidden").await;
    let mut config = db.config();
    config.default_role = Some(VIEWER_ROLE.into());
    let bridge = support::start(config).await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items VALUES (1, 0, 'kept', 0)")
        .await
        .unwrap();
    let (mut client, _) = WsClient::hello(bridge.addr, "viewer").await;
    client
        .send(
            json!({"type": "write", "id": "w", "table": "items", "op": "update", "key": {"id": 1},
                       "values": {"title": "stolen"}, "mutation_id": 1}),
        )
        .await;
    let error = client.recv_reply("w").await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "forbidden", "{error}");
    assert_eq!(error["sqlstate"], "42501");
    let title: String = sql
        .query_one("SELECT title FROM items WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(title, "kept");
    let records: i64 = sql
        .query_one("SELECT count(*) FROM livesync._mutations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(records, 0, "no idempotency record for a refused write");
    bridge.shutdown().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_replays_an_offline_queue_once_over_the_socket_and_over_http() {
    let db = TestDb::create("ws_batch").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;
    let (mut client, _) = WsClient::hello(bridge.addr, "offline").await;
    let mutations: Vec<Value> = (1..=20)
        .map(|i| json!({"table": "items", "op": "insert", "key": {"id": i}, "values": {"id": i, "title": format!("t{i}")}, "mutation_id": i}))
        .collect();
    client
        .send(json!({"type": "write_batch", "id": "b", "mutations": mutations}))
        .await;
    let result = client.recv_reply("b").await;
    assert_eq!(result["type"], "write_batch_result", "{result}");
    let results = result["results"].as_array().unwrap();
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|r| r["status"] == "applied"));
    // Replayed (the client did not see the answer): same results, nothing twice.
    client
        .send(json!({"type": "write_batch", "id": "b2", "mutations": mutations}))
        .await;
    let replay = client.recv_reply("b2").await;
    assert_eq!(replay["results"], result["results"]);
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 20);

    // The same over HTTP, for clients without a socket.
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/v1/sync/batch-changes", bridge.addr);
    let body = json!({"client_id": "offline", "mutations": mutations});
    let response = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let replay: Value = response.json().await.unwrap();
    assert_eq!(replay["results"], result["results"]);
    let more = json!({"client_id": "http-client", "all_or_nothing": true, "mutations": [
        {"table": "items", "op": "insert", "key": {"id": 100}, "values": {"id": 100}, "mutation_id": 1},
        {"table": "items", "op": "insert", "key": {"id": 1}, "values": {"id": 1, "title": "dup"}, "mutation_id": 2, "hlc": "1:0"}
    ]});
    let response = http.post(&url).json(&more).send().await.unwrap();
    let status = response.status();
    let error: Value = response.json().await.unwrap();
    // The second insert collides (policy: reject by default or merge): either the batch
    // stands whole or fails whole.
    let rows: i64 = sql
        .query_one("SELECT count(*) FROM items WHERE id = 100", &[])
        .await
        .unwrap()
        .get(0);
    if status == 200 {
        assert_eq!(rows, 1, "{error}");
    } else {
        assert_eq!(error["sqlstate"], "LS007", "{error}");
        assert_eq!(rows, 0, "all or nothing: nothing");
    }
    let bad = http.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let bad: Value = bad.json().await.unwrap();
    assert_eq!(bad["code"], "bad_request");
    bridge.shutdown().await;
    db.drop_db().await;
}
