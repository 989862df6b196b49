//! The bridge as a process: SIGKILL it while writers write, start a new one, and every
//! client that resumes converges to the table. SIGTERM then tells clients to reconnect
//! (a `reconnect` message and close code 1012) before the process exits.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use support::{Replica, TestDb, WsClient, APP_ROLE};
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
        .env("LIVESYNC_POLL_INTERVAL_MS", "200")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("the bridge binary starts")
}

async fn wait_ready(port: u16) {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/ready"))
            .send()
            .await
        {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge never became ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_converge_across_a_bridge_killed_mid_stream() {
    let db = TestDb::create("crash").await;
    let sql = db.connect().await;
    sql.batch_execute("INSERT INTO items SELECT g, 0, 'start', 0 FROM generate_series(1, 200) g")
        .await
        .unwrap();
    let port = free_port();
    let mut bridge = spawn_bridge(&db, port);
    wait_ready(port).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let mut clients = Vec::new();
    for i in 0..3 {
        let (mut client, _) = WsClient::hello(addr, &format!("c{i}")).await;
        let replica = Replica::load_snapshot(&mut client, "snap", "table:public.items").await;
        client
            .subscribe("s", "table:public.items", None, Some(replica.position))
            .await;
        clients.push((client, replica));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let writer = db.connect().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let id = (n * 13 + w * 7) % 300 + 1;
                let statement = match n % 4 {
                    0 => "DELETE FROM items WHERE id = $1",
                    1 => "INSERT INTO items VALUES ($1, 0, 'new', 0) ON CONFLICT (id) DO UPDATE SET title = 'again'",
                    _ => "UPDATE items SET score = score + 1 WHERE id = $1",
                };
                writer.execute(statement, &[&id]).await.unwrap();
            }
        }));
    }
    // Let changes flow, reading some of them, then kill -9 the bridge.
    for (client, replica) in &mut clients {
        for _ in 0..5 {
            let message = client.recv_changes().await;
            replica.apply(&message);
        }
    }
    bridge.kill().unwrap();
    bridge.wait().unwrap();
    // Every client sees its connection end; it keeps what it applied.
    for (client, replica) in &mut clients {
        while let Some(message) = client.recv_raw().await {
            if message["type"] == "changes" {
                replica.apply(&message);
            }
        }
    }
    // Writers go on while no bridge runs; then a new one starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut bridge = spawn_bridge(&db, port);
    wait_ready(port).await;
    let mut resumed = Vec::new();
    for (i, (_, replica)) in clients.into_iter().enumerate() {
        let (mut client, _) = WsClient::hello(addr, &format!("c{i}")).await;
        client
            .subscribe("s", "table:public.items", None, Some(replica.position))
            .await;
        resumed.push((client, replica));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let target = support::settle(&db).await;
    let expected = support::table_rows(&sql).await;
    for (client, replica) in &mut resumed {
        while replica.position < target {
            let message = client.recv_changes().await;
            replica.apply(&message);
        }
        support::assert_same_rows(&replica.values(), &expected, "a resumed client converges");
    }

    // SIGTERM: clients are told to reconnect, then the connection closes with 1012.
    let pid = bridge.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    for (client, _) in &mut resumed {
        let mut told = false;
        let mut code = None;
        while let Ok(Some(frame)) = tokio::time::timeout(support::PATIENCE, client.ws.next()).await
        {
            match frame {
                Ok(Message::Text(text)) => {
                    let message: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if message["type"] == "reconnect" {
                        told = true;
                    }
                }
                Ok(Message::Close(frame)) => {
                    code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(told, "a reconnect message before the close");
        assert_eq!(code, Some(1012));
    }
    let status = tokio::task::spawn_blocking(move || bridge.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "a clean exit after SIGTERM: {status:?}");
    db.drop_db().await;
}
