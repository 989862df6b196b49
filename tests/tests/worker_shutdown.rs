//! The sequencer worker ends promptly when told to (SIGTERM: `pg_terminate_backend`,
//! a fast shutdown, `DROP DATABASE ... WITH (FORCE)`), whatever it was doing when
//! the signal came.
//!
//! The signal handler only notes the request and sets the worker's latch. A latch
//! set while a tick runs can be used up inside the tick (a lock wait resets it), so
//! the worker must look at the request itself before it waits again, not rely on
//! the latch: otherwise it sleeps out its whole poll (a second) first.

use livesync_e2e::{wait_until, waits_on_lock, Sequencer, TestDb};
use postgres::Client;
use std::time::{Duration, Instant};

/// How long the worker waits for a wake-up between ticks (`POLL` in worker.rs).
const WORKER_POLL: Duration = Duration::from_secs(1);

fn worker_alive(observer: &mut Client, pid: i32) -> bool {
    observer
        .query_opt("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .unwrap()
        .is_some()
}

#[test]
fn a_worker_terminated_during_a_tick_exits_as_soon_as_the_tick_ends() {
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
    // The lock wait used up the latch the signal set. Releasing the lock lets the
    // tick finish; the worker must then exit, not wait for another wake-up.
    let released = Instant::now();
    holder.batch_execute("COMMIT").unwrap();
    let deadline = released + Duration::from_secs(30);
    while worker_alive(&mut observer, pid) {
        assert!(
            Instant::now() < deadline,
            "the terminated worker never exited"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = released.elapsed();
    assert!(
        took < WORKER_POLL / 2,
        "the worker exited {took:?} after its tick could finish: it waited for a wake-up"
    );
}
