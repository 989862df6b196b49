//! The bridge binary as a process of a test's own: started with environment variables
//! (as an operator would), on a free port, killed (SIGKILL) on drop. Its stderr goes to
//! a file in the temp directory, named in failure messages.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{TestDb, APP_ROLE, PATIENCE};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct BridgeProcess {
    pub port: u16,
    pub addr: SocketAddr,
    /// `LIVESYNC_NODE_NAME`.
    pub node: String,
    /// Where its stderr goes.
    pub log: PathBuf,
    child: Option<Child>,
}

impl BridgeProcess {
    /// Starts the binary for `db` as node `node` with `env` on top of the basics
    /// (database, listen address, default role, node name), and waits for `/ready`.
    pub async fn start(db: &TestDb, node: &str, env: &[(&str, String)]) -> BridgeProcess {
        let port = free_port();
        let log = std::env::temp_dir().join(format!(
            "livesync-ptest-{}-{}-{node}-{port}.log",
            db.name,
            std::process::id()
        ));
        let stderr = std::fs::File::create(&log).expect("a log file for the bridge");
        let mut command = Command::new(env!("CARGO_BIN_EXE_livesync-bridge"));
        command
            .env_remove("REDIS_URL")
            .env_remove("LIVESYNC_CONFIG")
            .env_remove("LIVESYNC_JWT_SECRET")
            .env_remove("LIVESYNC_JWT_PUBLIC_KEY")
            .env("DATABASE_URL", db.bridge_url())
            .env("LIVESYNC_LISTEN", format!("127.0.0.1:{port}"))
            .env("LIVESYNC_DEFAULT_ROLE", APP_ROLE)
            .env("LIVESYNC_NODE_NAME", node)
            .env("LIVESYNC_POLL_INTERVAL_MS", "200")
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("the bridge binary starts");
        let mut bridge = BridgeProcess {
            port,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            node: node.to_string(),
            log,
            child: Some(child),
        };
        bridge.wait_ready().await;
        bridge
    }

    /// Waits until `/ready` answers 200 (fails if the process exits first).
    pub async fn wait_ready(&mut self) {
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "bridge {} exited with {status} before it was ready; its log: {}",
                        self.node,
                        self.log_text()
                    );
                }
            }
            if let Ok(r) = http
                .get(format!("http://{}/ready", self.addr))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "bridge {} never became ready; its log: {}",
                self.node,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: no goodbye to clients, nothing cleaned up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id while it runs (to SIGSTOP/SIGCONT it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GET `path`: status and JSON body.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.base()))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.node));
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// GET /metrics as text.
    pub async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(format!("{}/metrics", self.base()))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .unwrap()
    }

    /// The last part of its stderr (for failure messages).
    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        format!("{} ...\n{}", self.log.display(), &text[start..])
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
