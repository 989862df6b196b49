//! The client and CLI against a real bridge: tail sees inserts made with SQL; two
//! clients' replicas converge on the table; rooms show both members.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use livesync_client::{Client, Config, Event};
use serde_json::{json, Value};
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn tail_prints_inserts_made_with_sql() {
    let db = TestDb::create("tail").await;
    let bridge = Bridge::start(&db, free_port()).await;
    let pg = db.connect().await;
    pg.batch_execute("INSERT INTO items (id, title) VALUES (1, 'before')")
        .await
        .unwrap();

    let mut tail = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_livesync"))
            .args(["tail", "public.items", "--since", "0", "--json"])
            .env("LIVESYNC_URL", bridge.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = tail.0.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut next = async || -> Value {
        let line = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("a line from tail")
            .expect("tail is running");
        serde_json::from_str(&line).expect("JSON lines")
    };
    // --since 0: the insert before tail started comes first.
    let first = next().await;
    assert_eq!(
        (first["op"].clone(), first["key"].clone()),
        (json!("insert"), json!({"id": 1}))
    );
    assert_eq!(first["delta"]["title"]["new"], "before");

    pg.batch_execute("INSERT INTO items (id, title) VALUES (2, 'live')")
        .await
        .unwrap();
    let second = next().await;
    assert_eq!(second["key"], json!({"id": 2}));
    assert_eq!(second["delta"]["title"]["new"], "live");
    assert!(second["position"].as_i64() > first["position"].as_i64());

    drop(tail);
    drop(bridge);
    db.drop_db().await;
}

async fn table_rows(pg: &tokio_postgres::Client) -> Vec<(i32, Option<String>, Option<i32>)> {
    pg.query("SELECT id, title, score FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn replica_rows(client: &Client) -> Vec<(i32, Option<String>, Option<i32>)> {
    let mut rows: Vec<_> = client
        .server_rows("items")
        .iter()
        .map(|r| {
            (
                r.values["id"].as_i64().unwrap() as i32,
                r.values
                    .get("title")
                    .and_then(|v| v.as_str())
                    .map(String::from),
                r.values
                    .get("score")
                    .and_then(|v| v.as_i64())
                    .map(|v| v as i32),
            )
        })
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clients_converge_and_see_each_other() {
    let db = TestDb::create("converge").await;
    let bridge = Bridge::start(&db, free_port()).await;
    let pg = db.connect().await;
    pg.batch_execute("INSERT INTO items (id, title, score) VALUES (1, 'one', 0), (2, 'two', 0)")
        .await
        .unwrap();

    let (a, mut a_events) = Client::start(Config::new(bridge.url(), "alice")).unwrap();
    let (b, _b_events) = Client::start(Config::new(bridge.url(), "bob")).unwrap();
    a.replicate("items", "public.items", None).unwrap();
    b.replicate("items", "public.items", None).unwrap();
    eventually("both replicas loaded", || {
        (a.is_loaded("items") && b.is_loaded("items")).then_some(())
    })
    .await;
    assert_eq!(replica_rows(&a), table_rows(&pg).await);

    // Optimistic: a's write shows in its view before the bridge answers.
    a.write(
        "public.items",
        "update",
        json!({"id": 1}),
        Some(json!({"title": "a1"})),
        None,
    )
    .unwrap();
    let view = a.rows("items");
    assert!(
        view.iter().any(|r| r["id"] == 1 && r["title"] == "a1"),
        "{view:?}"
    );
    b.write(
        "public.items",
        "insert",
        json!({"id": 3}),
        Some(json!({"title": "b3", "score": 7})),
        None,
    )
    .unwrap();
    b.write(
        "public.items",
        "update",
        json!({"id": 2}),
        Some(json!({"score": 5})),
        None,
    )
    .unwrap();
    a.write("public.items", "delete", json!({"id": 2}), None, None)
        .unwrap();
    pg.batch_execute("INSERT INTO items (id, title) VALUES (4, 'sql')")
        .await
        .unwrap();
    // A write the server rejects is rolled back to the server's row.
    a.write(
        "public.items",
        "update",
        json!({"id": 99}),
        Some(json!({"title": "ghost"})),
        None,
    )
    .unwrap();
    tokio::time::timeout(PATIENCE, async { tokio::join!(a.flush(), b.flush()) })
        .await
        .expect("every write settled");
    let mut rejected = None;
    while let Ok(e) = a_events.try_recv() {
        if let Event::WriteSettled {
            mutation, result, ..
        } = e
        {
            if mutation.key == json!({"id": 99}) {
                rejected = Some(result);
            }
        }
    }
    assert_eq!(rejected.expect("the ghost's result")["status"], "rejected");
    assert!(!a.rows("items").iter().any(|r| r["id"] == 99));

    let expected = table_rows(&pg).await;
    assert_eq!(expected.len(), 3, "{expected:?}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while replica_rows(&a) != expected || replica_rows(&b) != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas never converged: a {:?}, b {:?}, table {expected:?}",
            replica_rows(&a),
            replica_rows(&b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Rooms: both see both.
    a.join("board:1", json!({"cursor": 1})).unwrap();
    b.join("board:1", json!({"cursor": 2})).unwrap();
    eventually("both members in both views", || {
        (a.members("board:1").len() == 2 && b.members("board:1").len() == 2).then_some(())
    })
    .await;
    b.leave("board:1").unwrap();
    eventually("a sees b leave", || {
        (a.members("board:1").len() == 1).then_some(())
    })
    .await;

    a.close().await;
    b.close().await;
    drop(bridge);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_resumes_after_the_bridge_restarts() {
    let db = TestDb::create("resume").await;
    let port = free_port();
    let mut bridge = Bridge::start(&db, port).await;
    let pg = db.connect().await;
    let mut config = Config::new(bridge.url(), "carol");
    config.backoff_max = Duration::from_millis(500);
    let (c, _events) = Client::start(config).unwrap();
    c.replicate("items", "public.items", None).unwrap();
    eventually("loaded", || c.is_loaded("items").then_some(())).await;
    pg.batch_execute("INSERT INTO items (id, title) VALUES (1, 'x')")
        .await
        .unwrap();
    eventually("row 1", || (replica_rows(&c).len() == 1).then_some(())).await;

    bridge.kill();
    // Changes while it is down come with the resume (`since`), not a reload.
    pg.batch_execute(
        "INSERT INTO items (id, title) VALUES (2, 'y'); UPDATE items SET title = 'x2' WHERE id = 1",
    )
    .await
    .unwrap();
    let bridge = Bridge::start(&db, port).await;
    let expected = table_rows(&pg).await;
    eventually("resumed", || (replica_rows(&c) == expected).then_some(())).await;

    c.close().await;
    drop(bridge);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_cli_shows_members_live() {
    let db = TestDb::create("presence").await;
    let bridge = Bridge::start(&db, free_port()).await;
    let mut cli = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_livesync"))
            .args(["presence", "board:7", "--json", "--client-id", "cli-user"])
            .env("LIVESYNC_URL", bridge.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = cli.0.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    let mut users = async || -> Vec<String> {
        let m = tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("a presence line")
            .expect("the CLI runs");
        assert_eq!(m["room"], "board:7");
        let mut u: Vec<String> = m["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["user"].as_str().unwrap().to_string())
            .collect();
        u.sort();
        u
    };
    // Each change prints the whole list; wait for the list expected next.
    let mut until = async |expected: &[&str]| {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let got = users().await;
            if got == expected {
                return;
            }
            eprintln!("members now: {got:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "never saw {expected:?}"
            );
        }
    };
    until(&["cli-user"]).await;
    let (other, _events) = Client::start(Config::new(bridge.url(), "dave")).unwrap();
    other.join("board:7", json!({"status": "here"})).unwrap();
    until(&["cli-user", "dave"]).await;
    other.close().await;
    until(&["cli-user"]).await;

    drop(cli);
    drop(bridge);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_from_outside_the_log_says_resync_required() {
    let db = TestDb::create("resync").await;
    let bridge = Bridge::start(&db, free_port()).await;
    let out = Command::new(env!("CARGO_BIN_EXE_livesync"))
        .args(["tail", "public.items", "--since", "999999999"])
        .env("LIVESYNC_URL", bridge.url())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resync required"), "{stderr}");
    drop(bridge);
    db.drop_db().await;
}
