//! livesync-bridge: streams livesync's change log to WebSocket subscribers, applies
//! their writes through `livesync.write`, and serves a small HTTP API.
//!
//! [`start`] runs the whole bridge in-process (tests and benches use it on
//! `127.0.0.1:0`); `main.rs` only wires configuration, logging and signals to it.
//! See docs/architecture.md ("The bridge") and docs/protocol.md.

pub mod auth;
pub mod changelog;
pub mod config;
pub mod demo;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod pg;
pub mod presence;
pub mod rooms;
pub mod state;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::hub::FanoutHub;
use crate::pg::listener::DoorbellListener;
use crate::pg::reader::{FollowerStatus, LogFollower};
use crate::state::AppState;
use crate::ws::registry::ConnectionRegistry;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to the database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("database check failed: {0}")]
    Check(#[from] pg::PgError),
    #[error(
        "the bridge's role {0} is not a member of livesync_reader: GRANT livesync_reader TO {0}"
    )]
    NotReader(String),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("presence: {0}")]
    Presence(#[from] presence::PresenceError),
    #[error("cannot start the reader's thread: {0}")]
    ReaderThread(std::io::Error),
}

/// Runs the doorbell listener and the log reader on a thread and runtime of their
/// own. On a node busy writing to thousands of sockets their wake-ups (a ring, a
/// page arriving) would otherwise queue behind the session tasks on the same worker
/// threads, and every subscriber would wait for them.
fn spawn_reader_thread(
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("livesync-reader")
        .build()?;
    std::thread::Builder::new()
        .name("livesync-reader".into())
        .spawn(move || runtime.block_on(work))?;
    Ok(())
}

/// The HTTP and WebSocket routes.
pub fn app(state: AppState) -> Router {
    let body_limit = state.config.limits.max_frame_bytes.saturating_mul(2);
    Router::new()
        .route("/ws", get(ws::session::upgrade))
        .merge(http::routes())
        .merge(demo::routes(state.config.demo_dir.as_deref()))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// A bridge running in this process.
pub struct RunningBridge {
    /// Where it listens (the real port when configured with port 0).
    pub addr: SocketAddr,
    pub state: AppState,
    tasks: TaskTracker,
}

impl RunningBridge {
    /// Graceful shutdown: stop accepting, tell clients to reconnect, drain, stop.
    pub async fn shutdown(self) {
        self.state.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(15), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("shutdown: tasks still running after 15 s; stopping anyway");
        }
    }

    /// Waits until something else shuts the bridge down.
    pub async fn stopped(&self) {
        self.state.shutdown.cancelled().await;
    }
}

/// Starts the bridge: checks the database role, starts the doorbell listener and the
/// log reader, and serves HTTP and WebSockets.
pub async fn start(config: Config) -> Result<RunningBridge, StartError> {
    metrics::handle();
    let config = Arc::new(config);
    let pool = pg::pool(&config.database_url, config.pool_size)?;
    let own = {
        let client = pool.get().await.map_err(pg::PgError::from)?;
        pg::catalog::own_role(&client).await?
    };
    if !own.reader && !own.superuser {
        return Err(StartError::NotReader(own.name));
    }
    if own.superuser {
        tracing::warn!(role = %own.name, "connected as a superuser: clients' writes and snapshots still run as their own roles, but run the bridge as a role with only livesync_reader (and livesync_maintainer for cleanup) in production");
    }
    if !own.maintainer && !own.superuser {
        tracing::info!(role = %own.name, "not a member of livesync_maintainer: POST /api/v1/sync/cleanup will be refused by the database");
    }
    let auth = Authenticator::from_config(&config)?;
    if !auth.enabled() {
        tracing::warn!("no LIVESYNC_JWT_SECRET or LIVESYNC_JWT_PUBLIC_KEY: the bridge is open to every client (development only)");
    }
    let hub = FanoutHub::new(pool.clone(), config.limits.clone());
    let shutdown = CancellationToken::new();
    let follower = Arc::new(FollowerStatus::default());
    let listening = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let tasks = TaskTracker::new();
    let doorbell = DoorbellListener {
        database_url: config.database_url.clone(),
        wake: wake.clone(),
        listening: listening.clone(),
        status: follower.clone(),
    }
    .run(shutdown.clone());
    let reader = LogFollower {
        database_url: config.database_url.clone(),
        hub: hub.clone(),
        wake,
        poll_interval: config.poll_interval,
        status: follower.clone(),
    }
    .run(shutdown.clone());
    // The reader's thread also stops when this runtime goes away without a shutdown
    // (a test's runtime ending): the task holding `alive` is dropped with it.
    let (alive, runtime_gone) = tokio::sync::oneshot::channel::<()>();
    let reader_cancel = shutdown.clone();
    tokio::spawn(async move {
        reader_cancel.cancelled().await;
        drop(alive);
    });
    spawn_reader_thread(tasks.track_future(async move {
        tokio::select! {
            _ = async { tokio::join!(doorbell, reader) } => {}
            _ = runtime_gone => {}
        }
    }))
    .map_err(StartError::ReaderThread)?;
    let presence = {
        let mut settings = presence::PresenceSettings::new(config.node_name.clone());
        settings.ttl = config.presence.ttl;
        presence::connect(config.redis_url.as_deref(), settings).await?
    };
    let backend = if config.redis_url.is_some() {
        "redis"
    } else {
        "memory"
    };
    if backend == "memory" {
        tracing::info!("no REDIS_URL: presence is kept in memory, for this node only");
    }
    let rooms = rooms::RoomHub::start(
        presence.store,
        presence.broker,
        presence.events,
        backend,
        rooms::RoomSettings {
            coalesce: config.presence.coalesce,
            policy: rooms::RoomPolicy {
                rules: config.presence.rules.clone(),
            },
        },
        shutdown.clone(),
        &tasks,
    );
    let state = AppState {
        rooms,
        config: config.clone(),
        hub,
        pool,
        auth: Arc::new(auth),
        connections: Arc::new(ConnectionRegistry::default()),
        follower,
        listening,
        shutdown: shutdown.clone(),
        snapshot_permits: Arc::new(tokio::sync::Semaphore::new((config.pool_size / 2).max(1))),
    };
    tasks.spawn(pg::catalog::watch_access(
        state.pool.clone(),
        state.hub.clone(),
        config.access_recheck,
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let app = app(state.clone());
    let serve_shutdown = shutdown.clone();
    tasks.spawn(async move {
        // No Nagle: a small message (a change, a cursor) written while an earlier one
        // is unacknowledged would otherwise wait for that ACK (tens of ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(serve_shutdown.cancelled_owned())
        .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    tracing::info!(%addr, node = %config.node_name, "livesync bridge listening");
    Ok(RunningBridge { addr, state, tasks })
}
