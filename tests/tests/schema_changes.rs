//! Schema changes made by another session while a writer's connection stays open.
//! Capture keeps a table's row encoder per backend between statements; a column
//! added, dropped or retyped, or a new primary key, elsewhere must show in the very
//! next change the writer captures.

use livesync_e2e::{current_position, Sequencer, TestDb};
use postgres::Client;

/// Runs `ddl` on the admin connection, then `write` on the writer's, and returns
/// the key and delta (as text) of the change the write captured.
fn ddl_then_write(
    admin: &mut Client,
    writer: &mut Client,
    ddl: &str,
    write: &str,
) -> (String, String) {
    admin.batch_execute(ddl).unwrap();
    let after = current_position(writer);
    writer.batch_execute(write).unwrap();
    let row = writer
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
    let (_, delta) = ddl_then_write(
        &mut admin,
        &mut writer,
        "ALTER TABLE cards ADD COLUMN points int DEFAULT 3, DROP COLUMN color",
        "INSERT INTO cards (id, title) VALUES (2, 'b')",
    );
    assert!(delta.contains(r#""points": {"new": 3}"#), "{delta}");
    assert!(!delta.contains("color"), "{delta}");

    // A column retyped: the value is encoded as the new type.
    let (_, delta) = ddl_then_write(
        &mut admin,
        &mut writer,
        "ALTER TABLE cards ALTER COLUMN points TYPE numeric(6,2)",
        "UPDATE cards SET points = 4 WHERE id = 2",
    );
    assert_eq!(delta, r#"{"points": {"new": 4.00, "old": 3.00}}"#);

    // A new primary key: changes are keyed by it from the next statement on.
    let (key, _) = ddl_then_write(
        &mut admin,
        &mut writer,
        "ALTER TABLE cards DROP CONSTRAINT cards_pkey, ADD PRIMARY KEY (id, title)",
        "UPDATE cards SET points = 5 WHERE id = 2",
    );
    assert_eq!(key, r#"{"id": 2, "title": "b"}"#);
}
