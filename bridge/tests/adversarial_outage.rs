//! Adversarial: the bridge loses its database (its backends terminated, new
//! connections refused) while another session keeps committing; without restarting
//! the server. /ready must say so; afterwards every subscriber has every change once,
//! in order.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{TestDb, WsClient, BRIDGE_ROLE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_loses_nothing_and_ready_says_so() {
    let db = TestDb::create("adv_outage").await;
    let bridge = db.start_bridge().await;
    let admin = support::connect(&format!("{} dbname=postgres", support::server())).await;
    let writer = db.connect().await;
    let (mut a, _) = WsClient::hello(bridge.addr, "a").await;
    a.subscribe("s", "table:public.items", None, None).await;
    let http = reqwest::Client::new();
    let ready = |http: reqwest::Client| {
        let url = format!("http://{}/ready", bridge.addr);
        async move {
            http.get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(ready(http.clone()).await, 200);

    let w = tokio::spawn(async move {
        for i in 1..=3000i32 {
            writer
                .execute("INSERT INTO items VALUES ($1, 0, 'w', 0)", &[&i])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND usename = '{BRIDGE_ROLE}';",
            db = db.name
        ))
        .await
        .unwrap();
    let mut readiness = Vec::new();
    let (mut c, _) = WsClient::hello(bridge.addr, "c").await;
    let started = Instant::now();
    c.send(json!({"type": "subscribe", "id": "x", "channel": "table:public.scores"}))
        .await;
    let r = c.recv_reply("x").await;
    eprintln!("subscribe during the outage: {:?} {r}", started.elapsed());
    for _ in 0..8 {
        readiness.push(ready(http.clone()).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            db.name
        ))
        .await
        .unwrap();
    w.await.unwrap();
    let end = support::settle(&db).await;
    let mut last = 0;
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while last < end && Instant::now() < deadline {
        let m = a.recv_changes().await;
        last = m["position"].as_i64().unwrap();
        for ch in m["changes"].as_array().unwrap() {
            ids.push(ch["key"]["id"].as_i64().unwrap());
        }
    }
    let after_ready = ready(http.clone()).await;
    eprintln!("/ready during the outage: {readiness:?}, after: {after_ready}");
    ids.retain(|i| *i < 1_000_000);
    let expected: Vec<i64> = (1..=3000).collect();
    assert_eq!(ids.len(), expected.len(), "every change once");
    assert_eq!(ids, expected, "in order");
    assert!(
        readiness.contains(&503),
        "/ready false during the outage: {readiness:?}"
    );
    assert_eq!(after_ready, 200);
    bridge.shutdown().await;
    db.drop_db().await;
}
