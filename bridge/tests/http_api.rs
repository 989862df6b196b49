//! The HTTP API without auth: health, readiness, Prometheus metrics that count what
//! happened, per-channel stats and cleanup.

mod support;

use serde_json::Value;
use support::{TestDb, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_ready_metrics_stats_and_cleanup() {
    let db = TestDb::create("http_api").await;
    let bridge = db.start_bridge().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", bridge.addr);
    assert_eq!(
        http.get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        let ready = http.get(format!("{base}/ready")).send().await.unwrap();
        if ready.status() == 200 {
            let body: Value = ready.json().await.unwrap();
            assert_eq!(body["listening"], true);
            assert_eq!(body["database"], true);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let (mut client, _) = WsClient::hello(bridge.addr, "watcher").await;
    client
        .subscribe("s", "table:public.items", None, None)
        .await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items VALUES (1, 0, 'a', 0), (2, 0, 'b', 0)")
        .await
        .unwrap();
    client.recv_changes().await;

    let stats: Value = http
        .get(format!("{base}/api/v1/sync/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let channel = stats["hub"]["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "table:public.items")
        .unwrap_or_else(|| panic!("{stats}"))
        .clone();
    assert_eq!(channel["subscriptions"], 1);
    assert!(channel["changes_sent"].as_u64().unwrap() >= 2, "{channel}");
    assert!(stats["connections"].as_u64().unwrap() >= 1);

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "livesync_connections",
        "livesync_subscriptions",
        "livesync_changes_read_total",
        "livesync_changes_sent_total",
        "livesync_commit_to_publish_seconds_bucket",
        "livesync_queue_depth_max",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let sent: f64 = metrics
        .lines()
        .find(|l| l.starts_with("livesync_changes_sent_total"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent >= 2.0);

    // Cleanup with the default retention (24 h) removes nothing this young.
    let cleanup: Value = http
        .post(format!("{base}/api/v1/sync/cleanup"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleanup["removed_changes"], 0, "{cleanup}");
    assert_eq!(cleanup["retention_seconds"], 86400);
    bridge.shutdown().await;
    db.drop_db().await;
}
