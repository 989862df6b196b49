//! Commit order survives a crash between commit and tick: transactions that
//! committed while no tick could run (a session held the sequencer's lock), then a
//! server crash, are sequenced after recovery in the order they committed, because
//! each carries its commit sequence in its own WAL-logged log row.
//!
//! Alone in its test binary on purpose: cargo runs test binaries one after another,
//! so crashing the server here cannot disturb the other tests.

use livesync_e2e::{
    crash_and_restart_server, current_position, lower_xid_commits_later, wait_until, Sequencer,
    TestDb, TWO_WRITERS_TABLE,
};
use postgres::Client;

#[test]
fn transactions_committed_before_a_crash_are_sequenced_in_commit_order_after_it() {
    const ROUNDS: i32 = 20;
    let db = TestDb::create("crash_order");
    db.wait_for_worker();
    let mut admin = db.connect();
    admin.batch_execute(TWO_WRITERS_TABLE).unwrap();
    let start = current_position(&mut admin);
    let mut blocker = db.connect();
    blocker
        .batch_execute("BEGIN; LOCK TABLE livesync.batches IN SHARE ROW EXCLUSIVE MODE")
        .unwrap();
    let mut s1 = db.connect_with(Sequencer::Auto);
    let mut s2 = db.connect_with(Sequencer::Auto);
    for round in 1..=ROUNDS {
        lower_xid_commits_later(&mut s1, &mut s2, round);
    }
    // Nothing was sequenced: the worker's tick waits for the blocker's lock.
    assert_eq!(current_position(&mut admin), start);
    drop((s1, s2, blocker, admin));

    crash_and_restart_server();
    let mut client: Option<Client> = None;
    wait_until("the server accepts connections again", || {
        client = std::panic::catch_unwind(|| db.connect()).ok();
        client.is_some()
    });
    let mut client = client.unwrap();
    // The first reader starts the worker, whose first tick sequences them all.
    wait_until("the committed updates are sequenced", || {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM livesync.changes_since($1, 100000)",
                &[&start],
            )
            .unwrap()
            .get(0);
        n == 2 * ROUNDS as i64
    });
    let rows = client
        .query(
            "SELECT delta::text FROM livesync.changes_since($1, 100000) ORDER BY position",
            &[&start],
        )
        .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let delta: String = row.get(0);
        let round = i as i32 / 2 + 1;
        let column = if i % 2 == 0 { "a" } else { "b" };
        let expected = format!(
            r#"{{"{column}": {{"new": {round}, "old": {}}}}}"#,
            round - 1
        );
        assert_eq!(delta, expected, "change {i} after recovery");
    }
}
