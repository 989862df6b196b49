//! What the bridge's benchmarks (`src/bin/bridge_*.rs`) share: a database with the
//! bridge's roles and tracked tables, the servers under test in a child process of
//! their own (the bridge, or the bare tokio-tungstenite floor), the load generator's
//! WebSocket clients, a plain LISTEN client, and the figures read from `/proc`.
//!
//! The server runs in a child process (the benchmark binary started again with
//! `LIVESYNC_BENCH_SERVE` set): its memory and CPU are its own in `/proc`, and the
//! client and server sides of 10,000 connections each fit under the file descriptor
//! limit. The bridge child runs `livesync_bridge::start` on a multi-threaded tokio
//! runtime with one worker per core, as `livesync-bridge` does.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{server, BenchDb};

/// The role the bridge logs in as: only `livesync_reader` and `livesync_maintainer`,
/// and membership in the application role it runs clients' requests as.
pub const BRIDGE_ROLE: &str = "livesync_bench_bridge";
/// The application role (clients' snapshots and writes; may SELECT the tables).
pub const APP_ROLE: &str = "livesync_bench_app";

/// Bytes the process has allocated and not freed, when the benchmark binary counts
/// them with [`CountingAlloc`] (0 otherwise); the servers report it in `STATS`.
pub static HEAP_LIVE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The system allocator, counting live bytes in [`HEAP_LIVE`] (a benchmark installs
/// it with `#[global_allocator]`).
pub struct CountingAlloc;

// SAFETY: every call is passed to the system allocator unchanged; only counted.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        HEAP_LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

const SERVE_ENV: &str = "LIVESYNC_BENCH_SERVE";
const SERVE_CONFIG_ENV: &str = "LIVESYNC_BENCH_SERVE_CONFIG";

/// A setting from the environment, or its default.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}")),
        Err(_) => default,
    }
}

/// A space-separated list from the environment, or `default`.
pub fn env_list<T: FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split_whitespace()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}"))
        })
        .collect()
}

/// Raises this process's open-file limit to its hard limit; returns the limit now in
/// force. Children inherit it.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
        limit.rlim_cur
    }
}

/// How many connections fit under the fd limit of one process (client side: one fd
/// per connection plus a margin for the database connections and the runtime).
pub fn connections_that_fit(wanted: usize) -> usize {
    let limit = raise_fd_limit() as usize;
    let fit = limit.saturating_sub(200);
    if wanted > fit {
        eprintln!(
            "note: the open-file limit is {limit} (ulimit -Hn); measuring {fit} connections instead of {wanted}"
        );
        fit
    } else {
        wanted
    }
}

// ---------------------------------------------------------------------------------
// The database

/// A benchmark database with livesync, the bridge's role and the application role,
/// and the tables `schema_sql` creates (and tracks), all granted to the app role.
pub struct BridgeDb {
    db: BenchDb,
}

impl BridgeDb {
    /// `needs_worker`: fail unless livesync's sequencer worker serves the database
    /// (latency benchmarks); otherwise go on without it (commits then sequence
    /// themselves at commit).
    pub fn create(name: &'static str, schema_sql: &str, needs_worker: bool) -> BridgeDb {
        // On a crowded shared server (every database with livesync holds a worker):
        // measure with commits sequenced at commit instead, and say so.
        let needs_worker = needs_worker && std::env::var("BENCH_ALLOW_NO_WORKER").is_err();
        let db = BenchDb::create(name);
        let mut admin =
            postgres::Client::connect(&format!("{} dbname=postgres", server()), postgres::NoTls)
                .expect("connect to the server");
        // Roles are cluster-wide: created once, under a lock.
        admin
            .batch_execute("SELECT pg_advisory_lock(812735)")
            .unwrap();
        let roles = admin.batch_execute(&format!(
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
        ));
        admin
            .batch_execute("SELECT pg_advisory_unlock(812735)")
            .unwrap();
        roles.expect("create the bench roles");
        let mut owner = db.connect();
        owner.batch_execute(schema_sql).expect("the bench schema");
        owner
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA livesync TO {APP_ROLE};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {APP_ROLE};"
            ))
            .unwrap();
        // The sequencer worker (livesync.sequencer = auto): started on request.
        let deadline = Instant::now() + Duration::from_secs(if needs_worker { 30 } else { 5 });
        while !owner
            .query_one("SELECT livesync._ensure_sequencer()", &[])
            .unwrap()
            .get::<_, bool>(0)
        {
            if Instant::now() >= deadline {
                let holders: Vec<String> = owner
                    .query(
                        "SELECT datname::text FROM pg_stat_activity WHERE backend_type = 'livesync sequencer'",
                        &[],
                    )
                    .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                    .unwrap_or_default();
                let why = format!(
                    "no sequencer worker started for {name}: is livesync in shared_preload_libraries, and is a background worker free? max_worker_processes is {}; databases holding a livesync worker: {holders:?} (each database with livesync keeps one)",
                    owner
                        .query_one("SHOW max_worker_processes", &[])
                        .map(|r| r.get::<_, String>(0))
                        .unwrap_or_default()
                );
                if needs_worker {
                    panic!("{why}");
                }
                eprintln!("note: {why}; commits sequence themselves at commit, which this benchmark does not depend on");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        BridgeDb { db }
    }

    /// A connection as the owner (the superuser of `BENCH_PG`).
    pub fn connect(&self) -> postgres::Client {
        self.db.connect()
    }

    /// libpq key=value string for the owner.
    pub fn conninfo(&self) -> String {
        self.db.conninfo()
    }

    /// The bridge's connection string: its own role, not the superuser.
    pub fn bridge_url(&self) -> String {
        format!("{} user={BRIDGE_ROLE}", self.db.conninfo())
    }

    /// The log's newest position.
    pub fn current_position(&self) -> i64 {
        self.connect()
            .query_one("SELECT livesync.current_position()", &[])
            .unwrap()
            .get(0)
    }
}

// ---------------------------------------------------------------------------------
// Servers in a child process

/// Bridge settings the benchmarks vary.
#[derive(Clone, Debug)]
pub struct BridgeSettings {
    pub database_url: String,
    pub window_changes: usize,
    pub queue_capacity: Option<usize>,
}

/// The bare tokio-tungstenite broadcast server: the stack's own floor.
#[derive(Clone, Debug)]
pub struct FloorSettings {
    /// The pre-serialised frame every connection receives.
    pub frame: String,
    /// tungstenite's read buffer (the bridge sets 4096).
    pub read_buffer_size: usize,
    /// tungstenite's write buffer threshold: frames are written to the socket when
    /// more than this is buffered, or on flush (the bridge sets 32 KiB).
    pub write_buffer_size: usize,
    /// Frames written per flush at most (the bridge's `WRITE_BATCH` is 64).
    pub batch: u64,
    /// Latency mode: LISTEN on channel `bench` with this connection string and
    /// broadcast one frame per notification, `frame` with `{ID}` replaced by the
    /// payload. Without it, `frame` itself, paced by `T <n>` commands.
    pub notify: Option<String>,
}

impl FloorSettings {
    /// The floor as the bridge (bridge/src/ws/session.rs) configures its
    /// connections: a 4 KiB read buffer, frames gathered up to 32 KiB before a write,
    /// at most 64 frames per flush.
    pub fn new(frame: String) -> FloorSettings {
        FloorSettings {
            frame,
            read_buffer_size: 4096,
            write_buffer_size: 32 << 10,
            batch: 64,
            notify: None,
        }
    }
}

/// A server under test, running in a child process.
pub struct ServerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pub addr: SocketAddr,
    pub pid: u32,
}

impl ServerProcess {
    /// Starts the bridge in a child process; returns once its reader has a position.
    pub fn bridge(settings: &BridgeSettings) -> ServerProcess {
        Self::spawn(
            "bridge",
            json!({
                "database_url": settings.database_url,
                "window_changes": settings.window_changes,
                "queue_capacity": settings.queue_capacity,
            }),
        )
    }

    /// Starts the floor server in a child process.
    pub fn floor(settings: &FloorSettings) -> ServerProcess {
        Self::spawn(
            "floor",
            json!({
                "frame": settings.frame,
                "read_buffer_size": settings.read_buffer_size,
                "write_buffer_size": settings.write_buffer_size,
                "batch": settings.batch,
                "notify": settings.notify,
            }),
        )
    }

    fn spawn(kind: &str, config: Value) -> ServerProcess {
        let exe = std::env::current_exe().expect("the benchmark's own path");
        let mut child = Command::new(exe)
            .env(SERVE_ENV, kind)
            .env(SERVE_CONFIG_ENV, config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server process");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("the server's first line");
        let addr = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("the {kind} server did not start: {line:?}"))
            .parse()
            .expect("an address");
        let pid = child.id();
        ServerProcess {
            child,
            stdin,
            stdout,
            addr,
            pid,
        }
    }

    /// Sends one command line without waiting for an answer.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the server is running");
        writeln!(stdin, "{line}").expect("the server reads its commands");
        stdin.flush().expect("the server reads its commands");
    }

    /// Sends one command line and returns its one-line JSON answer.
    pub fn ask(&mut self, line: &str) -> Value {
        self.send(line);
        let mut answer = String::new();
        self.stdout
            .read_line(&mut answer)
            .expect("the server answers");
        serde_json::from_str(answer.trim()).unwrap_or(Value::Null)
    }

    /// A sending end for a thread of its own (the floor's pacing).
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin.take().expect("the server is running")
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // The server exits when its standard input closes.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Call first in every bridge benchmark's `main`: in the child process started by
/// [`ServerProcess`], runs the server and exits; otherwise returns at once.
pub fn serve_if_asked() {
    let Ok(kind) = std::env::var(SERVE_ENV) else {
        return;
    };
    raise_fd_limit();
    let config: Value =
        serde_json::from_str(&std::env::var(SERVE_CONFIG_ENV).expect("the server's settings"))
            .expect("JSON settings");
    // As `#[tokio::main]` in livesync-bridge: one worker per core.
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match kind.as_str() {
        "bridge" => runtime.block_on(serve_bridge(config)),
        "floor" => runtime.block_on(serve_floor(config)),
        other => panic!("unknown server kind {other}"),
    }
    std::process::exit(0);
}

/// Commands from the parent, one per line; the channel closes when stdin does.
fn commands() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn answer(value: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

async fn serve_bridge(settings: Value) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("BENCH_BRIDGE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut config = livesync_bridge::config::Config::new(
        settings["database_url"].as_str().expect("database_url"),
    );
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.default_role = Some(APP_ROLE.into());
    config.node_name = "bench".into();
    // Every benchmark client comes from 127.0.0.1.
    config.limits.connections_per_ip = 1_000_000;
    if let Some(window) = settings["window_changes"].as_u64() {
        config.limits.window_changes = window as usize;
    }
    if let Some(capacity) = settings["queue_capacity"].as_u64() {
        config.limits.queue_capacity = capacity as usize;
    }
    let bridge = livesync_bridge::start(config)
        .await
        .expect("the bridge starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while bridge.state.hub.head().is_none() {
        assert!(
            Instant::now() < deadline,
            "the bridge's reader never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY {}", bridge.addr);
    let _ = out.flush();
    drop(out);
    let mut commands = commands();
    while let Some(command) = commands.recv().await {
        match command.trim() {
            "STATS" => {
                let stats = bridge.state.hub.stats();
                let metrics = livesync_bridge::metrics::handle().render();
                answer(json!({
                    "head": stats.head,
                    "window_start": stats.window_start,
                    "window_changes": stats.window_changes,
                    "subscriptions": stats.subscriptions,
                    "live": stats.channels.iter().map(|c| c.live).sum::<usize>(),
                    "catch_ups": metric(&metrics, "livesync_catch_ups_total"),
                    "catch_up_reads": metric(&metrics, "livesync_catch_up_reads_total"),
                    "resyncs": metric(&metrics, "livesync_resyncs_total"),
                    "changes_sent": metric(&metrics, "livesync_changes_sent_total"),
                    "connections": bridge.state.connections.count(),
                    "heap": HEAP_LIVE.load(Ordering::Relaxed),
                    "publish_lag_buckets": histogram(&metrics, "livesync_commit_to_publish_seconds"),
                    // Extra measurements an instrumented bridge may record.
                    "bench_metrics": metrics
                        .lines()
                        .filter(|l| l.starts_with("livesync_bench_"))
                        .collect::<Vec<_>>(),
                }));
            }
            _ => answer(Value::Null),
        }
    }
    // Standard input closed: the benchmark is done with this server.
}

/// A histogram's cumulative buckets in Prometheus text: [[upper bound s, count], …].
fn histogram(text: &str, name: &str) -> Value {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<Value> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some(json!([
                if le.is_finite() { le } else { 1e9 },
                count.trim().parse::<f64>().ok()?
            ]))
        })
        .collect();
    Value::Array(buckets)
}

/// The upper bound (ms) of the bucket holding quantile `q` of cumulative buckets
/// `[[upper bound s, count], …]` (as `STATS` reports them); None when empty.
pub fn bucket_quantile_ms(buckets: &Value, q: f64) -> Option<f64> {
    let buckets = buckets.as_array()?;
    let total = buckets.last()?.get(1)?.as_f64()?;
    if total <= 0.0 {
        return None;
    }
    buckets.iter().find_map(|b| {
        let (le, count) = (b.get(0)?.as_f64()?, b.get(1)?.as_f64()?);
        (count >= q * total).then_some(le * 1000.0)
    })
}

/// A counter's value in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// What the floor sends: one frame to everyone, again and again (the fan-out
/// ceiling), or one frame per NOTIFY, numbered by its payload (latency).
enum Frames {
    Same(Utf8Bytes),
    PerNotify(std::sync::RwLock<Vec<Utf8Bytes>>),
}

impl Frames {
    fn get(&self, i: u64) -> Utf8Bytes {
        match self {
            Frames::Same(frame) => frame.clone(),
            Frames::PerNotify(frames) => frames.read().unwrap()[i as usize].clone(),
        }
    }
}

async fn serve_floor(settings: Value) {
    let frame = settings["frame"].as_str().expect("frame").to_string();
    let notify = settings["notify"].as_str().map(str::to_string);
    let frames = Arc::new(match notify {
        None => Frames::Same(frame.clone().into()),
        Some(_) => Frames::PerNotify(Default::default()),
    });
    let setting = |name: &str| settings[name].as_u64().unwrap_or_else(|| panic!("{name}"));
    let config = WebSocketConfig::default()
        .read_buffer_size(setting("read_buffer_size") as usize)
        .write_buffer_size(setting("write_buffer_size") as usize);
    let batch = setting("batch").max(1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    // The broadcast: how many frames every connection is to have been sent.
    let (target_tx, target_rx) = tokio::sync::watch::channel(0u64);
    let target_tx = Arc::new(target_tx);
    let connections = Arc::new(AtomicUsize::new(0));
    {
        let connections = connections.clone();
        let frames = frames.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let frames = frames.clone();
                let mut target = target_rx.clone();
                let connections = connections.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                    else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    // A connection receives what is broadcast after it joined.
                    let mut sent = *target.borrow_and_update();
                    loop {
                        let goal = *target.borrow_and_update();
                        if sent < goal {
                            let n = (goal - sent).min(batch);
                            let mut failed = false;
                            for i in sent..sent + n {
                                if ws.feed(Message::Text(frames.get(i))).await.is_err() {
                                    failed = true;
                                    break;
                                }
                            }
                            sent += n;
                            if failed || ws.flush().await.is_err() {
                                break;
                            }
                            continue;
                        }
                        tokio::select! {
                            changed = target.changed() => if changed.is_err() { break },
                            read = ws.next() => match read {
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                        }
                    }
                    connections.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
    }
    if let Some(conninfo) = notify {
        // One frame per notification on channel `bench`: the template with `{ID}`
        // replaced by the payload.
        let (client, mut connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("the floor's LISTEN connection");
        let frames = frames.clone();
        let target_tx = target_tx.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let Frames::PerNotify(list) = &*frames else {
                        return;
                    };
                    let len = {
                        let mut list = list.write().unwrap();
                        list.push(frame.replace("{ID}", n.payload()).into());
                        list.len() as u64
                    };
                    target_tx.send_replace(len);
                }
            }
        });
        client.batch_execute("LISTEN bench").await.expect("LISTEN");
        // Keep the client (and so the connection) for the server's lifetime.
        std::mem::forget(client);
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {addr}");
        let _ = out.flush();
    }
    let mut commands = commands();
    while let Some(command) = commands.recv().await {
        let command = command.trim();
        if let Some(n) = command.strip_prefix("T ") {
            if let Ok(n) = n.parse::<u64>() {
                target_tx.send_if_modified(|t| {
                    let grew = n > *t;
                    if grew {
                        *t = n;
                    }
                    grew
                });
            }
        } else if command == "STATS" {
            answer(json!({
                "connections": connections.load(Ordering::Relaxed),
                "heap": HEAP_LIVE.load(Ordering::Relaxed),
            }));
        } else {
            answer(Value::Null);
        }
    }
}

// ---------------------------------------------------------------------------------
// Clients

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The load generator's connections: small read buffers (10,000 of them), Nagle off
/// for the few messages they send.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// Opens one WebSocket connection (retrying briefly: a burst of connections can
/// overflow the listen backlog).
pub async fn connect(addr: SocketAddr) -> Ws {
    let mut attempt = 0;
    loop {
        match tokio_tungstenite::connect_async_with_config(
            format!("ws://{addr}/ws"),
            Some(client_config()),
            true,
        )
        .await
        {
            Ok((ws, _)) => return ws,
            Err(e) if attempt < 20 => {
                attempt += 1;
                if attempt == 20 {
                    eprintln!("connect {addr}: {e}; last try");
                }
                tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
            }
            Err(e) => panic!("connect {addr}: {e}"),
        }
    }
}

/// The next text message, skipping others (tungstenite answers pings).
pub async fn next_text(ws: &mut Ws) -> Option<Utf8Bytes> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return Some(text),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Reads until a message of `kind` (with `id` when given) arrives; fails on an error
/// message. Other messages (`changes` of earlier subscriptions) are dropped.
async fn reply(ws: &mut Ws, kind: &str, id: Option<&Value>) -> Value {
    let deadline = Duration::from_secs(60);
    loop {
        let text = tokio::time::timeout(deadline, next_text(ws))
            .await
            .unwrap_or_else(|_| panic!("no {kind} within {deadline:?}"))
            .unwrap_or_else(|| panic!("closed while waiting for {kind}"));
        let message: Value = serde_json::from_str(&text).expect("JSON messages");
        if message["type"] == "error" {
            panic!("the bridge answered with an error: {message}");
        }
        if message["type"] == kind && id.is_none_or(|id| &message["id"] == id) {
            return message;
        }
    }
}

/// Says hello (no token; the bridge runs without auth).
pub async fn hello(ws: &mut Ws, client_id: &str) -> Value {
    ws.send(Message::Text(
        json!({"type": "hello", "client_id": client_id, "protocol": 1})
            .to_string()
            .into(),
    ))
    .await
    .expect("send hello");
    reply(ws, "welcome", None).await
}

/// What a client subscribes to.
#[derive(Clone, Debug)]
pub struct Subscription {
    pub channel: String,
    pub filter: Option<Value>,
    pub since: Option<i64>,
}

impl Subscription {
    pub fn table(table: &str) -> Subscription {
        Subscription {
            channel: format!("table:public.{table}"),
            filter: None,
            since: None,
        }
    }
}

/// Subscribes; returns the position the subscription starts after.
pub async fn subscribe(ws: &mut Ws, id: u64, sub: &Subscription) -> i64 {
    let mut message = json!({"type": "subscribe", "id": id, "channel": sub.channel});
    if let Some(filter) = &sub.filter {
        message["filter"] = filter.clone();
    }
    if let Some(since) = sub.since {
        message["since"] = since.into();
    }
    ws.send(Message::Text(message.to_string().into()))
        .await
        .expect("send subscribe");
    let id = Value::from(id);
    reply(ws, "subscribed", Some(&id)).await["position"]
        .as_i64()
        .expect("subscribed carries a position")
}

/// Opens `n` connections, `parallel` at a time; with `subscription`, each says hello
/// and subscribes (connection `i` as client `bench-i`, subscription id `i`).
pub async fn open_clients(
    addr: SocketAddr,
    n: usize,
    parallel: usize,
    subscription: Option<Arc<dyn Fn(usize) -> Subscription + Send + Sync>>,
) -> Vec<Ws> {
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            let subscription = subscription.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("open");
                let mut ws = connect(addr).await;
                if let Some(subscription) = subscription {
                    hello(&mut ws, &format!("bench-{i}")).await;
                    subscribe(&mut ws, i as u64, &subscription(i)).await;
                }
                ws
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(n);
    for task in tasks {
        clients.push(task.await.expect("a client connects"));
    }
    clients
}

/// Counters shared by many client tasks without contending on one cache line.
pub struct ShardedCounter {
    shards: Vec<PaddedCounter>,
}

#[repr(align(64))]
#[derive(Default)]
struct PaddedCounter(AtomicU64);

impl ShardedCounter {
    pub fn new() -> ShardedCounter {
        ShardedCounter {
            shards: (0..64).map(|_| PaddedCounter::default()).collect(),
        }
    }

    pub fn add(&self, shard: usize, n: u64) {
        self.shards[shard % self.shards.len()]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

impl Default for ShardedCounter {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------
// Reading `changes` messages cheaply (no JSON parse on the hot path)

/// Whether a text message is a `changes` message.
pub fn is_changes(text: &str) -> bool {
    text.starts_with("{\"type\":\"changes\"")
}

/// The integer right after the first `pattern` in `text` (spaces skipped: keys and
/// values are the log's jsonb text, `{"id": 1}`).
pub fn int_after(text: &str, pattern: &str) -> Option<i64> {
    let start = text.find(pattern)? + pattern.len();
    let digits = text[start..].trim_start();
    let end = digits
        .find(|c: char| !(c.is_ascii_digit() || c == '-'))
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A `changes` message's position (its transaction's last position).
pub fn message_position(text: &str) -> Option<i64> {
    int_after(text, "\"position\":")
}

/// A `changes` message's first `committed_at` (when its transaction was sequenced),
/// in microseconds since the Unix epoch.
pub fn committed_at_micros(text: &str) -> Option<i64> {
    let pattern = "\"committed_at\":\"";
    let start = text.find(pattern)? + pattern.len();
    let rest = &text[start..];
    timestamp_micros(&rest[..rest.find('"')?])
}

/// `2026-12-04T10:00:00.123456+00:00` (as `to_json(timestamptz)` writes it) in
/// microseconds since the Unix epoch.
pub fn timestamp_micros(s: &str) -> Option<i64> {
    let num = |range: std::ops::Range<usize>| s.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = s.get(19..)?;
    let mut micros = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        let mut value: i64 = fraction[..digits].parse().ok()?;
        for _ in digits..6 {
            value *= 10;
        }
        for _ in 6..digits {
            value /= 10;
        }
        micros = value;
        rest = &fraction[digits..];
    }
    let offset = match rest.as_bytes().first() {
        Some(sign @ (b'+' | b'-')) => {
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6).and_then(|m| m.parse().ok()).unwrap_or(0);
            let seconds = hours * 3600 + minutes * 60;
            if *sign == b'+' {
                seconds
            } else {
                -seconds
            }
        }
        _ => 0,
    };
    // Days from 1970-01-01 (H. Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset) * 1_000_000 + micros)
}

/// Now, in microseconds since the Unix epoch.
pub fn wall_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// How many changes a `changes` message carries.
pub fn change_count(text: &str) -> usize {
    text.matches("{\"position\":").count()
}

// ---------------------------------------------------------------------------------
// The floor for latency: a plain tokio-postgres LISTEN client

/// A tokio-postgres connection LISTENing on one channel, on a thread of its own,
/// timestamping every notification (integer payloads).
pub struct NotifyListener {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Vec<(i64, Instant)>>>,
}

impl NotifyListener {
    /// Returns once LISTEN is in force.
    pub fn start(conninfo: &str, channel: &str) -> NotifyListener {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let conninfo = conninfo.to_string();
        let channel = channel.to_string();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (client, mut connection) =
                    tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                        .await
                        .expect("the LISTEN connection");
                let heard: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
                let driver = {
                    let heard = heard.clone();
                    tokio::spawn(async move {
                        let mut messages =
                            futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        while let Some(message) = messages.next().await {
                            match message {
                                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                    let at = Instant::now();
                                    if let Ok(payload) = n.payload().parse() {
                                        heard.lock().unwrap().push((payload, at));
                                    }
                                }
                                Ok(_) => {}
                                Err(_) => return,
                            }
                        }
                    })
                };
                client
                    .batch_execute(&format!("LISTEN {channel}"))
                    .await
                    .expect("LISTEN");
                let _ = ready_tx.send(());
                let _ = stop_rx.await;
                drop(client);
                driver.abort();
                let heard = std::mem::take(&mut *heard.lock().unwrap());
                heard
            })
        });
        ready_rx.recv().expect("the listener starts");
        NotifyListener {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Stops listening; returns every (payload, received at).
    pub fn finish(mut self) -> Vec<(i64, Instant)> {
        let _ = self.stop.take().expect("running").send(());
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the listener thread")
    }
}

// ---------------------------------------------------------------------------------
// Figures

/// Sorted samples (ms) with the percentiles the tables print.
pub struct Distribution {
    sorted: Vec<f64>,
}

impl Distribution {
    pub fn new(mut samples: Vec<f64>) -> Distribution {
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Distribution { sorted: samples }
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    pub fn percentile(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return f64::NAN;
        }
        self.sorted[((self.sorted.len() - 1) as f64 * p).round() as usize]
    }

    pub fn p50(&self) -> f64 {
        self.percentile(0.50)
    }

    pub fn p90(&self) -> f64 {
        self.percentile(0.90)
    }

    pub fn p99(&self) -> f64 {
        self.percentile(0.99)
    }

    pub fn max(&self) -> f64 {
        self.sorted.last().copied().unwrap_or(f64::NAN)
    }

    /// `| p50 | p90 | p99 | max |` cells, ms with two decimals.
    pub fn cells(&self) -> String {
        format!(
            "{:.2} | {:.2} | {:.2} | {:.2}",
            self.p50(),
            self.p90(),
            self.p99(),
            self.max()
        )
    }
}

/// Milliseconds from `from` to `to` (0 when `to` is earlier: a notification can
/// arrive before the writer's COMMIT returns).
pub fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// Resident memory of a process (KiB).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// (comm, ppid, utime+stime, cutime+cstime) in clock ticks.
fn proc_stat(pid: u32) -> Option<(String, u32, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((
        comm,
        num(1)? as u32,
        num(11)? + num(12)?,
        num(13)? + num(14)?,
    ))
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    proc_stat(pid).map(|s| s.2 as f64).unwrap_or(0.0) / clock_ticks()
}

/// CPU time of this process, in seconds.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id())
}

/// CPU time of the PostgreSQL server on this machine: every `postgres` process, and
/// the children the postmaster has reaped (backends that exited).
pub fn postgres_cpu_seconds() -> f64 {
    let mut ticks = 0u64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let stats: Vec<(u32, (String, u32, u64, u64))> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .filter(|(_, s)| s.0 == "postgres")
        .collect();
    let pids: std::collections::HashSet<u32> = stats.iter().map(|(p, _)| *p).collect();
    for (_, (_, ppid, own, children)) in &stats {
        ticks += own;
        if !pids.contains(ppid) {
            ticks += children; // the postmaster
        }
    }
    ticks as f64 / clock_ticks()
}

/// CPU time the whole machine has been busy (every core, everything but idle and
/// iowait: processes, interrupts, softirqs), in seconds.
pub fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / clock_ticks()
}

/// CPU use of the server, the clients, PostgreSQL and the whole machine over a
/// measured stretch.
pub struct CpuMeter {
    server_pid: u32,
    started: Instant,
    server: f64,
    clients: f64,
    postgres: f64,
    machine: f64,
}

/// Cores' worth of CPU each used (1.0 = one core busy all along); `machine` counts
/// everything, other processes and the kernel's network work included.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    pub server: f64,
    pub clients: f64,
    pub postgres: f64,
    pub machine: f64,
    pub seconds: f64,
}

impl CpuMeter {
    pub fn start(server_pid: u32) -> CpuMeter {
        CpuMeter {
            server_pid,
            started: Instant::now(),
            server: cpu_seconds(server_pid),
            clients: own_cpu_seconds(),
            postgres: postgres_cpu_seconds(),
            machine: machine_busy_seconds(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let seconds = self.started.elapsed().as_secs_f64();
        CpuUse {
            server: (cpu_seconds(self.server_pid) - self.server) / seconds,
            clients: (own_cpu_seconds() - self.clients) / seconds,
            postgres: (postgres_cpu_seconds() - self.postgres) / seconds,
            machine: (machine_busy_seconds() - self.machine) / seconds,
            seconds,
        }
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------
// Presence (issue 13): the bridge as a presence node, and a relay floor

/// What a presence floor relays: (the sending connection's number, or `u64::MAX` for
/// another node's, and the client's own frame).
type Relay = tokio::sync::broadcast::Sender<(u64, Utf8Bytes)>;

/// Frames a room's relay holds for its slowest member before that member loses the
/// oldest (counted as dropped): as many as the bridge queues for one connection
/// (`queue_capacity`, 1024 by default).
const FLOOR_RELAY_CAPACITY: usize = 1024;

/// The Redis pub/sub channel the floor's nodes share (messages: `node\nroom\nframe`).
const FLOOR_CHANNEL: &str = "livesync_bench_floor";

impl ServerProcess {
    /// Starts the bridge as a presence node: `node_name` (unique among the nodes of a
    /// run), presence in Redis at `redis_url` or in memory; the rest as
    /// [`ServerProcess::bridge`] with its defaults (rate limits, TTL), and its
    /// coalescing window unless `coalesce_ms` is given.
    pub fn presence_bridge(
        database_url: &str,
        node_name: &str,
        redis_url: Option<&str>,
        coalesce_ms: Option<u64>,
    ) -> ServerProcess {
        Self::spawn(
            "presence_bridge",
            json!({
                "database_url": database_url,
                "node_name": node_name,
                "redis_url": redis_url,
                "coalesce_ms": coalesce_ms,
            }),
        )
    }

    /// Starts the presence floor: a bare tokio-tungstenite server (configured as
    /// [`FloorSettings::new`], `TCP_NODELAY` on unless `BENCH_FLOOR_NAGLE` is set in
    /// the environment) that answers `hello` and `join` and relays every
    /// `presence` and `broadcast` frame as it came to the room's other members, no
    /// coalescing. With `redis_addr` (`host:port`) it also PUBLISHes every frame, and
    /// relays the frames other nodes published to its own members.
    pub fn presence_floor(node_name: &str, redis_addr: Option<&str>) -> ServerProcess {
        Self::spawn(
            "presence_floor",
            json!({"node_name": node_name, "redis_addr": redis_addr}),
        )
    }
}

/// Call first in a presence benchmark's `main` (before [`serve_if_asked`]): in a child
/// started by [`ServerProcess::presence_bridge`] or [`ServerProcess::presence_floor`],
/// runs that server and exits; otherwise returns at once.
pub fn serve_presence_if_asked() {
    let Ok(kind) = std::env::var(SERVE_ENV) else {
        return;
    };
    if kind != "presence_bridge" && kind != "presence_floor" {
        return;
    }
    raise_fd_limit();
    let config: Value =
        serde_json::from_str(&std::env::var(SERVE_CONFIG_ENV).expect("the server's settings"))
            .expect("JSON settings");
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    if kind == "presence_bridge" {
        runtime.block_on(serve_presence_bridge(config));
    } else {
        runtime.block_on(serve_presence_floor(config));
    }
    std::process::exit(0);
}

async fn serve_presence_bridge(settings: Value) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("BENCH_BRIDGE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut config = livesync_bridge::config::Config::new(
        settings["database_url"].as_str().expect("database_url"),
    );
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.default_role = Some(APP_ROLE.into());
    config.node_name = settings["node_name"].as_str().expect("node_name").into();
    config.redis_url = settings["redis_url"].as_str().map(str::to_string);
    if let Some(ms) = settings["coalesce_ms"].as_u64() {
        config.presence.coalesce = Duration::from_millis(ms);
    }
    config.limits.connections_per_ip = 1_000_000;
    let bridge = livesync_bridge::start(config)
        .await
        .expect("the bridge starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while bridge.state.hub.head().is_none() {
        assert!(
            Instant::now() < deadline,
            "the bridge's reader never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {}", bridge.addr);
        let _ = out.flush();
    }
    // Figures come from its HTTP endpoints ([`http_get_json`]).
    let mut commands = commands();
    while commands.recv().await.is_some() {
        answer(Value::Null);
    }
}

/// The presence floor's rooms, shared by its connections and its Redis subscriber.
struct FloorRooms {
    node: String,
    rooms: Mutex<std::collections::HashMap<String, Relay>>,
    /// RESP-encoded PUBLISH commands for the publishing connection (with Redis).
    publish: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    /// Frames a member missed because it fell more than the relay's capacity behind.
    dropped: AtomicU64,
    /// Frames written to members.
    relayed: AtomicU64,
    /// Frames received from other nodes through Redis.
    from_redis: AtomicU64,
}

impl FloorRooms {
    fn room(&self, name: &str) -> Relay {
        self.rooms
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| tokio::sync::broadcast::channel(FLOOR_RELAY_CAPACITY).0)
            .clone()
    }
}

/// One RESP command (an array of bulk strings).
pub fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one RESP reply: an array as its elements (bulk strings, or integers and
/// simple strings as their text), anything else as one element, itself. None when
/// the connection ends.
async fn resp_read<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<Vec<Vec<u8>>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    async fn line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<Vec<u8>> {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).await.ok()? == 0 {
            return None;
        }
        line.truncate(line.len().saturating_sub(2));
        Some(line)
    }
    let head = line(reader).await?;
    if head.first() != Some(&b'*') {
        return Some(vec![head]);
    }
    let count: i64 = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
    let mut items = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count.max(0) {
        let item = line(reader).await?;
        if item.first() == Some(&b'$') {
            let len: i64 = std::str::from_utf8(&item[1..]).ok()?.parse().ok()?;
            if len < 0 {
                items.push(Vec::new());
                continue;
            }
            let mut bulk = vec![0; len as usize + 2];
            reader.read_exact(&mut bulk).await.ok()?;
            bulk.truncate(len as usize);
            items.push(bulk);
        } else {
            items.push(item.get(1..).unwrap_or_default().to_vec());
        }
    }
    Some(items)
}

/// A synchronous Redis command on a connection of its own (the benchmark's
/// housekeeping: PING, FLUSHALL); the reply's elements.
pub fn redis_command(port: u16, args: &[&str]) -> std::io::Result<Vec<String>> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    stream.write_all(&resp_command(&args))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = runtime.block_on(async move {
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    })?;
    runtime.block_on(async move {
        let mut reader = tokio::io::BufReader::new(stream);
        let items = resp_read(&mut reader)
            .await
            .ok_or_else(|| std::io::Error::other("no reply"))?;
        Ok(items
            .into_iter()
            .map(|i| String::from_utf8_lossy(&i).into_owned())
            .collect())
    })
}

/// The floor's two Redis connections: one publishing (commands pipelined, replies
/// read and dropped) and one subscribed to [`FLOOR_CHANNEL`], relaying the frames
/// other nodes published to this node's members of their room.
async fn floor_redis(
    addr: &str,
    rooms: Arc<FloorRooms>,
) -> tokio::sync::mpsc::UnboundedSender<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let publisher = TcpStream::connect(addr).await.expect("the floor's Redis");
    publisher.set_nodelay(true).unwrap();
    let (mut replies, mut writer) = publisher.into_split();
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 << 10];
        while matches!(replies.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(command) = rx.recv().await {
            batch.clear();
            batch.extend_from_slice(&command);
            while batch.len() < (256 << 10) {
                match rx.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if writer.write_all(&batch).await.is_err() {
                return;
            }
        }
    });
    let mut subscriber = TcpStream::connect(addr).await.expect("the floor's Redis");
    subscriber.set_nodelay(true).unwrap();
    subscriber
        .write_all(&resp_command(&[b"SUBSCRIBE", FLOOR_CHANNEL.as_bytes()]))
        .await
        .expect("SUBSCRIBE");
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, subscriber);
    resp_read(&mut reader).await.expect("SUBSCRIBE confirmed");
    tokio::spawn(async move {
        while let Some(items) = resp_read(&mut reader).await {
            let [kind, _, payload] = &items[..] else {
                continue;
            };
            if kind.as_slice() != b"message" {
                continue;
            }
            let Ok(payload) = std::str::from_utf8(payload) else {
                continue;
            };
            let mut parts = payload.splitn(3, '\n');
            let (Some(node), Some(room), Some(frame)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if node == rooms.node {
                continue;
            }
            rooms.from_redis.fetch_add(1, Ordering::Relaxed);
            let relay = rooms.rooms.lock().unwrap().get(room).cloned();
            if let Some(relay) = relay {
                let _ = relay.send((u64::MAX, Utf8Bytes::from(frame.to_string())));
            }
        }
    });
    tx
}

async fn serve_presence_floor(settings: Value) {
    let floor = FloorSettings::new(String::new());
    let config = WebSocketConfig::default()
        .read_buffer_size(floor.read_buffer_size)
        .write_buffer_size(floor.write_buffer_size);
    let batch = floor.batch as usize;
    let rooms = Arc::new(FloorRooms {
        node: settings["node_name"]
            .as_str()
            .expect("node_name")
            .to_string(),
        rooms: Mutex::default(),
        publish: std::sync::OnceLock::new(),
        dropped: AtomicU64::new(0),
        relayed: AtomicU64::new(0),
        from_redis: AtomicU64::new(0),
    });
    if let Some(addr) = settings["redis_addr"].as_str() {
        let publish = floor_redis(addr, rooms.clone()).await;
        let _ = rooms.publish.set(publish);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    {
        let rooms = rooms.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            let mut next_id = 0u64;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                next_id += 1;
                let (id, rooms, connections) = (next_id, rooms.clone(), connections.clone());
                tokio::spawn(async move {
                    // Nagle off, unless BENCH_FLOOR_NAGLE (the bridge's sockets, as
                    // axum::serve accepts them, keep it on).
                    let _ = stream.set_nodelay(std::env::var("BENCH_FLOOR_NAGLE").is_err());
                    let Ok(ws) =
                        tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
                    else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::Relaxed);
                    floor_connection(ws, id, rooms, batch).await;
                    connections.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {addr}");
        let _ = out.flush();
    }
    let mut commands = commands();
    while let Some(command) = commands.recv().await {
        if command.trim() == "STATS" {
            answer(json!({
                "connections": connections.load(Ordering::Relaxed),
                "dropped": rooms.dropped.load(Ordering::Relaxed),
                "relayed": rooms.relayed.load(Ordering::Relaxed),
                "from_redis": rooms.from_redis.load(Ordering::Relaxed),
            }));
        } else {
            answer(Value::Null);
        }
    }
}

/// One floor connection: `hello` and `join` answered (one room per connection), then
/// every `presence` or `broadcast` frame relayed as it came to the room's other
/// members (and published, with Redis), and the room's frames written to this one.
async fn floor_connection(
    mut ws: WebSocketStream<TcpStream>,
    id: u64,
    rooms: Arc<FloorRooms>,
    batch: usize,
) {
    let session = format!("{}-{id}", rooms.node);
    // Until it joins.
    let (room, relay) = loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
            Some(Ok(_)) => continue,
        };
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        // `type` first, as the bridge writes its messages (clients look at the start).
        let reply = match message["type"].as_str() {
            Some("hello") => format!(
                r#"{{"type":"welcome","session":{},"node":{}}}"#,
                json!(session),
                json!(rooms.node)
            ),
            Some("join") => {
                let room = message["room"].as_str().unwrap_or_default().to_string();
                let reply = format!(
                    r#"{{"type":"presence_state","id":{},"room":{},"self":{},"members":[]}}"#,
                    message["id"],
                    json!(room),
                    json!(session)
                );
                if ws.send(Message::Text(reply.into())).await.is_err() {
                    return;
                }
                let relay = rooms.room(&room);
                break (room, relay);
            }
            _ => format!(
                r#"{{"type":"error","id":{},"code":"bad_request","message":"the floor answers hello and join, then relays"}}"#,
                message["id"]
            ),
        };
        if ws.send(Message::Text(reply.into())).await.is_err() {
            return;
        }
    };
    let mut inbox = relay.subscribe();
    loop {
        tokio::select! {
            read = ws.next() => {
                let text = match read {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => continue,
                };
                if text.starts_with("{\"type\":\"presence\"")
                    || text.starts_with("{\"type\":\"broadcast\"")
                {
                    if let Some(publish) = rooms.publish.get() {
                        let payload = format!("{}\n{room}\n{}", rooms.node, text.as_str());
                        let _ = publish.send(resp_command(&[
                            b"PUBLISH",
                            FLOOR_CHANNEL.as_bytes(),
                            payload.as_bytes(),
                        ]));
                    }
                    let _ = relay.send((id, text));
                }
            }
            received = inbox.recv() => {
                let mut next = received;
                let mut fed = 0;
                loop {
                    match next {
                        Ok((from, frame)) => {
                            if from != id {
                                if ws.feed(Message::Text(frame)).await.is_err() {
                                    return;
                                }
                                fed += 1;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            rooms.dropped.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                    if fed >= batch {
                        break;
                    }
                    next = match inbox.try_recv() {
                        Ok(item) => Ok(item),
                        Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => {
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n))
                        }
                        Err(_) => break,
                    };
                }
                if fed > 0 {
                    rooms.relayed.fetch_add(fed as u64, Ordering::Relaxed);
                    if ws.flush().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// `GET path` from a server on 127.0.0.1 (the bridge's HTTP endpoints), its JSON
/// body; Null when it cannot be had.
pub fn http_get_json(addr: SocketAddr, path: &str) -> Value {
    use std::io::Read;
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return Value::Null;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return Value::Null;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_as_to_json_writes_them() {
        assert_eq!(timestamp_micros("1970-01-01T00:00:00+00:00"), Some(0));
        assert_eq!(
            timestamp_micros("2026-12-04T10:00:00.123456+00:00"),
            Some(1_796_378_400_123_456)
        );
        assert_eq!(
            timestamp_micros("2024-02-29T23:59:59.5-05:30"),
            Some(1_709_270_999_500_000)
        );
        let message = r#"{"type":"changes","sub":1,"position":7,"changes":[{"position":7,"op":"insert","key":{"id": 1},"delta":{},"version":1,"actor":"a","committed_at":"1970-01-01T00:00:01.000001+00:00","tx":9}]}"#;
        assert_eq!(committed_at_micros(message), Some(1_000_001));
        assert_eq!(message_position(message), Some(7));
        assert_eq!(int_after(message, "\"key\":{\"id\":"), Some(1));
        assert_eq!(change_count(message), 1);
    }
}
