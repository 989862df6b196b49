//! Capture logs only tables `livesync.track` registered, and judges that with the
//! latest state, not with a REPEATABLE READ transaction's snapshot: a session whose
//! snapshot predates a `track` writes the newly tracked table (and its changes are
//! logged); one whose snapshot predates an `untrack` cannot keep logging the table
//! through triggers attached by hand afterwards. Either answer, if stale, would stay
//! cached in the backend after the transaction.

use livesync_e2e::{wait_until, TestDb};
use postgres::error::SqlState;

#[test]
fn a_snapshot_older_than_track_still_captures_the_newly_tracked_table() {
    let db = TestDb::create("registry_track");
    let mut owner = db.connect();
    let mut app = db.connect();
    owner
        .batch_execute("CREATE TABLE t1 (id int PRIMARY KEY, v text); CREATE TABLE other (id int)")
        .unwrap();
    app.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM other")
        .unwrap();
    owner.batch_execute("SELECT livesync.track('t1')").unwrap();
    app.batch_execute("INSERT INTO t1 VALUES (1, 'a'); COMMIT")
        .unwrap();
    app.batch_execute("INSERT INTO t1 VALUES (2, 'b')").unwrap();
    // The worker sequences each commit a tick after it returns (under load, later
    // than this read would come).
    wait_until("both inserts are in the log", || {
        let logged: i64 = owner
            .query_one(
                "SELECT count(*) FROM livesync.changes_since(0) WHERE relation = 't1'::regclass",
                &[],
            )
            .unwrap()
            .get(0);
        logged == 2
    });
}

#[test]
fn a_snapshot_older_than_untrack_cannot_keep_logging_the_table() {
    let db = TestDb::create("registry_untrack");
    let mut owner = db.connect();
    let mut app = db.connect();
    owner
        .batch_execute(
            "CREATE TABLE t2 (id int PRIMARY KEY, v text); CREATE TABLE other (id int);
             SELECT livesync.track('t2')",
        )
        .unwrap();
    app.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM other")
        .unwrap();
    owner
        .batch_execute(
            "SELECT livesync.untrack('t2');
             ALTER TABLE t2 ADD COLUMN _livesync_version bigint NOT NULL DEFAULT 0;
             CREATE TRIGGER by_hand AFTER INSERT ON t2 REFERENCING NEW TABLE AS n
                 FOR EACH STATEMENT EXECUTE FUNCTION livesync._capture()",
        )
        .unwrap();
    let refused = app
        .batch_execute("INSERT INTO t2 VALUES (1, 'x')")
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    app.batch_execute("ROLLBACK").unwrap();
    let refused = app
        .batch_execute("INSERT INTO t2 VALUES (2, 'y')")
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    let logged: i64 = owner
        .query_one(
            "SELECT count(*) FROM livesync.changes_since(0) WHERE relation = 't2'::regclass AND op = 'insert'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 0);
}
