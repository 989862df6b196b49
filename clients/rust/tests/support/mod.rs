//! Test harness: a database of each test's own (`livesync_rc_<name>`) with livesync,
//! the roles and grants the bridge needs (the minimal SQL, copied from the bridge's
//! tests), and the bridge binary as a process on a port of the test's choosing.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

pub const BRIDGE_ROLE: &str = "livesync_rc_bridge";
pub const APP_ROLE: &str = "livesync_rc_app";
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn server() -> String {
    std::env::var("LIVESYNC_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
}

pub async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e} (is PostgreSQL running?)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database with livesync and `items (id int PRIMARY KEY, title text, score int)`, tracked.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn create(name: &str) -> TestDb {
        let name = format!("livesync_rc_{name}");
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
            .expect("CREATE EXTENSION livesync (is the extension installed?)");
        // Roles are cluster-wide: created under a lock by whichever test is first.
        admin
            .batch_execute("SELECT pg_advisory_lock(812735)")
            .await
            .unwrap();
        let created = admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                     IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{BRIDGE_ROLE}') THEN
                         CREATE ROLE {BRIDGE_ROLE} LOGIN;
                     END IF;
                     IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                         CREATE ROLE {APP_ROLE} NOLOGIN;
                     END IF;
                 END $$;
                 GRANT livesync_reader, livesync_maintainer TO {BRIDGE_ROLE};
                 GRANT {APP_ROLE} TO {BRIDGE_ROLE};"
            ))
            .await;
        admin
            .batch_execute("SELECT pg_advisory_unlock(812735)")
            .await
            .unwrap();
        created.unwrap();
        owner
            .batch_execute(&format!(
                "CREATE TABLE items (id int PRIMARY KEY, title text, score int);
                 SELECT livesync.track('items');
                 GRANT USAGE ON SCHEMA livesync TO {APP_ROLE};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON items TO {APP_ROLE};"
            ))
            .await
            .unwrap();
        db
    }

    pub async fn connect(&self) -> Client {
        connect(&self.conninfo()).await
    }

    pub fn conninfo(&self) -> String {
        format!("{} dbname={}", server(), self.name)
    }

    pub fn bridge_url(&self) -> String {
        let base = server().replace("user=postgres", "");
        format!("{base} user={BRIDGE_ROLE} dbname={}", self.name)
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The bridge binary: `LIVESYNC_BRIDGE_BIN`, else built (once) into this build's
/// target directory with the cargo running these tests.
pub fn bridge_bin() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    if let Ok(p) = std::env::var("LIVESYNC_BRIDGE_BIN") {
        return p.into();
    }
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    // target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let target_dir = profile_dir.parent().unwrap();
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "livesync-bridge",
            "--manifest-path",
            manifest,
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        .status()
        .expect("cargo build -p livesync-bridge");
    assert!(status.success(), "building the bridge failed");
    let bin = profile_dir.join("livesync-bridge");
    *built = Some(bin.clone());
    bin
}

/// The bridge binary running for a database, killed (SIGKILL) on drop.
pub struct Bridge {
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Bridge {
    pub async fn start(db: &TestDb, port: u16) -> Bridge {
        let log = std::env::temp_dir().join(format!("livesync-rc-{}-{port}.log", db.name));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = Command::new(bridge_bin())
            .env_remove("REDIS_URL")
            .env_remove("LIVESYNC_CONFIG")
            .env_remove("LIVESYNC_JWT_SECRET")
            .env_remove("LIVESYNC_JWT_PUBLIC_KEY")
            .env("DATABASE_URL", db.bridge_url())
            .env("LIVESYNC_LISTEN", format!("127.0.0.1:{port}"))
            .env("LIVESYNC_DEFAULT_ROLE", APP_ROLE)
            .env("LIVESYNC_NODE_NAME", format!("rc-{port}"))
            .env("LIVESYNC_POLL_INTERVAL_MS", "200")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the bridge binary starts");
        let mut bridge = Bridge {
            port,
            log,
            child: Some(child),
        };
        bridge.wait_ready().await;
        bridge
    }

    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the bridge exited with {status}: {}", self.log_text());
            }
            if http_status(self.port, "/ready") == Some(200) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bridge never became ready: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET over plain HTTP/1.0 (no HTTP client dependency for one probe).
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Polls `f` until it returns Some, or fails after PATIENCE.
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed on drop, so a failing test leaves nothing running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
