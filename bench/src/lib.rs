//! What the Rust benchmarks share: the server they measure and a database of their
//! own on it, created afresh with livesync installed and dropped at the end; the
//! bridge's benchmarks also share [`bridge`].

use postgres::{Client, NoTls};

pub mod bridge;

/// The server, from `BENCH_PG` (libpq key=value form).
pub fn server() -> String {
    std::env::var("BENCH_PG").unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres".into())
}

/// A benchmark's own database, dropped again when this is dropped.
pub struct BenchDb {
    name: &'static str,
}

impl BenchDb {
    /// Drops and creates database `name` and installs livesync in it.
    pub fn create(name: &'static str) -> BenchDb {
        BenchDb::create_at(name, None)
    }

    /// Drops and creates database `name` and installs livesync in it, at `version`
    /// (one whose install script is installed) or the default one.
    pub fn create_at(name: &'static str, version: Option<&str>) -> BenchDb {
        let mut admin = Client::connect(&format!("{} dbname=postgres", server()), NoTls)
            .expect("connect to the server (is PostgreSQL running with livesync installed?)");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let db = BenchDb { name };
        let version = version.map_or(String::new(), |v| format!(" VERSION '{v}'"));
        db.connect()
            .batch_execute(&format!("CREATE EXTENSION livesync{version}"))
            .unwrap();
        db
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.conninfo(), NoTls).expect("connect to the bench database")
    }

    /// libpq key=value string for this database (as the `BENCH_PG` user).
    pub fn conninfo(&self) -> String {
        format!("{} dbname={}", server(), self.name)
    }
}

impl Drop for BenchDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = Client::connect(&format!("{} dbname=postgres", server()), NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}
