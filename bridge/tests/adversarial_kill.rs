//! Adversarial: SIGKILL the bridge while clients have writes in flight. Every
//! acknowledged write is committed; after a restart, retrying every unacknowledged
//! mutation (same client_id, same mutation_id) applies each exactly once, and a retry
//! of one that did commit returns its first result.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::{TestDb, WsClient, APP_ROLE};
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_bridge(db: &TestDb, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_livesync-bridge"))
        .env("DATABASE_URL", db.bridge_url())
        .env("LIVESYNC_LISTEN", format!("127.0.0.1:{port}"))
        .env("LIVESYNC_DEFAULT_ROLE", APP_ROLE)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the bridge binary starts")
}

async fn wait_ready(port: u16) {
    let http = reqwest::Client::new();
    for _ in 0..1000 {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_and_retries_apply_once() {
    let db = TestDb::create("adv_kill").await;
    let port = free_port();
    let mut bridge = spawn_bridge(&db, port);
    wait_ready(port).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut tasks = Vec::new();
    for c in 0..4i64 {
        tasks.push(tokio::spawn(async move {
            let (client, _) = WsClient::hello(addr, &format!("killer-{c}")).await;
            let (mut tx, mut rx) = client.ws.split();
            // Pipeline writes: every mutation its own row (id = c * 100000 + m).
            let sender = tokio::spawn(async move {
                let mut sent = 0i64;
                for m in 1..=100_000i64 {
                    let id = c * 100_000 + m;
                    let frame = json!({"type": "write", "id": m, "table": "items", "op": "insert",
                        "key": {"id": id}, "values": {"id": id, "title": "w"}, "mutation_id": m});
                    if tx
                        .send(Message::Text(frame.to_string().into()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent = m;
                    if m % 20 == 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                sent
            });
            let mut acked: HashMap<i64, Value> = HashMap::new();
            while let Some(Ok(frame)) = rx.next().await {
                if let Message::Text(t) = frame {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "write_result" {
                        acked.insert(v["id"].as_i64().unwrap(), v);
                    } else if v["type"] == "error" {
                        panic!("{v}");
                    }
                }
            }
            let sent = sender.await.unwrap();
            (c, sent, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    bridge.kill().unwrap(); // SIGKILL
    bridge.wait().unwrap();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }

    let sql = db.connect().await;
    let mut problems = Vec::new();
    for (c, _, acked) in &results {
        for (m, result) in acked {
            let id = c * 100_000 + m;
            let v: Option<i64> = sql
                .query_opt(
                    "SELECT _livesync_version FROM items WHERE id = $1",
                    &[&(id as i32)],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            if v != result["version"].as_i64() {
                problems.push(format!(
                    "acked {c}/{m} version {} but table has {v:?}",
                    result["version"]
                ));
            }
        }
    }
    // Restart; replay everything each client sent (acked or not) with the same ids.
    let mut bridge = spawn_bridge(&db, port);
    wait_ready(port).await;
    let mut retried = 0;
    for (c, sent, acked) in &results {
        let (mut client, _) = WsClient::hello(addr, &format!("killer-{c}")).await;
        let upto = (*sent).min(acked.keys().max().copied().unwrap_or(0) + 50);
        for m in 1..=upto {
            let id = c * 100_000 + m;
            client
                .send(
                    json!({"type": "write", "id": m, "table": "items", "op": "insert",
                    "key": {"id": id}, "values": {"id": id, "title": "w"}, "mutation_id": m}),
                )
                .await;
            let r = client.recv_reply_num(m).await;
            retried += 1;
            if let Some(first) = acked.get(&m) {
                let mut a = first.clone();
                let mut b = r.clone();
                a.as_object_mut().unwrap().remove("id");
                b.as_object_mut().unwrap().remove("id");
                if a != b {
                    problems.push(format!("retry of acked {c}/{m}: first {first} now {r}"));
                }
            } else if r["status"] != "applied" {
                problems.push(format!("retry of unacked {c}/{m}: {r}"));
            }
        }
    }
    let dupes: i64 = sql
        .query_one("SELECT count(*) - count(DISTINCT id) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    let total_acked: usize = results.iter().map(|r| r.2.len()).sum();
    eprintln!(
        "acked before the kill: {total_acked}; retried {retried}; problems {}",
        problems.len()
    );
    for p in problems.iter().take(10) {
        eprintln!("PROBLEM {p}");
    }
    bridge.kill().unwrap();
    let _ = bridge.wait();
    db.drop_db().await;
    assert_eq!(dupes, 0);
    assert!(problems.is_empty());
}

trait ReplyNum {
    async fn recv_reply_num(&mut self, id: i64) -> Value;
}
impl ReplyNum for WsClient {
    async fn recv_reply_num(&mut self, id: i64) -> Value {
        loop {
            let m = self.recv().await;
            if m["id"] == id && m["type"] != "changes" {
                return m;
            }
        }
    }
}
