//! A client that stops reading does not slow the others; its queue stays bounded; when
//! it reads again it gets every change in order (caught up) or is told to resync.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{TestDb, WsClient};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_client_neither_slows_the_others_nor_grows_memory() {
    let db = TestDb::create("slow_consumer").await;
    let mut config = db.config();
    config.limits.queue_capacity = 16;
    config.limits.window_changes = 500;
    config.limits.max_catch_up = Duration::from_secs(4);
    let bridge = support::start(config).await;
    let sql = db.connect().await;

    let (mut fast, _) = WsClient::hello(bridge.addr, "fast").await;
    fast.subscribe("s", "table:public.items", None, None).await;
    let (mut slow, _) = WsClient::hello(bridge.addr, "slow").await;
    let subscribed = slow.subscribe("s", "table:public.items", None, None).await;
    let start = subscribed["position"].as_i64().unwrap();

    // 4,000 changes of 8 kB each (32 MB) while `slow` reads nothing.
    let rss_before = rss_bytes();
    let writer = tokio::spawn({
        let sql = db.connect().await;
        async move {
            for i in 0..4000 {
                sql.execute(
                    "INSERT INTO items VALUES ($1, 0, repeat('x', 8192), 0)",
                    &[&i],
                )
                .await
                .unwrap();
            }
        }
    });
    let mut fast_seen = 0;
    let mut fast_last = start;
    while fast_seen < 4000 {
        let message = fast.recv_changes().await;
        for change in message["changes"].as_array().unwrap() {
            let position = change["position"].as_i64().unwrap();
            assert!(position > fast_last);
            fast_last = position;
            fast_seen += 1;
        }
    }
    writer.await.unwrap();
    let (total, max) = bridge.state.connections.queue_depths();
    assert!(
        max <= 16,
        "a connection's queue never holds more than its capacity ({max}, total {total})"
    );
    let stats = bridge.state.hub.stats();
    assert!(
        stats.window_changes <= 500 + 1,
        "the window stays bounded ({})",
        stats.window_changes
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 24 << 20,
        "32 MB went to a client that does not read, yet the process grew by {} MB",
        grown >> 20
    );
    let _ = sql;

    // Now `slow` reads: every change in order from where it was, until either it has
    // them all or it is told to resync; never a gap.
    let mut last = start;
    let mut seen = 0;
    let mut resynced = false;
    while seen < 4000 {
        let message: Value = slow.recv().await;
        match message["type"].as_str().unwrap() {
            "changes" => {
                for change in message["changes"].as_array().unwrap() {
                    let position = change["position"].as_i64().unwrap();
                    assert!(position > last, "no duplicate");
                    assert_eq!(change["key"]["id"].as_i64().unwrap(), seen, "no gap");
                    last = position;
                    seen += 1;
                }
            }
            "error" => {
                assert_eq!(message["code"], "resync_required", "{message}");
                assert_eq!(message["id"], "s");
                resynced = true;
                break;
            }
            other => panic!("unexpected {other}: {message}"),
        }
    }
    assert!(resynced || seen == 4000);
    if resynced {
        // The id is free again; resuming from what it has (still retained) completes it.
        slow.subscribe("s", "table:public.items", None, Some(last))
            .await;
        while seen < 4000 {
            let message = slow.recv_changes().await;
            for change in message["changes"].as_array().unwrap() {
                assert_eq!(
                    change["key"]["id"].as_i64().unwrap(),
                    seen,
                    "no gap after the resync"
                );
                seen += 1;
            }
        }
    }
    bridge.shutdown().await;
    db.drop_db().await;
}
