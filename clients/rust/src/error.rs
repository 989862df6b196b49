//! The library's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("queue file {path}: {source}")]
    QueueIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("queue file {path}, line {line}: {message}")]
    QueueCorrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("queue file {path} belongs to client id {found:?}, not {expected:?}")]
    QueueClientMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("queue file {path} is in use by another process ({message})")]
    QueueLocked { path: PathBuf, message: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("the client has shut down")]
    Closed,
    #[error("the bridge refused: {code}: {message}")]
    Server { code: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;
