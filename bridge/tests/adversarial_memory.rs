//! Adversarial: the window is bounded in changes, not bytes.

mod support;

use std::time::Duration;

use support::TestDb;

fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// FINDING: `RecentWindow` (changelog/window.rs `push`) evicts by change count only
/// (`window_changes`, default 100,000), although `Txn::approx_bytes` exists "for
/// bounding windows". Large rows make the window's memory proportional to row size:
/// here 2,000 changes of 200 kB (400 MB) keep ~900 MB resident with no subscriber at all
/// (each change is held twice: the client JSON and the raw entry). At the default
/// 100,000 changes, 200 kB rows would need ~40 GB.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "heavy (400 MB of rows); the window is now bounded in bytes too (limits.window_bytes, default 256 MiB)"]
async fn the_window_is_bounded_in_bytes() {
    let db = TestDb::create("adv_window_mem").await;
    let bridge = db.start_bridge().await;
    let sql = db.connect().await;
    let before = rss();
    for chunk in 0..20 {
        sql.execute(
            "INSERT INTO items SELECT g, 0, repeat(md5(g::text), 6250), 0 FROM generate_series($1::int, $1::int + 99) g",
            &[&(chunk * 100)],
        )
        .await
        .unwrap();
    }
    let newest = support::settle(&db).await;
    while bridge.state.hub.head() < Some(newest) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss().saturating_sub(before);
    let stats = bridge.state.hub.stats();
    eprintln!(
        "window holds {} changes; the process grew {} MB for 2,000 rows of 200 kB (400 MB of row data)",
        stats.window_changes,
        grown >> 20
    );
    assert!(grown < 200 << 20, "grew {} MB", grown >> 20);
    bridge.shutdown().await;
    db.drop_db().await;
}
