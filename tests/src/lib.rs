//! Shared harness for the end-to-end tests: each test gets a database of its own on
//! the real server (so positions and doorbell rings belong to that test alone), with
//! livesync installed.
//!
//! The server is found through `LIVESYNC_TEST_PG` (libpq key=value form), default
//! `host=127.0.0.1 port=5432 user=postgres`.

use postgres::{Client, NoTls};

pub fn server() -> String {
    std::env::var("LIVESYNC_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
}

/// A freshly created database with livesync installed; dropped again on drop.
pub struct TestDb {
    name: String,
}

impl TestDb {
    pub fn create(name: &str) -> TestDb {
        let name = format!("livesync_e2e_{name}");
        let mut admin = Client::connect(&format!("{} dbname=postgres", server()), NoTls)
            .expect("connect to the test server (is PostgreSQL running? see README)");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let db = TestDb { name };
        db.connect()
            .batch_execute("CREATE EXTENSION livesync")
            .expect("CREATE EXTENSION livesync (is the extension installed? see README)");
        db
    }

    pub fn connect(&self) -> Client {
        Client::connect(&format!("{} dbname={}", server(), self.name), NoTls).unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&format!("{} dbname=postgres", server()), NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// One change as a reader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub position: i64,
    pub op: String,
    pub key: String,
    pub tx: String,
}

/// `livesync.changes_since(after, max)` as a list.
pub fn changes_since(client: &mut Client, after: i64, max: i32) -> Vec<Change> {
    client
        .query(
            "SELECT position, op, key::text, tx::text FROM livesync.changes_since($1, $2)",
            &[&after, &max],
        )
        .unwrap()
        .iter()
        .map(|row| Change {
            position: row.get(0),
            op: row.get(1),
            key: row.get(2),
            tx: row.get(3),
        })
        .collect()
}

pub fn current_position(client: &mut Client) -> i64 {
    client
        .query_one("SELECT livesync.current_position()", &[])
        .unwrap()
        .get(0)
}
