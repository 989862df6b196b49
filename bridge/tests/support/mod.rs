//! Harness for the bridge's integration tests: a database of each test's own on the
//! real server, the bridge connecting as a role with only livesync's documented
//! grants, and real WebSocket clients.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use livesync_bridge::config::Config;
use livesync_bridge::RunningBridge;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The role the bridge logs in as: `livesync_reader` and `livesync_maintainer`, and
/// membership in the application roles it switches to (never a superuser).
pub const BRIDGE_ROLE: &str = "livesync_test_bridge";
/// An application role with full privileges on the test tables.
pub const APP_ROLE: &str = "livesync_test_app";
/// An application role that may only read.
pub const VIEWER_ROLE: &str = "livesync_test_viewer";

pub fn server() -> String {
    std::env::var("LIVESYNC_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
}

/// How long any single expected message may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e} (is PostgreSQL running? see README)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database with livesync and two tracked tables, `items (id int PRIMARY KEY,
/// match_id int, title text, score int)` and `scores (match_id, player, points)` keyed
/// by (match_id, player); the app roles granted on them.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn create(name: &str) -> TestDb {
        let name = format!("livesync_bridge_{name}");
        let admin = connect(&format!("{} dbname=postgres", server())).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let db = TestDb { name };
        let owner = db.connect().await;
        owner
            .batch_execute("CREATE EXTENSION livesync")
            .await
            .expect("CREATE EXTENSION livesync (is the extension installed? see README)");
        // Roles are cluster-wide: created once, under a lock, by whichever test is first.
        admin
            .batch_execute("SELECT pg_advisory_lock(812734)")
            .await
            .unwrap();
        let roles = format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{BRIDGE_ROLE}') THEN
                     CREATE ROLE {BRIDGE_ROLE} LOGIN;
                 END IF;
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                     CREATE ROLE {APP_ROLE} NOLOGIN;
                 END IF;
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{VIEWER_ROLE}') THEN
                     CREATE ROLE {VIEWER_ROLE} NOLOGIN;
                 END IF;
             END $$;
             GRANT livesync_reader, livesync_maintainer TO {BRIDGE_ROLE};
             GRANT {APP_ROLE}, {VIEWER_ROLE} TO {BRIDGE_ROLE};"
        );
        let created = admin.batch_execute(&roles).await;
        admin
            .batch_execute("SELECT pg_advisory_unlock(812734)")
            .await
            .unwrap();
        created.unwrap();
        owner
            .batch_execute(&format!(
                "CREATE TABLE items (id int PRIMARY KEY, match_id int, title text, score int);
                 SELECT livesync.track('items');
                 CREATE TABLE scores (match_id int, player int, points int NOT NULL DEFAULT 0,
                                      PRIMARY KEY (match_id, player));
                 SELECT livesync.track('scores');
                 GRANT USAGE ON SCHEMA livesync TO {APP_ROLE}, {VIEWER_ROLE};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON items, scores TO {APP_ROLE};
                 GRANT SELECT ON items, scores TO {VIEWER_ROLE};"
            ))
            .await
            .unwrap();
        db
    }

    /// A connection as the database owner (postgres).
    pub async fn connect(&self) -> Client {
        connect(&self.conninfo()).await
    }

    pub fn conninfo(&self) -> String {
        format!("{} dbname={}", server(), self.name)
    }

    /// The bridge's connection string: its own role, not the superuser.
    pub fn bridge_url(&self) -> String {
        let base = server().replace("user=postgres", "");
        format!("{base} user={BRIDGE_ROLE} dbname={}", self.name)
    }

    /// Bridge settings for this database, listening on a free port.
    pub fn config(&self) -> Config {
        let mut config = Config::new(self.bridge_url());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.default_role = Some(APP_ROLE.into());
        config.node_name = format!("test-{}", self.name);
        config.poll_interval = Duration::from_millis(500);
        config
    }

    pub async fn start_bridge(&self) -> RunningBridge {
        start(self.config()).await
    }

    pub async fn drop_db(self) {
        let admin = connect(&format!("{} dbname=postgres", server())).await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Starts a bridge and waits until its reader has a position (subscriptions work).
pub async fn start(config: Config) -> RunningBridge {
    let bridge = livesync_bridge::start(config)
        .await
        .expect("the bridge starts");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while bridge.state.hub.head().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge's reader never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bridge
}

/// A WebSocket client speaking the protocol.
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Messages read while waiting for another kind.
    pub pending: std::collections::VecDeque<Value>,
}

impl WsClient {
    pub async fn connect(addr: std::net::SocketAddr) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("WebSocket connects");
        WsClient {
            ws,
            pending: Default::default(),
        }
    }

    /// Connects and says hello (no token); returns the client and its `welcome`.
    pub async fn hello(addr: std::net::SocketAddr, client_id: &str) -> (WsClient, Value) {
        let mut client = WsClient::connect(addr).await;
        client
            .send(json!({"type": "hello", "client_id": client_id, "protocol": 1}))
            .await;
        let welcome = client.recv_type("welcome").await;
        (client, welcome)
    }

    pub async fn send(&mut self, message: Value) {
        self.ws
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next JSON message (pings are answered by tungstenite).
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        self.recv_raw()
            .await
            .expect("the connection closed while a message was expected")
    }

    /// The next JSON message from the socket; None when it closed.
    pub async fn recv_raw(&mut self) -> Option<Value> {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("no message within the test's patience");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("JSON text frames"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads until a message of `kind` arrives; others are kept for `recv`.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        if let Some(i) = self.pending.iter().position(|m| m["type"] == kind) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let message = self
                .recv_raw()
                .await
                .unwrap_or_else(|| panic!("closed while waiting for {kind}"));
            if message["type"] == kind {
                return message;
            }
            self.pending.push_back(message);
        }
    }

    /// Subscribes and returns the `subscribed` message.
    pub async fn subscribe(
        &mut self,
        id: &str,
        channel: &str,
        filter: Option<Value>,
        since: Option<i64>,
    ) -> Value {
        let mut message = json!({"type": "subscribe", "id": id, "channel": channel});
        if let Some(filter) = filter {
            message["filter"] = filter;
        }
        if let Some(since) = since {
            message["since"] = since.into();
        }
        self.send(message).await;
        let reply = self.recv_reply(id).await;
        assert_eq!(reply["type"], "subscribed", "subscribe {id}: {reply}");
        reply
    }

    /// The next message answering request `id` (`changes` of other subscriptions and
    /// other messages are kept).
    pub async fn recv_reply(&mut self, id: &str) -> Value {
        if let Some(i) = self
            .pending
            .iter()
            .position(|m| m["id"] == id && m["type"] != "changes")
        {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let message = self
                .recv_raw()
                .await
                .unwrap_or_else(|| panic!("closed while waiting for a reply to {id}"));
            if message["id"] == id && message["type"] != "changes" {
                return message;
            }
            self.pending.push_back(message);
        }
    }

    /// The next `changes` message (whole: parts are joined).
    pub async fn recv_changes(&mut self) -> Value {
        let mut message = self.recv_type("changes").await;
        if let Some(parts) = message.get("parts").and_then(Value::as_u64) {
            let mut changes = message["changes"].as_array().unwrap().clone();
            for expected in 2..=parts {
                let next = self.recv_type("changes").await;
                assert_eq!(next["part"], expected, "parts arrive in order");
                assert_eq!(next["position"], message["position"]);
                changes.extend(next["changes"].as_array().unwrap().iter().cloned());
            }
            message["changes"] = Value::Array(changes);
            message.as_object_mut().unwrap().remove("part");
            message.as_object_mut().unwrap().remove("parts");
        }
        message
    }
}

/// A client-side replica of one table, applying snapshot rows and changes by version.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Replica {
    pub rows: std::collections::BTreeMap<String, (i64, Value)>,
    pub position: i64,
}

impl Replica {
    /// Loads a snapshot (every page of request `id`).
    pub async fn load_snapshot(client: &mut WsClient, id: &str, channel: &str) -> Replica {
        client
            .send(json!({"type": "snapshot", "id": id, "channel": channel}))
            .await;
        let mut replica = Replica::default();
        loop {
            let page = client.recv_reply(id).await;
            assert_eq!(page["type"], "snapshot_page", "{page}");
            replica.position = page["position"].as_i64().unwrap();
            for row in page["rows"].as_array().unwrap() {
                replica.rows.insert(
                    row["key"].to_string(),
                    (row["version"].as_i64().unwrap(), row["row"].clone()),
                );
            }
            if page["last"] == true {
                return replica;
            }
        }
    }

    /// Applies one `changes` message. Returns how many changes it held.
    pub fn apply(&mut self, message: &Value) -> usize {
        let changes = message["changes"].as_array().unwrap();
        for change in changes {
            let key = change["key"].to_string();
            let version = change["version"].as_i64().unwrap_or(i64::MAX);
            match change["op"].as_str().unwrap() {
                "insert" if self.rows.get(&key).is_none_or(|(v, _)| *v < version) => {
                    let row: serde_json::Map<String, Value> = change["delta"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, d)| (k.clone(), d["new"].clone()))
                        .collect();
                    self.rows.insert(key, (version, Value::Object(row)));
                }
                "update" => {
                    if let Some((v, row)) = self.rows.get_mut(&key) {
                        if *v < version {
                            for (k, d) in change["delta"].as_object().unwrap() {
                                row[k] = d["new"].clone();
                            }
                            *v = version;
                        }
                    }
                }
                "delete" if self.rows.get(&key).is_some_and(|(v, _)| *v < version) => {
                    self.rows.remove(&key);
                }
                "truncate" => self.rows.clear(),
                _ => {}
            }
        }
        self.position = message["position"].as_i64().unwrap();
        changes.len()
    }

    /// The rows without versions, keyed by primary key JSON.
    pub fn values(&self) -> std::collections::BTreeMap<String, Value> {
        self.rows
            .iter()
            .map(|(k, (_, row))| (k.clone(), row.clone()))
            .collect()
    }
}

/// Fails with the rows that differ (not the whole tables) when they do.
pub fn assert_same_rows(
    replica: &std::collections::BTreeMap<String, Value>,
    table: &std::collections::BTreeMap<String, Value>,
    what: &str,
) {
    let mut diffs = Vec::new();
    for (k, v) in table {
        if replica.get(k) != Some(v) {
            diffs.push(format!("{k}: table {v} replica {:?}", replica.get(k)));
        }
    }
    for (k, v) in replica {
        if !table.contains_key(k) {
            diffs.push(format!("{k}: not in the table, replica {v}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} rows differ: {:?}",
        diffs.len(),
        &diffs[..diffs.len().min(10)]
    );
}

/// The table's rows as the replica keys them (`{"id": n}` → row JSON).
pub async fn table_rows(client: &Client) -> std::collections::BTreeMap<String, Value> {
    client
        .query(
            "SELECT jsonb_build_object('id', id)::text, (to_jsonb(t) - '_livesync_version' - '_livesync_clocks')::text FROM items t",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let key: String = r.get(0);
            let row: String = r.get(1);
            let key: Value = serde_json::from_str(&key).unwrap();
            (key.to_string(), serde_json::from_str(&row).unwrap())
        })
        .collect()
}

/// Commits a marker row into `items` sequenced at commit, and returns the log's
/// position after it: every transaction committed before is at or below it (with
/// the background sequencer, `current_position()` right after other commits may not
/// include them yet). A replica of `items` that reached it has everything before.
pub async fn settle(db: &TestDb) -> i64 {
    static MARKER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(1_000_000);
    let id = MARKER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let client = connect(&format!(
        "{} options='-c livesync.sequencer=commit'",
        db.conninfo()
    ))
    .await;
    client
        .execute("INSERT INTO items VALUES ($1, 0, 'marker', 0)", &[&id])
        .await
        .unwrap();
    current_position(&client).await
}

/// The log's newest position.
pub async fn current_position(client: &Client) -> i64 {
    client
        .query_one("SELECT livesync.current_position()", &[])
        .await
        .unwrap()
        .get(0)
}
