//! Shared harness for the end-to-end tests: each test gets a database of its own on
//! the real server (so positions and doorbell rings belong to that test alone), with
//! livesync installed.
//!
//! The server is found through `LIVESYNC_TEST_PG` (libpq key=value form), default
//! `host=127.0.0.1 port=5432 user=postgres`.

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use std::time::{Duration, Instant};

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

    /// A connection with the default sequencing (`auto`: the background worker when
    /// one runs).
    pub fn connect(&self) -> Client {
        self.connect_with(Sequencer::Auto)
    }

    pub fn connect_with(&self, sequencer: Sequencer) -> Client {
        Client::connect(&self.conninfo(sequencer), NoTls).unwrap()
    }

    /// The libpq connection string of this database (for psql and other programs).
    pub fn conninfo(&self, sequencer: Sequencer) -> String {
        let options = match sequencer {
            Sequencer::Auto => "",
            Sequencer::Commit => " options='-c livesync.sequencer=commit'",
        };
        format!("{} dbname={}{options}", server(), self.name)
    }

    /// Waits until this database's sequencer worker runs (it needs
    /// `shared_preload_libraries = 'livesync'`, which `make up` / `make test` set).
    pub fn wait_for_worker(&self) {
        let mut client = self.connect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client
            .query_one("SELECT livesync._ensure_sequencer()", &[])
            .unwrap()
            .get::<_, bool>(0)
        {
            assert!(
                Instant::now() < deadline,
                "no sequencer worker within 30 s: is livesync in shared_preload_libraries?"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid of this database's sequencer worker, if one runs.
    pub fn worker_pid(&self) -> Option<i32> {
        self.connect()
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'livesync sequencer' AND datname = current_database()",
                &[],
            )
            .unwrap()
            .map(|row| row.get(0))
    }
}

/// Polls `condition` until it holds, failing the test after 30 s. For waiting on
/// something observable (a backend blocked on a lock, a process gone), never on time.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether backend `pid` is waiting for a heavyweight lock.
pub fn waits_on_lock(observer: &mut Client, pid: i32) -> bool {
    observer
        .query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            &[&pid],
        )
        .unwrap()
        .is_some()
}

/// How a connection's commits get their positions (`livesync.sequencer`).
#[derive(Clone, Copy, Debug)]
pub enum Sequencer {
    /// Handed to the database's background worker when it runs.
    Auto,
    /// Given by the committing transaction itself, before COMMIT returns.
    Commit,
}

/// Four writers, each committing 50 single-row inserts into `table` (whose first
/// column is an int primary key; other columns need defaults), all at once.
/// Returns once every insert has committed.
pub fn four_writers_insert_200_rows(db: &TestDb, sequencer: Sequencer, table: &str) {
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = db.connect_with(sequencer);
            let insert = format!("INSERT INTO {table} VALUES ($1)");
            std::thread::spawn(move || {
                for i in 0..50 {
                    client.execute(insert.as_str(), &[&(w * 1000 + i)]).unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
}

/// Waits for the next `livesync` ring on a connection that LISTENs, and returns its
/// position. The deadline only turns a lost ring into a failure instead of a hang.
pub fn next_ring(listener: &mut Client) -> i64 {
    let mut notifications = listener.notifications();
    let mut rings = notifications.timeout_iter(Duration::from_secs(30));
    let ring = rings.next().unwrap().expect("no livesync ring within 30 s");
    assert_eq!(ring.channel(), "livesync");
    ring.payload().parse().expect("a ring carries a position")
}

/// Collects ring positions until one is at or past `until`.
pub fn rings_through(listener: &mut Client, until: i64) -> Vec<i64> {
    let mut rings = Vec::new();
    loop {
        let position = next_ring(listener);
        rings.push(position);
        if position >= until {
            return rings;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Dropping the extension first lets the database's sequencer worker exit
        // cleanly instead of being terminated by DROP DATABASE.
        if let Ok(mut client) =
            Client::connect(&format!("{} dbname={}", server(), self.name), NoTls)
        {
            let _ = client.batch_execute("DROP EXTENSION IF EXISTS livesync CASCADE");
        }
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

/// One page of `livesync.change_runs(after, max)`, its runs' entries listed as
/// changes (in SQL, so keys read as `changes_since` renders them), and the position
/// to read the next page from (its last transaction's last position; None if empty).
pub fn change_runs(client: &mut Client, after: i64, max: i32) -> (Vec<Change>, Option<i64>) {
    let rows = client
        .query(
            "SELECT r.first_position + e.n - 1,
                    CASE r.op WHEN 'i' THEN 'insert' WHEN 'u' THEN 'update' WHEN 'd' THEN 'delete'
                              WHEN 't' THEN 'truncate' WHEN 's' THEN 'schema' END,
                    nullif(e.change -> 0, 'null')::text, r.tx::text,
                    max(r.tx_last_position) OVER ()
             FROM livesync.change_runs($1, $2) AS r
             CROSS JOIN LATERAL jsonb_array_elements(r.entries) WITH ORDINALITY AS e(change, n)
             ORDER BY 1",
            &[&after, &max],
        )
        .unwrap();
    let next = rows.first().map(|row| row.get(4));
    let changes = rows
        .iter()
        .map(|row| Change {
            position: row.get(0),
            op: row.get(1),
            key: row.get(2),
            tx: row.get(3),
        })
        .collect();
    (changes, next)
}

pub fn current_position(client: &mut Client) -> i64 {
    client
        .query_one("SELECT livesync.current_position()", &[])
        .unwrap()
        .get(0)
}

/// Crashes and restarts the local PostgreSQL 15 (immediate shutdown: no checkpoint,
/// recovery from WAL at start). Only for a test binary of its own, since it cuts
/// every other test's connections.
pub fn crash_and_restart_server() {
    use std::process::Command;
    let mut command = if is_root() {
        Command::new("pg_ctlcluster")
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", "pg_ctlcluster"]);
        sudo
    };
    let status = command
        .args([
            "--skip-systemctl-redirect",
            "15",
            "main",
            "restart",
            "-m",
            "immediate",
        ])
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "could not restart PostgreSQL 15 main");
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// A table for the lower-xid rounds: row 1 with two columns two sessions update.
pub const TWO_WRITERS_TABLE: &str = "CREATE TABLE t (id int PRIMARY KEY, a int, b int);
     INSERT INTO t VALUES (1, 0, 0);
     SELECT livesync.track('t');";

/// One round of the sequence that found xid-ordered ticks: `s1` takes an xid first
/// and writes (column b) last; `s2` writes (column a) and commits in between. Commit
/// order puts `s2`'s change first.
pub fn lower_xid_commits_later(s1: &mut Client, s2: &mut Client, round: i32) {
    s1.batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .unwrap();
    s2.execute("UPDATE t SET a = $1 WHERE id = 1", &[&round])
        .unwrap();
    s1.execute("UPDATE t SET b = $1 WHERE id = 1", &[&round])
        .unwrap();
    s1.batch_execute("COMMIT").unwrap();
}
