//! Filter columns reach every backend, and at a clean cut: `set_filter_columns` in
//! one session changes what a writer that already cached the table logs from its
//! next statement on; it waits for transactions writing the table, and writers that
//! come after it wait for it, so every update committed before it has four
//! elements and every one committed after it five.

use livesync_e2e::{wait_until, waits_on_lock, Sequencer, TestDb};
use postgres::Client;
use serde_json::{json, Value};

fn setup(name: &str) -> TestDb {
    let db = TestDb::create(name);
    db.connect()
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, project int, v text);
             SELECT livesync.track('items');
             INSERT INTO items SELECT g, g * 10, 'v' FROM generate_series(1, 3) g",
        )
        .unwrap();
    db
}

fn position(client: &mut Client) -> i64 {
    client
        .query_one("SELECT livesync.current_position()", &[])
        .unwrap()
        .get(0)
}

/// The update entries logged after `after`, in position order, versions left out.
fn updates_after(client: &mut Client, after: i64) -> Vec<Value> {
    client
        .query(
            "SELECT e.change - 3 FROM livesync.change_runs($1) AS r
             CROSS JOIN LATERAL jsonb_array_elements(r.entries) WITH ORDINALITY AS e(change, n)
             WHERE r.op = 'u' ORDER BY r.first_position + e.n",
            &[&after],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn pid(client: &mut Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

#[test]
fn a_declaration_reaches_a_writer_that_cached_the_table() {
    let db = setup("filter_cached");
    let mut owner = db.connect_with(Sequencer::Commit);
    let mut app = db.connect_with(Sequencer::Commit);
    let p0 = position(&mut owner);
    app.batch_execute("UPDATE items SET v = 'a' WHERE id = 1")
        .unwrap();
    owner
        .batch_execute("SELECT livesync.set_filter_columns('items', '{project}')")
        .unwrap();
    app.batch_execute("UPDATE items SET v = 'b' WHERE id = 1")
        .unwrap();
    owner
        .batch_execute("SELECT livesync.set_filter_columns('items', '{}')")
        .unwrap();
    app.batch_execute("UPDATE items SET v = 'c' WHERE id = 1")
        .unwrap();
    assert_eq!(
        updates_after(&mut owner, p0),
        vec![
            json!([{"id": 1}, {"v": "v"}, {"v": "a"}]),
            json!([{"id": 1}, {"v": "a"}, {"v": "b"}, {"project": 10}]),
            json!([{"id": 1}, {"v": "b"}, {"v": "c"}]),
        ]
    );
}

#[test]
fn a_declaration_waits_for_writers_and_writers_wait_for_it() {
    let db = setup("filter_cut");
    let mut observer = db.connect();
    let mut early = db.connect_with(Sequencer::Commit);
    let p0 = position(&mut observer);

    // A transaction writing the table when the declaration comes: the declaration
    // waits for it, and its updates (before and after) are logged as it began.
    early
        .batch_execute("BEGIN; UPDATE items SET v = 'early 1' WHERE id = 1")
        .unwrap();
    let mut owner = db.connect_with(Sequencer::Commit);
    let owner_pid = pid(&mut owner);
    owner
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '30s'")
        .unwrap();
    let declaring = std::thread::spawn(move || {
        owner
            .batch_execute("SELECT livesync.set_filter_columns('items', '{project}')")
            .unwrap();
        owner
    });
    wait_until("the declaration waits for the writer", || {
        waits_on_lock(&mut observer, owner_pid)
    });
    early
        .batch_execute("UPDATE items SET v = 'early 2' WHERE id = 2; COMMIT")
        .unwrap();
    let mut owner = declaring.join().unwrap();

    // A writer that comes while the declaration is uncommitted waits for it, and
    // logs the filter column.
    let mut late = db.connect_with(Sequencer::Commit);
    let late_pid = pid(&mut late);
    let writing = std::thread::spawn(move || {
        late.batch_execute("UPDATE items SET v = 'late' WHERE id = 3")
            .unwrap();
    });
    wait_until("the writer waits for the declaration", || {
        waits_on_lock(&mut observer, late_pid)
    });
    owner.batch_execute("COMMIT").unwrap();
    writing.join().unwrap();

    assert_eq!(
        updates_after(&mut observer, p0),
        vec![
            json!([{"id": 1}, {"v": "v"}, {"v": "early 1"}]),
            json!([{"id": 2}, {"v": "v"}, {"v": "early 2"}]),
            json!([{"id": 3}, {"v": "v"}, {"v": "late"}, {"project": 30}]),
        ]
    );
}
