//! A row encoder (how capture turns a table's tuples into jsonb) lives in a memory
//! context under `CacheMemoryContext`, which no transaction abort resets. When
//! building one raises a Postgres ERROR, the context must go with the error, or
//! every failing statement leaves one behind for the rest of the session.

use livesync_e2e::{Sequencer, TestDb};

#[test]
fn an_error_while_building_a_row_encoder_leaves_no_memory_context_behind() {
    let db = TestDb::create("encoder_memory");
    let mut setup = db.connect_with(Sequencer::Commit);
    setup
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('calm');
             CREATE TABLE t (id int PRIMARY KEY, m mood);
             SELECT livesync.track('t');
             INSERT INTO t SELECT g, 'calm' FROM generate_series(1, 20) g;",
        )
        .unwrap();
    // A new session has no encoder for t, so its first capture builds one.
    let mut session = db.connect_with(Sequencer::Commit);
    // Damage the catalog (this database is thrown away): with the column's type gone,
    // building t's encoder raises while it looks the type up, inside
    // RowEncoder::new. A delete needs nothing of the type before capture runs.
    session
        .batch_execute("DELETE FROM pg_type WHERE oid = 'mood'::regtype")
        .unwrap();
    let encoder_contexts = |session: &mut postgres::Client| -> i64 {
        session
            .query_one(
                "SELECT count(*) FROM pg_backend_memory_contexts WHERE name = 'livesync row encoder'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(encoder_contexts(&mut session), 0);
    for id in 1..=20 {
        let error = session
            .execute("DELETE FROM t WHERE id = $1", &[&id])
            .expect_err("capture cannot encode t's rows");
        let message = error.as_db_error().expect("a server error").message();
        assert!(
            message.contains("cache lookup failed for type"),
            "the error came from building the encoder: {message}"
        );
    }
    assert_eq!(
        encoder_contexts(&mut session),
        0,
        "every failed build freed its context"
    );
}
