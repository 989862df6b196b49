//! Prometheus metrics (the `metrics` crate, rendered by `GET /metrics`). One function
//! per measurement, so names live in one place.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder (installed once; bridges started by tests share it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("livesync_commit_to_publish_seconds".into()),
                &[
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ],
            )
            .expect("static buckets are valid");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding application):
        // then ours still renders what it is given directly.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

pub fn connections(delta: i64) {
    gauge!("livesync_connections").increment(delta as f64);
}

pub fn subscriptions(delta: i64) {
    gauge!("livesync_subscriptions").increment(delta as f64);
}

pub fn changes_read(n: u64) {
    counter!("livesync_changes_read_total").increment(n);
}

pub fn changes_sent(n: u64) {
    counter!("livesync_changes_sent_total").increment(n);
}

pub fn catch_ups() {
    counter!("livesync_catch_ups_total").increment(1);
}

pub fn catch_up_reads() {
    counter!("livesync_catch_up_reads_total").increment(1);
}

pub fn resyncs() {
    counter!("livesync_resyncs_total").increment(1);
}

pub fn reader_errors() {
    counter!("livesync_reader_errors_total").increment(1);
}

pub fn listener_reconnects() {
    counter!("livesync_listener_reconnects_total").increment(1);
}

/// Commit (sequencing) to hand-over to subscriber queues.
pub fn publish_lag(micros: i64) {
    histogram!("livesync_commit_to_publish_seconds").record(micros.max(0) as f64 / 1e6);
}

pub fn write_outcome(outcome: &'static str) {
    counter!("livesync_writes_total", "outcome" => outcome).increment(1);
}

pub fn error_sent(code: &'static str) {
    counter!("livesync_errors_total", "code" => code).increment(1);
}

pub fn queue_depth(total: usize, max: usize) {
    gauge!("livesync_queue_depth_total").set(total as f64);
    gauge!("livesync_queue_depth_max").set(max as f64);
}

pub fn reader_lag(changes: i64) {
    gauge!("livesync_reader_lag_positions").set(changes as f64);
}

pub fn presence_updates() {
    counter!("livesync_presence_updates_total").increment(1);
}

pub fn presence_coalesced() {
    counter!("livesync_presence_coalesced_total").increment(1);
}

pub fn presence_diffs() {
    counter!("livesync_presence_diffs_total").increment(1);
}

pub fn broadcasts() {
    counter!("livesync_broadcasts_total").increment(1);
}

static REDIS_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A presence store or broker operation failed (Redis down or erroring).
pub fn redis_errors() {
    REDIS_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    counter!("livesync_redis_errors_total").increment(1);
}

/// Presence operations failed so far in this process (for the stats JSON).
pub fn redis_error_count() -> u64 {
    REDIS_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn presence_gauges(rooms: usize, members: usize) {
    gauge!("livesync_presence_rooms").set(rooms as f64);
    gauge!("livesync_presence_members").set(members as f64);
}
