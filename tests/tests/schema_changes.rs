//! Schema changes made by another session while a writer's connection stays open.
//! Capture keeps a table's row encoder per backend between statements; a column
//! added, dropped or retyped, or a new primary key, elsewhere must show in the very
//! next change the writer captures.

use livesync_e2e::{current_position, Sequencer, TestDb};
use postgres::Client;

/// The key and delta of the newest change, as text.
fn last_change(client: &mut Client, after: i64) -> (String, String) {
    let row = client
        .query_one(
            "SELECT key::text, delta::text FROM livesync.changes_since($1)
             ORDER BY position DESC LIMIT 1",
            &[&after],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn another_sessions_ddl_shows_in_the_writers_next_change() {
    let db = TestDb::create("schema_changes");
    let mut writer = db.connect_with(Sequencer::Commit);
    let mut admin = db.connect_with(Sequencer::Commit);
    writer
        .batch_execute(
            "CREATE TABLE cards (id int PRIMARY KEY, title text, color text);
             SELECT livesync.track('cards');
             INSERT INTO cards VALUES (1, 'a', 'red');",
        )
        .unwrap();

    // A column added and another dropped by the admin connection.
    admin
        .batch_execute("ALTER TABLE cards ADD COLUMN points int DEFAULT 3, DROP COLUMN color")
        .unwrap();
    let p = current_position(&mut writer);
    writer
        .batch_execute("INSERT INTO cards (id, title) VALUES (2, 'b')")
        .unwrap();
    let (_, delta) = last_change(&mut writer, p);
    assert!(delta.contains(r#""points": {"new": 3}"#), "{delta}");
    assert!(!delta.contains("color"), "{delta}");

    // A column retyped: the value is encoded as the new type.
    admin
        .batch_execute("ALTER TABLE cards ALTER COLUMN points TYPE numeric(6,2)")
        .unwrap();
    let p = current_position(&mut writer);
    writer
        .batch_execute("UPDATE cards SET points = 4 WHERE id = 2")
        .unwrap();
    let (_, delta) = last_change(&mut writer, p);
    assert_eq!(delta, r#"{"points": {"new": 4.00, "old": 3.00}}"#);

    // A new primary key: changes are keyed by it from the next statement on.
    admin
        .batch_execute("ALTER TABLE cards DROP CONSTRAINT cards_pkey, ADD PRIMARY KEY (id, title)")
        .unwrap();
    let p = current_position(&mut writer);
    writer
        .batch_execute("UPDATE cards SET points = 5 WHERE id = 2")
        .unwrap();
    let (key, _) = last_change(&mut writer, p);
    assert_eq!(key, r#"{"id": 2, "title": "b"}"#);
}
