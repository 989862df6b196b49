//! PostgreSQL stops and starts again under a running bridge: `/ready` says false
//! meanwhile and writes get `unavailable`; afterwards the bridge reconnects,
//! LISTENs again, catches up and a subscriber has lost nothing.
//! (Its own test binary: stopping the server must not disturb other tests.)

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{Replica, TestDb, WsClient};

fn pg_ctl(action: &str) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    let mut command = if root {
        Command::new("pg_ctlcluster")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", "pg_ctlcluster"]);
        sudo
    };
    command.args(["--skip-systemctl-redirect", "15", "main", action]);
    if action == "stop" {
        command.args(["-m", "fast"]);
    }
    assert!(
        command.status().expect("pg_ctlcluster runs").success(),
        "pg_ctlcluster {action}"
    );
}

async fn ready(http: &reqwest::Client, addr: std::net::SocketAddr) -> bool {
    http.get(format!("http://{addr}/ready"))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bridge_rides_out_a_database_restart() {
    let db = TestDb::create("pg_restart").await;
    let mut config = db.config();
    config.poll_interval = Duration::from_millis(200);
    let bridge = support::start(config).await;
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while !ready(&http, bridge.addr).await {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items SELECT g, 0, 'before', 0 FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let (mut client, _) = WsClient::hello(bridge.addr, "survivor").await;
    let mut replica = Replica::load_snapshot(&mut client, "snap", "table:public.items").await;
    client
        .subscribe("s", "table:public.items", None, Some(replica.position))
        .await;
    sql.batch_execute("UPDATE items SET score = 1 WHERE id <= 10")
        .await
        .unwrap();
    drop(sql);

    pg_ctl("stop");
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while ready(&http, bridge.addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready stayed true with the database down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client
        .send(json!({"type": "write", "id": "w", "table": "items", "op": "update", "key": {"id": 1}, "values": {"title": "x"}, "mutation_id": 1}))
        .await;
    let error = client.recv_reply("w").await;
    assert_eq!(error["code"], "unavailable", "{error}");
    pg_ctl("start");

    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while !ready(&http, bridge.addr).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The retry of the refused write goes through now.
    client
        .send(json!({"type": "write", "id": "w2", "table": "items", "op": "update", "key": {"id": 1}, "values": {"title": "x"}, "mutation_id": 1}))
        .await;
    assert_eq!(client.recv_reply("w2").await["status"], "applied");
    let sql = db.connect().await;
    sql.batch_execute(
        "DELETE FROM items WHERE id > 90; INSERT INTO items VALUES (500, 0, 'after', 0)",
    )
    .await
    .unwrap();
    let target = support::settle(&db).await;
    while replica.position < target {
        let message = client.recv_changes().await;
        replica.apply(&message);
    }
    support::assert_same_rows(
        &replica.values(),
        &support::table_rows(&sql).await,
        "after the restart",
    );
    bridge.shutdown().await;
    db.drop_db().await;
}
