//! A Rust client for the livesync bridge (docs/protocol.md): connects and resumes
//! with backoff, keeps table replicas, queues writes on disk so a restart replays
//! them (idempotently), shows them optimistically, and joins rooms.

pub mod client;
pub mod connection;
pub mod error;
pub mod optimistic;
pub mod queue;
pub mod replica;
pub mod room;

pub use client::{Client, Config, Event, Events};
pub use error::{Error, Result};
pub use optimistic::Outcome;
pub use queue::{Mutation, MutationQueue};
pub use replica::{Row, Table};
pub use room::Room;
