//! Everything that talks to PostgreSQL: the doorbell listener, the log reader, the
//! writer (client writes and snapshots run as the client's role) and catalog lookups.

pub mod catalog;
pub mod listener;
pub mod reader;
pub mod session_role;
pub mod snapshot;
pub mod writer;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::changelog::EntryError;

/// A database failure, with what the client may be told about it.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error("the database closed the connection")]
    Closed,
    /// Switching to the client's role failed (no such role, or the bridge's role is
    /// not a member of it).
    #[error("cannot run as the connection's role: {0}")]
    Role(tokio_postgres::Error),
}

impl PgError {
    /// The SQLSTATE of a database error (None for connection failures).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Db(e) | PgError::Role(e) => e.as_db_error().map(|d| d.code().code()),
            _ => None,
        }
    }

    /// The server's own message for a database error.
    pub fn db_message(&self) -> Option<String> {
        match self {
            PgError::Db(e) | PgError::Role(e) => e.as_db_error().map(|d| d.message().to_string()),
            _ => None,
        }
    }

    /// `LS001`: the position is outside the retained log.
    pub fn is_resync(&self) -> bool {
        self.sqlstate() == Some("LS001")
    }

    /// Whether the connection (not the statement) failed: retry elsewhere.
    pub fn is_connection(&self) -> bool {
        match self {
            PgError::Db(e) | PgError::Role(e) => {
                e.is_closed()
                    || e.as_db_error().is_none()
                    || e.code().is_some_and(|c| {
                        c.code().starts_with("08")
                            || *c == SqlState::ADMIN_SHUTDOWN
                            || *c == SqlState::CRASH_SHUTDOWN
                            || *c == SqlState::CANNOT_CONNECT_NOW
                    })
            }
            PgError::Pool(_) | PgError::Closed => true,
            PgError::Entry(_) => false,
        }
    }
}

/// The pool for writes, snapshots and catch-up reads.
pub fn pool(database_url: &str, size: usize) -> Result<Pool, tokio_postgres::Error> {
    let pg_config: tokio_postgres::Config = database_url.parse()?;
    let manager = Manager::from_config(
        pg_config,
        NoTls,
        ManagerConfig {
            // Verify before reuse: after a database restart, stale connections fail
            // once here instead of on a client's write.
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(std::time::Duration::from_secs(10)))
        .create_timeout(Some(std::time::Duration::from_secs(5)))
        .build()
        .expect("a pool with a runtime and timeouts builds"))
}
