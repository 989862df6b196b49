//! The restart test: `livesync write` is SIGKILLed with its writes queued (the bridge
//! is down, so they cannot go out), then run again once the bridge is back; every
//! write is applied exactly once. Then the case of a kill after the bridge applied a
//! write but before its result was recorded: the replay is answered from livesync's
//! idempotency records and changes nothing.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

const CLIENT_ID: &str = "rc-writer";

fn livesync(url: &str, queue: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_livesync"));
    c.args(args)
        .args(["--queue", queue.to_str().unwrap()])
        .env("LIVESYNC_URL", url)
        .env("LIVESYNC_CLIENT_ID", CLIENT_ID)
        .env_remove("LIVESYNC_TOKEN");
    c
}

fn run(mut c: Command) -> Output {
    let out = c.output().expect("livesync runs");
    assert!(
        out.status.success(),
        "livesync failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn results(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect()
}

async fn rows(pg: &tokio_postgres::Client) -> Vec<(i32, String)> {
    pg.query("SELECT id, title FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Per mutation id: (idempotency records, changes in the log) for our client.
async fn applied_counts(pg: &tokio_postgres::Client) -> Vec<(i64, i64, i64)> {
    pg.query(
        "SELECT m.mutation_id, count(DISTINCT m.written_by),
                (SELECT count(*) FROM livesync.changes_since(0, 100000) c
                  WHERE c.client_id = m.client_id AND c.mutation_id = m.mutation_id)
           FROM livesync._mutations m WHERE m.client_id = $1
          GROUP BY m.client_id, m.mutation_id ORDER BY 1",
        &[&CLIENT_ID],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_with_queued_writes_then_restarted_applies_each_once() {
    let db = TestDb::create("restart").await;
    let pg = db.connect().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("writer.queue");
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/ws");

    // One write while the bridge is up: mutation 1, settled.
    let mut bridge = Bridge::start(&db, port).await;
    let out = run(livesync(
        &url,
        &queue,
        &[
            "write",
            "public.items",
            "insert",
            r#"{"id":1}"#,
            r#"{"title":"one"}"#,
        ],
    ));
    // A new queue file starts its ids from the clock; they go up by one from there.
    let f = results(&out)[0]["mutation_id"].as_i64().unwrap();
    assert_eq!(results(&out)[0]["result"]["status"], "applied");
    bridge.kill();

    // Three writes while it is down: each process queues its write and is killed.
    let writes = [
        ("insert", r#"{"id":2}"#, r#"{"title":"two"}"#),
        (
            "update",
            r#"{"id":1}"#,
            r#"{"title":"one, edited offline"}"#,
        ),
        ("insert", r#"{"id":3}"#, r#"{"title":"three"}"#),
    ];
    for (n, (op, key, values)) in writes.iter().enumerate() {
        let mutation_id = f + n as i64 + 1;
        let mut child = KillOnDrop(
            livesync(&url, &queue, &["write", "public.items", op, key, values])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let needle = format!("\"mutation_id\":{mutation_id}");
        eventually("the write is in the queue file", || {
            std::fs::read_to_string(&queue)
                .ok()
                .filter(|t| t.contains(&needle))
        })
        .await;
        // A moment of retrying against the stopped bridge, then SIGKILL.
        tokio::time::sleep(Duration::from_millis(200)).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
    assert_eq!(
        rows(&pg).await,
        [(1, "one".to_string())],
        "nothing applied while down"
    );
    // What the queue file holds now: also the state "applied but never recorded", below.
    let before_flush = std::fs::read(&queue).unwrap();

    // Restarted: the bridge is back; running livesync again replays the queue.
    let bridge = Bridge::start(&db, port).await;
    let out = run(livesync(&url, &queue, &["flush"]));
    let first = results(&out);
    let ids: Vec<i64> = first
        .iter()
        .map(|r| r["mutation_id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [f + 1, f + 2, f + 3], "replayed in order: {first:?}");
    let expected = vec![
        (1, "one, edited offline".to_string()),
        (2, "two".to_string()),
        (3, "three".to_string()),
    ];
    assert_eq!(rows(&pg).await, expected);
    let once: Vec<(i64, i64, i64)> = (0..4).map(|i| (f + i, 1, 1)).collect();
    assert_eq!(
        applied_counts(&pg).await,
        once,
        "one idempotency record and one logged change per mutation"
    );

    // Killed after the bridge applied them but before the results were recorded:
    // the queue file still lists them. The replay gets the first results back and
    // changes nothing.
    pg.batch_execute("UPDATE items SET title = 'changed by SQL' WHERE id = 2")
        .await
        .unwrap();
    std::fs::write(&queue, &before_flush).unwrap();
    let out = run(livesync(&url, &queue, &["flush"]));
    let again = results(&out);
    assert_eq!(
        again.iter().map(|r| &r["result"]).collect::<Vec<_>>(),
        first.iter().map(|r| &r["result"]).collect::<Vec<_>>(),
        "a retry returns the first result"
    );
    let mut expected = expected;
    expected[1].1 = "changed by SQL".into();
    assert_eq!(rows(&pg).await, expected, "the replay changed nothing");
    assert_eq!(applied_counts(&pg).await, once);

    // And a new write never reuses an id.
    let out = run(livesync(
        &url,
        &queue,
        &["write", "public.items", "delete", r#"{"id":3}"#],
    ));
    assert_eq!(results(&out)[0]["mutation_id"], f + 4);
    assert_eq!(applied_counts(&pg).await.len(), 5);
    assert_eq!(rows(&pg).await.len(), 2);

    drop(bridge);
    db.drop_db().await;
}
