//! What every handler and session shares.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::hub::FanoutHub;
use crate::pg::reader::FollowerStatus;
use crate::ws::registry::ConnectionRegistry;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub hub: Arc<FanoutHub>,
    /// Presence and broadcast rooms.
    pub rooms: Arc<crate::rooms::RoomHub>,
    pub pool: deadpool_postgres::Pool,
    pub auth: Arc<Authenticator>,
    pub connections: Arc<ConnectionRegistry>,
    pub follower: Arc<FollowerStatus>,
    /// LISTEN is active on the doorbell connection.
    pub listening: Arc<AtomicBool>,
    /// Cancelled when the bridge shuts down.
    pub shutdown: CancellationToken,
    /// Snapshots running at once, node-wide (half the pool).
    pub snapshot_permits: Arc<tokio::sync::Semaphore>,
}
