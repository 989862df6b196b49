//! The sequencer worker ends promptly when told to (SIGTERM: `pg_terminate_backend`,
//! a fast shutdown, `DROP DATABASE ... WITH (FORCE)`), whatever it was doing when
//! the signal came: even waiting for a heavyweight lock in the middle of a tick,
//! where a handler that only noted the request would leave it until the lock came
//! free (it uses Postgres's own handler, whose request a lock wait acts on).

use livesync_e2e::{changes_since, wait_until, waits_on_lock, Sequencer, TestDb};
use postgres::Client;

fn worker_alive(observer: &mut Client, pid: i32) -> bool {
    observer
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .unwrap()
        .is_some()
}

#[test]
fn a_worker_terminated_while_its_tick_waits_for_a_lock_exits_at_once() {
    let db = TestDb::create("worker_shutdown");
    db.wait_for_worker();
    let pid = db.worker_pid().expect("a worker runs");
    let mut observer = db.connect();
    observer
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); SELECT livesync.track('t');")
        .unwrap();

    // Hold the sequencer lock, so the worker's next tick waits for it.
    let mut holder = db.connect();
    holder
        .batch_execute("BEGIN; LOCK TABLE livesync.batches IN EXCLUSIVE MODE")
        .unwrap();
    // A commit handed to the worker wakes it for a tick.
    db.connect_with(Sequencer::Auto)
        .batch_execute("INSERT INTO t VALUES (1)")
        .unwrap();
    wait_until("the worker's tick waits for the sequencer lock", || {
        waits_on_lock(&mut observer, pid)
    });

    let terminated: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(terminated);
    // Gone while the lock is still held (wait_until fails the test after 30 s).
    wait_until(
        "the terminated worker exits while its tick waits for a lock",
        || !worker_alive(&mut observer, pid),
    );
    holder.batch_execute("COMMIT").unwrap();
    // Nothing is lost: the insert the worker was woken for gets its position (from
    // the worker the postmaster starts again).
    wait_until("the insert is sequenced after the worker's exit", || {
        !changes_since(&mut observer, 0, 100).is_empty()
    });
}
