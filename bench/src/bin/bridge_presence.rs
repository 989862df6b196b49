//! Bridge presence (issue 13): cursor updates and broadcasts in one room, through one
//! bridge node (presence in memory, or in Redis) and through two nodes sharing a
//! Redis (half the members on each), beside a floor measured in the same run.
//!
//! A room of `BENCH_ROOM_SIZES` members (100 and 1,000); every member is a WebSocket
//! connection that says hello, joins the room and then, in the **update phase**,
//! sends `presence` updates at `BENCH_UPDATE_HZ` per second (by default 10,000/s in
//! per room: 100/s per member in a room of 100, 10/s in a room of 1,000), each state
//! `{"cursor":{"field":"title","record":"<member>","x":<update number>,"y":..},"t":<send time, µs>}`.
//! The bridge coalesces a room's updates into `presence_diff` messages, each member's
//! latest state only, sent to every member. Every receiver scans each diff for its
//! entries (no JSON parse: the member's number, update number and send time are found
//! by substring) and measures, for the other members' entries:
//!
//! - **state carried → received**: the receipt of each entry minus its `t`, the send
//!   time of the state it carries (the issue's target is on this one: p99 ≤ 50 ms in
//!   a room of 100 at 10,000 updates/s in);
//! - **every update → first message carrying it or a later state**: for each update
//!   sent, the receipt of the first diff holding that update or a later one of the
//!   same member, minus the update's own send time (looked up in the senders' log):
//!   the wait in the coalescing window included;
//! - **coalesced away**: updates a receiver never saw themselves because a later
//!   state of the same member replaced them first, and **not delivered**: updates
//!   whose state (or a later one) had not arrived when the phase's drain ended.
//!
//! Then the **broadcast phase**: members send `broadcast` messages (`event` "cursor",
//! `payload` `{"t":<send time>}`) at `BENCH_BROADCAST_RATE` per second in the room (by
//! default 1,000/s in a room of 100, 100/s in one of 1,000: ~100,000 deliveries/s
//! either way), and every other member's receipt is timed from the send.
//!
//! **The floor**, the same load and the same clients in the same run: a bare
//! tokio-tungstenite server (configured as the bridge configures its connections)
//! that answers `hello` and `join` and relays every `presence` and `broadcast` frame,
//! as it came, to the room's other members: no coalescing, no store, no JSON beyond
//! the join. In the Redis variants the floor also PUBLISHes every frame on one Redis
//! channel and each node relays the frames the other nodes published to its own
//! members (the bridge's path between nodes, without its store). A floor member that
//! falls more than 1,024 frames behind (the bridge's per-connection queue) loses the
//! oldest: counted as not delivered.
//!
//! The servers run in child processes of this binary (see `src/bridge.rs`); the load
//! generator is tokio-tungstenite in this process, each connection with a sending
//! task (on a fixed schedule, members staggered; all senders on a runtime with a
//! thread of its own, so the schedule holds however busy the receivers are) and a
//! receiving task. Redis is a private `redis-server` on a free port (`--save ''
//! --appendonly no`), flushed before each run; never the system one. CPU per side is
//! read from `/proc` over each phase's measured seconds.
//!
//! Environment: `BENCH_PG`, `BENCH_ROOM_SIZES` ("100 1000"), `BENCH_UPDATE_HZ` (per
//! member; default 10,000 / room size), `BENCH_SECONDS` (10: the update phase's
//! measured seconds, after `BENCH_WARMUP`, 1), `BENCH_BROADCAST_RATE` (per room;
//! default 100,000 / size: 1,000 in a room of 100, 100 in one of 1,000),
//! `BENCH_BROADCAST_SECONDS` (4), `BENCH_DRAIN_MS` (1000: how long receivers wait
//! after each phase's last send), `BENCH_VARIANTS` ("memory redis two"),
//! `BENCH_FLOOR` (1: also run the floor), `BENCH_FLOOR_NAGLE` (set: the floor's
//! sockets keep Nagle's algorithm on, as the bridge's do: `axum::serve` does not set
//! `TCP_NODELAY`), `BENCH_COALESCE_MS` (the bridge's default unless set).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use livesync_bench::bridge::{
    connect, connections_that_fit, cpu_seconds, env_list, env_or, hello, http_get_json, int_after,
    machine_busy_seconds, next_text, own_cpu_seconds, redis_command, serve_if_asked,
    serve_presence_if_asked, thousands, wall_micros, BridgeDb, ServerProcess, Ws,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------
// Latency histogram

/// Sub-buckets per power of two: values more than 256 µs apart land in buckets
/// under 1 % wide.
const SUB: u64 = 128;

/// Latencies in µs in log-linear buckets (cheap to record a million a second, and
/// to keep one per receiver), exact maximum.
#[derive(Default, Clone)]
struct Hist {
    counts: Vec<u32>,
    n: u64,
    max: u64,
}

impl Hist {
    fn bucket(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        let e = 63 - u64::from(v.leading_zeros()) - 7; // v >> e in [SUB, 2 SUB)
        (2 * SUB + (e - 1) * SUB + ((v >> e) - SUB)) as usize
    }

    /// The middle of bucket `i`, µs.
    fn value(i: usize) -> f64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i as f64;
        }
        let k = i - 2 * SUB;
        let e = k / SUB + 1;
        let m = k % SUB + SUB;
        ((m << e) + (1 << e) / 2) as f64
    }

    fn record(&mut self, micros: i64) {
        let v = micros.max(0) as u64;
        let i = Self::bucket(v);
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    fn merge(&mut self, other: &Hist) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.max = self.max.max(other.max);
    }

    /// Quantile `q` in ms (the same rank as `Distribution`).
    fn quantile_ms(&self, q: f64) -> f64 {
        if self.n == 0 {
            return f64::NAN;
        }
        let rank = ((self.n - 1) as f64 * q).round() as u64 + 1;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += u64::from(*c);
            if seen >= rank {
                return (Self::value(i) / 1000.0).min(self.max as f64 / 1000.0);
            }
        }
        self.max as f64 / 1000.0
    }

    fn p99(&self) -> f64 {
        self.quantile_ms(0.99)
    }

    /// `p50 | p90 | p99 | max` in ms.
    fn cells(&self) -> String {
        if self.n == 0 {
            return "- | - | - | -".into();
        }
        format!(
            "{:.2} | {:.2} | {:.2} | {:.2}",
            self.quantile_ms(0.5),
            self.quantile_ms(0.9),
            self.quantile_ms(0.99),
            self.max as f64 / 1000.0
        )
    }
}

// ---------------------------------------------------------------------------------
// A private Redis

struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--loglevel", "warning", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        let redis = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_command(port, &["PING"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn flush(&self) {
        redis_command(self.port, &["FLUSHALL"]).expect("FLUSHALL");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// What is run

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    Memory,
    Redis,
    TwoNodes,
}

impl Variant {
    fn parse(name: &str) -> Variant {
        match name {
            "memory" => Variant::Memory,
            "redis" => Variant::Redis,
            "two" => Variant::TwoNodes,
            other => panic!("BENCH_VARIANTS: {other:?} is not memory, redis or two"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Memory => "one node, in memory",
            Variant::Redis => "one node, Redis",
            Variant::TwoNodes => "two nodes, Redis",
        }
    }

    fn nodes(self) -> usize {
        if self == Variant::TwoNodes {
            2
        } else {
            1
        }
    }

    fn redis(self) -> bool {
        self != Variant::Memory
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Server {
    Bridge,
    Floor,
}

impl Server {
    fn label(self) -> &'static str {
        match self {
            Server::Bridge => "bridge",
            Server::Floor => "floor",
        }
    }
}

#[derive(Clone, Debug)]
struct Plan {
    size: usize,
    /// Updates per member per second.
    hz: f64,
    seconds: f64,
    warmup: f64,
    /// Broadcasts per second in the room (all members together).
    broadcast_rate: f64,
    broadcast_seconds: f64,
    drain: Duration,
    coalesce_ms: Option<u64>,
}

/// What the receivers and senders of one run share.
struct Shared {
    size: usize,
    /// Send time (wall µs) of each member's update `seq` (from 1).
    sent_at: Vec<Vec<AtomicI64>>,
    /// The last update number each member sent.
    final_seq: Vec<AtomicU64>,
    /// Measured windows (wall µs): updates sent (or received) in [start, end) count.
    update_window: (AtomicI64, AtomicI64),
    broadcast_window: (AtomicI64, AtomicI64),
    /// Messages received by all clients (to see when the joins have settled).
    received: AtomicU64,
}

impl Shared {
    fn in_window(window: &(AtomicI64, AtomicI64), t: i64) -> bool {
        t >= window.0.load(Ordering::Relaxed) && t < window.1.load(Ordering::Relaxed)
    }
}

/// One receiver's figures.
#[derive(Default)]
struct Received {
    every: Hist,
    carried: Hist,
    broadcast: Hist,
    /// Presence messages (diffs; the floor's relayed frames) received in the window.
    presence_messages: u64,
    /// Other members' entries received in the window.
    entries: u64,
    /// Full `presence_state` messages received after the join (the bridge resends
    /// one to a member whose queue was full).
    states_resent: u64,
    coalesced: u64,
    /// Entries older than one already seen.
    stale: u64,
    /// Per member, the last update number seen.
    last: Vec<u64>,
    broadcast_messages: u64,
    errors: BTreeMap<String, u64>,
    closed: bool,
}

impl Received {
    /// The entries of one message: each `"record":"<member>"`, then its `"x":` (the
    /// update number) and `"t":` (its send time).
    fn entries(&mut self, text: &str, me: usize, now: i64, shared: &Shared, in_window: bool) {
        const RECORD: &str = "\"record\":\"";
        let mut rest = text;
        while let Some(at) = rest.find(RECORD) {
            rest = &rest[at + RECORD.len()..];
            let Some(end) = rest.find('"') else { break };
            let member: usize = rest[..end].parse().unwrap_or(usize::MAX);
            let (Some(seq), Some(t)) = (int_after(rest, "\"x\":"), int_after(rest, "\"t\":"))
            else {
                continue;
            };
            if let Some(after) = rest.find("\"t\":") {
                rest = &rest[after + 4..];
            }
            if member >= shared.size || member == me {
                continue;
            }
            let seq = seq.max(0) as u64;
            let last = self.last[member];
            if seq <= last {
                if seq < last {
                    self.stale += 1;
                }
                continue;
            }
            if in_window {
                self.entries += 1;
            }
            if seq > 0 && Shared::in_window(&shared.update_window, t) {
                self.carried.record(now - t);
            }
            let log = &shared.sent_at[member];
            for k in last + 1..=seq {
                let Some(sent) = log.get(k as usize) else {
                    break;
                };
                let sent = sent.load(Ordering::Acquire);
                if sent > 0 && Shared::in_window(&shared.update_window, sent) {
                    self.every.record(now - sent);
                }
            }
            self.coalesced += seq - last - 1;
            self.last[member] = seq;
        }
    }
}

async fn receive(
    mut stream: SplitStream<Ws>,
    me: usize,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Received {
    let mut r = Received {
        last: vec![0; shared.size],
        ..Default::default()
    };
    loop {
        let message = tokio::select! {
            m = stream.next() => m,
            _ = stop.changed() => break,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                r.closed = true;
                break;
            }
            Some(Ok(_)) => continue,
        };
        let now = wall_micros();
        shared.received.fetch_add(1, Ordering::Relaxed);
        let s = text.as_str();
        let in_update_window = Shared::in_window(&shared.update_window, now);
        if s.starts_with("{\"type\":\"presence_diff\"") {
            if in_update_window {
                r.presence_messages += 1;
            }
            // Joins and leaves come first; the updates last.
            let from = s.find("\"updates\":[").unwrap_or(s.len());
            r.entries(&s[from..], me, now, &shared, in_update_window);
        } else if s.starts_with("{\"type\":\"presence\"") {
            // The floor's relay: the sender's own frame.
            if in_update_window {
                r.presence_messages += 1;
            }
            r.entries(s, me, now, &shared, in_update_window);
        } else if s.starts_with("{\"type\":\"presence_state\"") {
            r.states_resent += 1;
            let from = s.find("\"members\":[").unwrap_or(s.len());
            r.entries(&s[from..], me, now, &shared, in_update_window);
        } else if s.starts_with("{\"type\":\"broadcast\"") {
            if Shared::in_window(&shared.broadcast_window, now) {
                r.broadcast_messages += 1;
            }
            let from = s.find("\"payload\":").unwrap_or(0);
            if let Some(t) = int_after(&s[from..], "\"t\":") {
                if Shared::in_window(&shared.broadcast_window, t) {
                    r.broadcast.record(now - t);
                }
            }
        } else if s.starts_with("{\"type\":\"error\"") {
            let code = serde_json::from_str::<Value>(s)
                .ok()
                .and_then(|v| v["code"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".into());
            *r.errors.entry(code).or_default() += 1;
        }
    }
    r
}

/// What one member sent.
#[derive(Default)]
struct Sent {
    updates_in_window: u64,
    broadcasts_in_window: u64,
}

#[allow(clippy::too_many_arguments)]
async fn send(
    mut sink: SplitSink<Ws, Message>,
    me: usize,
    room: String,
    shared: Arc<Shared>,
    plan: Plan,
    (start1, end1): (tokio::time::Instant, tokio::time::Instant),
    (start2, end2): (tokio::time::Instant, tokio::time::Instant),
) -> (Sent, SplitSink<Ws, Message>) {
    use tokio::time::{interval_at, MissedTickBehavior};
    let mut sent = Sent::default();
    let n = plan.size as f64;
    // Updates, members staggered over one period.
    let period = Duration::from_secs_f64(1.0 / plan.hz);
    let mut ticks = interval_at(start1 + period.mul_f64(me as f64 / n), period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let log = &shared.sent_at[me];
    let mut seq = 0u64;
    loop {
        if ticks.tick().await >= end1 || seq + 1 >= log.len() as u64 {
            break;
        }
        seq += 1;
        let t = wall_micros();
        log[seq as usize].store(t, Ordering::Release);
        shared.final_seq[me].store(seq, Ordering::Release);
        if Shared::in_window(&shared.update_window, t) {
            sent.updates_in_window += 1;
        }
        let text = format!(
            r#"{{"type":"presence","room":"{room}","state":{{"cursor":{{"field":"title","record":"{me}","x":{seq},"y":{}}},"t":{t}}}}}"#,
            (seq * 7) % 600
        );
        if sink.send(Message::Text(text.into())).await.is_err() {
            return (sent, sink);
        }
    }
    // Broadcasts.
    let period = Duration::from_secs_f64(n / plan.broadcast_rate);
    let mut ticks = interval_at(start2 + period.mul_f64(me as f64 / n), period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        if ticks.tick().await >= end2 {
            break;
        }
        let t = wall_micros();
        if Shared::in_window(&shared.broadcast_window, t) {
            sent.broadcasts_in_window += 1;
        }
        let text = format!(
            r#"{{"type":"broadcast","room":"{room}","event":"cursor","payload":{{"t":{t}}}}}"#
        );
        if sink.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
    // The sink goes back to be dropped once the receivers are done.
    (sent, sink)
}

/// Joins `room` with member `i`'s first state; returns once `presence_state` came.
async fn join(ws: &mut Ws, room: &str, i: usize) {
    let message = json!({"type": "join", "id": i, "room": room, "state":
        {"cursor": {"field": "title", "record": i.to_string(), "x": 0, "y": 0}, "t": 0}});
    ws.send(Message::Text(message.to_string().into()))
        .await
        .expect("send join");
    let deadline = Duration::from_secs(60);
    loop {
        let text = tokio::time::timeout(deadline, next_text(ws))
            .await
            .unwrap_or_else(|_| panic!("member {i}: no presence_state within {deadline:?}"))
            .unwrap_or_else(|| panic!("member {i}: closed while joining"));
        if text.starts_with("{\"type\":\"presence_state\"") {
            return;
        }
        if text.starts_with("{\"type\":\"error\"") {
            panic!("member {i}: join refused: {text}");
        }
    }
}

/// CPU use over a stretch: each server, Redis, the clients (this process), the
/// machine; cores' worth.
#[derive(Clone, Copy, Default)]
struct Cpu {
    servers: f64,
    redis: f64,
    clients: f64,
    machine: f64,
}

struct CpuMeter {
    servers: Vec<u32>,
    redis: Option<u32>,
    at: Instant,
    start: (f64, f64, f64, f64),
}

impl CpuMeter {
    fn read(servers: &[u32], redis: Option<u32>) -> (f64, f64, f64, f64) {
        (
            servers.iter().map(|p| cpu_seconds(*p)).sum(),
            redis.map_or(0.0, cpu_seconds),
            own_cpu_seconds(),
            machine_busy_seconds(),
        )
    }

    fn start(servers: Vec<u32>, redis: Option<u32>) -> CpuMeter {
        let start = Self::read(&servers, redis);
        CpuMeter {
            servers,
            redis,
            at: Instant::now(),
            start,
        }
    }

    fn stop(&self) -> Cpu {
        let s = self.at.elapsed().as_secs_f64();
        let now = Self::read(&self.servers, self.redis);
        Cpu {
            servers: (now.0 - self.start.0) / s,
            redis: (now.1 - self.start.1) / s,
            clients: (now.2 - self.start.2) / s,
            machine: (now.3 - self.start.3) / s,
        }
    }
}

/// One run's figures.
struct RunResult {
    variant: Variant,
    server: Server,
    updates_sent: u64,
    broadcasts_sent: u64,
    received: Received,
    /// Sum over receivers of the other members' updates sent (whole phase).
    possible: u64,
    undelivered: u64,
    closed: usize,
    cpu_updates: Cpu,
    cpu_broadcasts: Cpu,
    /// The servers' own counters.
    stats: Vec<Value>,
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

/// `(runtime, senders_runtime)`: the clients' runtime and the senders' own.
fn run(
    (runtime, senders_runtime): (&tokio::runtime::Runtime, &tokio::runtime::Runtime),
    plan: &Plan,
    variant: Variant,
    server: Server,
    database_url: &str,
    redis: Option<&RedisServer>,
    run_no: usize,
) -> RunResult {
    if let Some(redis) = redis {
        redis.flush();
    }
    let n = plan.size;
    let mut nodes: Vec<ServerProcess> = (0..variant.nodes())
        .map(|k| {
            let name = format!("bench{run_no}n{k}");
            match server {
                Server::Bridge => ServerProcess::presence_bridge(
                    database_url,
                    &name,
                    redis.map(RedisServer::url).as_deref(),
                    plan.coalesce_ms,
                ),
                Server::Floor => {
                    ServerProcess::presence_floor(&name, redis.map(RedisServer::addr).as_deref())
                }
            }
        })
        .collect();
    let addrs: Vec<_> = nodes.iter().map(|s| s.addr).collect();
    let room = format!("board:{run_no}");
    let capacity = (plan.hz * (plan.warmup + plan.seconds)).ceil() as usize + 16;
    let shared = Arc::new(Shared {
        size: n,
        sent_at: (0..n)
            .map(|_| (0..capacity).map(|_| AtomicI64::new(0)).collect())
            .collect(),
        final_seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
        update_window: (AtomicI64::new(i64::MAX), AtomicI64::new(i64::MAX)),
        broadcast_window: (AtomicI64::new(i64::MAX), AtomicI64::new(i64::MAX)),
        received: AtomicU64::new(0),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Members join (32 at a time); each starts receiving as soon as it has joined,
    // so the joins' diffs do not pile up.
    let opened = Instant::now();
    let (sinks, receivers) = runtime.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (gate, room, shared, stop) =
                    (gate.clone(), room.clone(), shared.clone(), stop_rx.clone());
                let addr = addrs[i % addrs.len()];
                tokio::spawn(async move {
                    let _permit = gate.acquire().await.expect("open");
                    let mut ws = connect(addr).await;
                    hello(&mut ws, &format!("m{i}")).await;
                    join(&mut ws, &room, i).await;
                    let (sink, stream) = ws.split();
                    (sink, tokio::spawn(receive(stream, i, shared, stop)))
                })
            })
            .collect();
        let mut sinks = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for task in tasks {
            let (sink, receiver) = task.await.expect("a member joins");
            sinks.push(sink);
            receivers.push(receiver);
        }
        (sinks, receivers)
    });
    // Until the joins' diffs have settled: nothing received for 300 ms (at most 30 s).
    let settle = Instant::now() + Duration::from_secs(30);
    let mut seen = shared.received.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = shared.received.load(Ordering::Relaxed);
        if now == seen || Instant::now() > settle {
            break;
        }
        seen = now;
    }
    eprintln!(
        "  {n} members joined in {:.1} s ({} messages while joining)",
        opened.elapsed().as_secs_f64(),
        thousands(seen)
    );

    // The schedule.
    let base = Instant::now();
    let base_wall = wall_micros();
    let wall = |t: Instant| base_wall + t.duration_since(base).as_micros() as i64;
    let start1 = base + Duration::from_millis(200);
    let window1 = (
        start1 + Duration::from_secs_f64(plan.warmup),
        start1 + Duration::from_secs_f64(plan.warmup + plan.seconds),
    );
    let start2 = window1.1 + plan.drain;
    let window2 = (
        start2 + Duration::from_secs_f64(plan.warmup),
        start2 + Duration::from_secs_f64(plan.warmup + plan.broadcast_seconds),
    );
    shared
        .update_window
        .0
        .store(wall(window1.0), Ordering::Relaxed);
    shared
        .update_window
        .1
        .store(wall(window1.1), Ordering::Relaxed);
    shared
        .broadcast_window
        .0
        .store(wall(window2.0), Ordering::Relaxed);
    shared
        .broadcast_window
        .1
        .store(wall(window2.1), Ordering::Relaxed);
    let tokio_time = |t: Instant| tokio::time::Instant::from_std(t);
    let senders: Vec<_> = sinks
        .into_iter()
        .enumerate()
        .map(|(i, sink)| {
            senders_runtime.spawn(send(
                sink,
                i,
                room.clone(),
                shared.clone(),
                plan.clone(),
                (tokio_time(start1), tokio_time(window1.1)),
                (tokio_time(start2), tokio_time(window2.1)),
            ))
        })
        .collect();
    let pids: Vec<u32> = nodes.iter().map(|s| s.pid).collect();
    let redis_pid = redis.map(RedisServer::pid);
    sleep_until(window1.0);
    let meter = CpuMeter::start(pids.clone(), redis_pid);
    sleep_until(window1.1);
    let cpu_updates = meter.stop();
    sleep_until(window2.0);
    let meter = CpuMeter::start(pids, redis_pid);
    sleep_until(window2.1);
    let cpu_broadcasts = meter.stop();
    sleep_until(window2.1 + plan.drain);
    let _ = stop_tx.send(true);

    let mut received = Received::default();
    let mut possible = 0u64;
    let mut undelivered = 0u64;
    let mut closed = 0usize;
    let final_seq: Vec<u64> = shared
        .final_seq
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .collect();
    let total_sent: u64 = final_seq.iter().sum();
    runtime.block_on(async {
        for (me, r) in receivers.into_iter().enumerate() {
            let r = r.await.expect("a receiver");
            let mine = final_seq[me];
            possible += total_sent - mine;
            undelivered += (0..n)
                .filter(|&s| s != me)
                .map(|s| final_seq[s].saturating_sub(r.last[s]))
                .sum::<u64>();
            closed += usize::from(r.closed);
            received.every.merge(&r.every);
            received.carried.merge(&r.carried);
            received.broadcast.merge(&r.broadcast);
            received.presence_messages += r.presence_messages;
            received.entries += r.entries;
            received.states_resent += r.states_resent;
            received.coalesced += r.coalesced;
            received.stale += r.stale;
            received.broadcast_messages += r.broadcast_messages;
            for (code, count) in r.errors {
                *received.errors.entry(code).or_default() += count;
            }
        }
    });
    // The senders are done (their last send was due before the drain): their counts.
    let (mut updates_sent, mut broadcasts_sent) = (0, 0);
    let sinks = runtime.block_on(async {
        let mut sinks = Vec::with_capacity(n);
        for s in senders {
            let (sent, sink) = s.await.expect("a sender");
            updates_sent += sent.updates_in_window;
            broadcasts_sent += sent.broadcasts_in_window;
            sinks.push(sink);
        }
        sinks
    });
    let stats = nodes
        .iter_mut()
        .map(|node| match server {
            Server::Bridge => http_get_json(node.addr, "/api/v1/sync/stats")["presence"].clone(),
            Server::Floor => node.ask("STATS"),
        })
        .collect();
    // The members leave, then the servers stop.
    runtime.block_on(async move { drop(sinks) });
    drop(nodes);
    RunResult {
        variant,
        server,
        updates_sent,
        broadcasts_sent,
        received,
        possible,
        undelivered,
        closed,
        cpu_updates,
        cpu_broadcasts,
        stats,
    }
}

fn main() {
    serve_presence_if_asked();
    serve_if_asked();
    let sizes: Vec<usize> = env_list("BENCH_ROOM_SIZES", "100 1000");
    let variants: Vec<Variant> = env_list::<String>("BENCH_VARIANTS", "memory redis two")
        .iter()
        .map(|v| Variant::parse(v))
        .collect();
    let with_floor = env_or("BENCH_FLOOR", 1) != 0;
    let seconds: f64 = env_or("BENCH_SECONDS", 10.0);
    let warmup: f64 = env_or("BENCH_WARMUP", 1.0);
    let broadcast_seconds: f64 = env_or("BENCH_BROADCAST_SECONDS", 4.0);
    let drain = Duration::from_millis(env_or("BENCH_DRAIN_MS", 1000));
    let coalesce_ms: Option<u64> = std::env::var("BENCH_COALESCE_MS")
        .ok()
        .map(|v| v.trim().parse().expect("BENCH_COALESCE_MS"));
    let fixed_hz: Option<f64> = std::env::var("BENCH_UPDATE_HZ")
        .ok()
        .map(|v| v.trim().parse().expect("BENCH_UPDATE_HZ"));
    let fixed_broadcasts: Option<f64> = std::env::var("BENCH_BROADCAST_RATE")
        .ok()
        .map(|v| v.trim().parse().expect("BENCH_BROADCAST_RATE"));
    let coalesce = coalesce_ms.map_or_else(
        || livesync_bridge::config::PresenceConfig::default().coalesce,
        Duration::from_millis,
    );

    let db = BridgeDb::create(
        "livesync_bench_bridge_presence",
        "CREATE TABLE notes (id int PRIMARY KEY, title text);
         SELECT livesync.track('notes');",
        false,
    );
    let redis = variants.iter().any(|v| v.redis()).then(RedisServer::start);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The senders on a thread of their own: the schedule holds however busy the
    // receivers are (they share the machine's cores, not a runtime's workers).
    let senders_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("senders")
        .enable_all()
        .build()
        .unwrap();
    println!(
        "bridge presence (issue 13): coalescing {} ms, broadcasts limited to {}/s per connection (the bridge's defaults unless BENCH_COALESCE_MS); {} s per phase after {} s of warm-up, {} ms drain; load average before: {}",
        coalesce.as_millis(),
        livesync_bridge::config::PresenceConfig::default().broadcasts_per_second,
        seconds,
        warmup,
        drain.as_millis(),
        load_average(),
    );
    let mut run_no = 0;
    let mut targets = Vec::new();
    for &size in &sizes {
        let size = connections_that_fit(size);
        let plan = Plan {
            size,
            hz: fixed_hz.unwrap_or(10_000.0 / size as f64),
            seconds,
            warmup,
            broadcast_rate: fixed_broadcasts
                .unwrap_or_else(|| (100_000.0 / size as f64).round().max(1.0)),
            broadcast_seconds,
            drain,
            coalesce_ms,
        };
        let mut results = Vec::new();
        for &variant in &variants {
            let servers: &[Server] = if with_floor {
                &[Server::Bridge, Server::Floor]
            } else {
                &[Server::Bridge]
            };
            for &server in servers {
                run_no += 1;
                eprintln!(
                    "room of {size}, {}, {} (load average {})",
                    variant.label(),
                    server.label(),
                    load_average()
                );
                let r = run(
                    (&runtime, &senders_runtime),
                    &plan,
                    variant,
                    server,
                    &db.bridge_url(),
                    redis.as_ref().filter(|_| variant.redis()),
                    run_no,
                );
                results.push(r);
            }
        }
        print_size(&plan, &results, &mut targets);
    }
    println!();
    for line in targets {
        println!("{line}");
    }
    println!("load average after: {}", load_average());
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn print_size(plan: &Plan, results: &[RunResult], targets: &mut Vec<String>) {
    let n = plan.size;
    let offered = plan.hz * n as f64;
    println!();
    println!(
        "### Room of {n} members: {} updates/s per member, {} updates/s in offered; broadcasts {}/s in the room ({} deliveries/s offered)",
        plan.hz,
        thousands(offered.round() as u64),
        plan.broadcast_rate,
        thousands((plan.broadcast_rate * (n - 1) as f64).round() as u64),
    );
    println!();
    println!("Floor: a bare tokio-tungstenite server relaying every frame as it came to the room's other members (no coalescing); Redis variants: it also PUBLISHes every frame, each node relaying the other nodes' frames to its members.");
    println!();
    println!("Updates (the update phase's {} s): in/s sent by the members; out/s: presence messages (diffs; the floor's relayed frames) and other members' entries received by all members; superseded (the bridge: coalesced away; the floor: dropped) and not delivered by the end of the drain: of every update each other member could have seen.", plan.seconds);
    println!();
    println!("| variant | server | updates in/s | messages out/s | entries out/s | superseded | not delivered | presence_state resent | errors | closed |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let pct = |x: u64| {
            if r.possible == 0 {
                "-".to_string()
            } else {
                format!("{:.1} %", 100.0 * x as f64 / r.possible as f64)
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.variant.label(),
            r.server.label(),
            thousands((r.updates_sent as f64 / plan.seconds).round() as u64),
            thousands((r.received.presence_messages as f64 / plan.seconds).round() as u64),
            thousands((r.received.entries as f64 / plan.seconds).round() as u64),
            pct(r.received.coalesced),
            pct(r.undelivered),
            r.received.states_resent,
            errors(&r.received.errors),
            r.closed,
        );
    }
    println!();
    println!("Latency of updates, ms (every receiver, other members' updates sent in the measured seconds):");
    println!();
    println!("| variant | server | measure | samples | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| {} | {} | state carried -> received | {} | {} |",
            r.variant.label(),
            r.server.label(),
            thousands(r.received.carried.n),
            r.received.carried.cells()
        );
        println!(
            "| {} | {} | every update sent -> first message with it or a later state | {} | {} |",
            r.variant.label(),
            r.server.label(),
            thousands(r.received.every.n),
            r.received.every.cells()
        );
    }
    println!();
    println!("Broadcasts (the broadcast phase's {} s; delivered: receipts by the end of the drain of the broadcasts sent in the measured seconds, of sent x {} other members):", plan.broadcast_seconds, n - 1);
    println!();
    println!("| variant | server | broadcasts in/s | broadcasts out/s | delivered | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let expected = r.broadcasts_sent * (n as u64 - 1);
        println!(
            "| {} | {} | {} | {} | {:.2} % of {} | {} |",
            r.variant.label(),
            r.server.label(),
            thousands((r.broadcasts_sent as f64 / plan.broadcast_seconds).round() as u64),
            thousands(
                (r.received.broadcast_messages as f64 / plan.broadcast_seconds).round() as u64
            ),
            100.0 * r.received.broadcast.n as f64 / expected.max(1) as f64,
            thousands(expected),
            r.received.broadcast.cells()
        );
    }
    println!();
    println!("CPU, cores (2 here), over each phase's measured seconds:");
    println!();
    println!("| variant | server | phase | server(s) | clients | redis | whole machine |");
    println!("|---|---|---|---|---|---|---|");
    for r in results {
        for (phase, c) in [("updates", r.cpu_updates), ("broadcasts", r.cpu_broadcasts)] {
            println!(
                "| {} | {} | {phase} | {:.2} | {:.2} | {} | {:.2} |",
                r.variant.label(),
                r.server.label(),
                c.servers,
                c.clients,
                if r.variant.redis() {
                    format!("{:.2}", c.redis)
                } else {
                    "-".into()
                },
                c.machine
            );
        }
    }
    println!();
    for r in results {
        for (k, s) in r.stats.iter().enumerate() {
            println!(
                "{}, {}, node {k}: {}",
                r.variant.label(),
                r.server.label(),
                s
            );
        }
    }
    // Ratios to the floor, and the target.
    for r in results.iter().filter(|r| r.server == Server::Bridge) {
        if let Some(f) = results
            .iter()
            .find(|f| f.server == Server::Floor && f.variant == r.variant)
        {
            println!(
                "{}, bridge / floor: state carried p99 {:.2}x, every update p99 {:.2}x, broadcast p99 {:.2}x; server CPU in the update phase {:.2}x",
                r.variant.label(),
                r.received.carried.p99() / f.received.carried.p99(),
                r.received.every.p99() / f.received.every.p99(),
                r.received.broadcast.p99() / f.received.broadcast.p99(),
                r.cpu_updates.servers / f.cpu_updates.servers,
            );
        }
        let achieved = r.updates_sent as f64 / plan.seconds;
        let undelivered = if r.possible == 0 {
            1.0
        } else {
            r.undelivered as f64 / r.possible as f64
        };
        let load_ok = offered >= 9_999.0 && achieved >= 0.95 * offered;
        let met = load_ok && r.received.carried.p99() <= 50.0 && undelivered <= 0.001;
        targets.push(format!(
            "target (issue 13): a {n}-member room absorbing {}/s in ({} sent), p99 <= 50 ms send -> coalesced diff, {}: {} (p99 state carried {:.2} ms; every update -> first diff with it or later {:.2} ms; not delivered {:.3} %){}",
            thousands(offered.round() as u64),
            thousands(achieved.round() as u64),
            r.variant.label(),
            if met { "met" } else { "NOT met" },
            r.received.carried.p99(),
            r.received.every.p99(),
            undelivered * 100.0,
            if n == 100 { "" } else { " [the target is set for 100 members]" },
        ));
    }
}

fn errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    errors
        .iter()
        .map(|(code, count)| format!("{code} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
