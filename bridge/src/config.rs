//! Settings: command-line flags and environment variables over an optional TOML file
//! over defaults. Everything the bridge can be told lives in [`Config`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// The bridge's settings, resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// libpq-style connection string or URL of the database whose log is streamed.
    pub database_url: String,
    /// Redis for presence across nodes (used by presence; optional).
    pub redis_url: Option<String>,
    /// Where the HTTP and WebSocket server listens.
    pub listen: SocketAddr,
    /// HS256 secret; with it (or a public key) every client must present a token.
    pub jwt_secret: Option<String>,
    /// RS256 public key (PEM).
    pub jwt_public_key: Option<String>,
    /// The Postgres role writes and snapshots run as when a token names none (or auth
    /// is off). `None`: the bridge's own login role.
    pub default_role: Option<String>,
    /// Log as JSON lines instead of human-readable text.
    pub json_logs: bool,
    /// This node's name in `welcome` and metrics.
    pub node_name: String,
    pub limits: Limits,
    /// Retention passed to `livesync.compact` by `POST /api/v1/sync/cleanup`.
    pub retention: Duration,
    /// How often the reader polls the log even without a doorbell ring.
    pub poll_interval: Duration,
    /// `/ready` is false when the reader is this far behind the newest position.
    pub ready_max_lag: i64,
    /// Server heartbeat: a ping this often; a connection silent for twice as long is closed.
    pub heartbeat: Duration,
    /// Database connections for writes, snapshots and catch-up reads.
    pub pool_size: usize,
    /// How often live subscriptions' access (SELECT, row-level security) is re-checked.
    pub access_recheck: Duration,
    pub presence: PresenceConfig,
    /// The built demo page (demo/dist), served at `/`; `None`: `/` points to the docs.
    pub demo_dir: Option<PathBuf>,
}

/// Presence and rooms (see docs/protocol.md, "Presence and broadcast").
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// A member not heartbeated for this long is removed (and a dead node's members
    /// are removed by the others within it).
    pub ttl: Duration,
    /// Presence updates of a room are gathered this long into one diff.
    pub coalesce: Duration,
    /// Broadcasts per second per connection (also the burst).
    pub broadcasts_per_second: u32,
    /// Largest presence `state` or broadcast `payload`, serialised.
    pub max_state_bytes: usize,
    /// Rooms one connection may be in.
    pub max_rooms: usize,
    /// Who may join and broadcast where (`[[rooms]]` in the config file).
    pub rules: Vec<crate::rooms::RoomRule>,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            ttl: crate::presence::DEFAULT_TTL,
            coalesce: Duration::from_millis(25),
            broadcasts_per_second: 100,
            max_state_bytes: 4096,
            max_rooms: 100,
            rules: Vec::new(),
        }
    }
}

/// Limits that protect the bridge from one client.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest inbound text frame served; larger ones get `too_large` (the connection
    /// stays). Outbound `changes` messages are split into parts above this size.
    pub max_frame_bytes: usize,
    pub max_subscriptions: usize,
    pub messages_per_second: u32,
    pub connections_per_ip: usize,
    /// Messages waiting to be written to one connection; a subscriber whose queue is
    /// full is moved to catch-up.
    pub queue_capacity: usize,
    /// Changes kept in memory so recent resumes need no query.
    pub window_changes: usize,
    /// ... and at most about this many bytes of them (big rows).
    pub window_bytes: usize,
    /// A subscriber still catching up after this long is told to resync.
    pub max_catch_up: Duration,
    /// Rows per snapshot page.
    pub snapshot_page_rows: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 1 << 20,
            max_subscriptions: 100,
            messages_per_second: 1000,
            connections_per_ip: 10_000,
            queue_capacity: 1024,
            window_changes: 100_000,
            window_bytes: 256 << 20,
            max_catch_up: Duration::from_secs(60),
            snapshot_page_rows: 1000,
        }
    }
}

impl Config {
    /// Settings for a bridge on `database_url` with every default (tests, benches).
    pub fn new(database_url: impl Into<String>) -> Self {
        Config {
            database_url: database_url.into(),
            redis_url: None,
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            jwt_secret: None,
            jwt_public_key: None,
            default_role: None,
            json_logs: false,
            node_name: default_node_name(),
            limits: Limits::default(),
            retention: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_secs(1),
            ready_max_lag: 100_000,
            heartbeat: Duration::from_secs(25),
            pool_size: 16,
            access_recheck: Duration::from_secs(2),
            presence: PresenceConfig::default(),
            demo_dir: None,
        }
    }

    /// Whether clients must authenticate.
    pub fn auth_enabled(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }

    /// Reads flags and environment, then the config file they name.
    pub fn from_args() -> Result<Self, ConfigError> {
        Self::from_cli(Cli::parse())
    }

    fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let database_url = cli
            .database_url
            .or(file.database_url)
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/livesync".to_string());
        let mut config = Config::new(database_url);
        config.redis_url = cli.redis_url.or(file.redis_url).filter(|s| !s.is_empty());
        if let Some(listen) = cli.listen.or(file.listen) {
            config.listen = listen.parse().map_err(|e| ConfigError::Invalid {
                name: "listen",
                reason: format!("{listen:?}: {e}"),
            })?;
        }
        config.jwt_secret = cli.jwt_secret.or(file.jwt_secret).filter(|s| !s.is_empty());
        config.jwt_public_key = match cli.jwt_public_key.or(file.jwt_public_key) {
            Some(key) if key.trim_start().starts_with("-----BEGIN") => Some(key),
            // Not PEM text: a path to a PEM file.
            Some(path) if !path.is_empty() => Some(std::fs::read_to_string(&path).map_err(
                |source| ConfigError::Read {
                    path: path.into(),
                    source,
                },
            )?),
            _ => None,
        };
        config.default_role = cli
            .default_role
            .or(file.default_role)
            .filter(|s| !s.is_empty());
        config.json_logs = cli.json_logs || file.json_logs.unwrap_or(false);
        if let Some(name) = cli.node_name.or(file.node_name) {
            config.node_name = name;
        }
        let l = &mut config.limits;
        let fl = file.limits.unwrap_or_default();
        set(
            &mut l.max_frame_bytes,
            cli.max_frame_bytes.or(fl.max_frame_bytes),
        );
        set(
            &mut l.max_subscriptions,
            cli.max_subscriptions.or(fl.max_subscriptions),
        );
        set(
            &mut l.messages_per_second,
            cli.messages_per_second.or(fl.messages_per_second),
        );
        set(
            &mut l.connections_per_ip,
            cli.connections_per_ip.or(fl.connections_per_ip),
        );
        set(
            &mut l.queue_capacity,
            cli.queue_capacity.or(fl.queue_capacity),
        );
        set(
            &mut l.window_changes,
            cli.window_changes.or(fl.window_changes),
        );
        set(&mut l.window_bytes, cli.window_bytes.or(fl.window_bytes));
        if let Some(s) = cli.max_catch_up_secs.or(fl.max_catch_up_secs) {
            l.max_catch_up = Duration::from_secs(s);
        }
        set(&mut l.snapshot_page_rows, fl.snapshot_page_rows);
        if let Some(s) = cli.retention_hours.or(file.retention_hours) {
            config.retention = Duration::from_secs(s * 3600);
        }
        if let Some(ms) = cli.poll_interval_ms.or(file.poll_interval_ms) {
            config.poll_interval = Duration::from_millis(ms);
        }
        set(
            &mut config.ready_max_lag,
            cli.ready_max_lag.or(file.ready_max_lag),
        );
        if let Some(ms) = cli.heartbeat_ms.or(file.heartbeat_ms) {
            config.heartbeat = Duration::from_millis(ms);
        }
        set(&mut config.pool_size, cli.pool_size.or(file.pool_size));
        let p = &mut config.presence;
        if let Some(ms) = cli.presence_ttl_ms.or(file.presence_ttl_ms) {
            p.ttl = Duration::from_millis(ms);
        }
        if let Some(ms) = cli.presence_coalesce_ms.or(file.presence_coalesce_ms) {
            p.coalesce = Duration::from_millis(ms);
        }
        set(
            &mut p.broadcasts_per_second,
            cli.broadcasts_per_second.or(file.broadcasts_per_second),
        );
        set(
            &mut p.max_state_bytes,
            cli.max_presence_bytes.or(file.max_presence_bytes),
        );
        set(&mut p.max_rooms, cli.max_rooms.or(file.max_rooms));
        p.rules = file.rooms;
        config.demo_dir = cli.demo_dir.or(file.demo_dir);
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings the bridge cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| ConfigError::Invalid {
            name,
            reason: reason.to_string(),
        };
        let p = &self.presence;
        if p.ttl < Duration::from_millis(300) {
            return Err(invalid("presence_ttl_ms", "must be at least 300"));
        }
        if p.broadcasts_per_second == 0 || p.max_rooms == 0 {
            return Err(invalid(
                "presence",
                "broadcasts_per_second and max_rooms must be positive",
            ));
        }
        let l = &self.limits;
        if l.max_frame_bytes < 1024 {
            return Err(invalid("max_frame_bytes", "must be at least 1024"));
        }
        if l.queue_capacity < 2 {
            return Err(invalid("queue_capacity", "must be at least 2"));
        }
        if l.messages_per_second == 0 || l.max_subscriptions == 0 || l.connections_per_ip == 0 {
            return Err(invalid(
                "limits",
                "messages_per_second, max_subscriptions and connections_per_ip must be positive",
            ));
        }
        if l.snapshot_page_rows == 0 {
            return Err(invalid("snapshot_page_rows", "must be positive"));
        }
        if self.heartbeat < Duration::from_millis(100) {
            return Err(invalid("heartbeat_ms", "must be at least 100"));
        }
        if self.poll_interval < Duration::from_millis(10) {
            return Err(invalid("poll_interval_ms", "must be at least 10"));
        }
        if self
            .default_role
            .as_deref()
            .is_some_and(|r| r.eq_ignore_ascii_case("none"))
        {
            return Err(invalid(
                "default_role",
                "\"none\" is not a role (leave it unset to run as the bridge's role)",
            ));
        }
        if self.pool_size < 2 {
            return Err(invalid("pool_size", "must be at least 2"));
        }
        Ok(())
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn default_node_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host = if host.is_empty() {
        "bridge".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}

/// `livesync-bridge` command line; every flag also reads an environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "livesync-bridge",
    version,
    about = "Streams livesync's change log to WebSocket clients"
)]
struct Cli {
    /// TOML file with any of the settings below (flags and environment win).
    #[arg(long, env = "LIVESYNC_CONFIG")]
    config: Option<PathBuf>,
    /// The database to stream (default postgres://postgres@127.0.0.1:5432/livesync).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Redis for presence across bridges (next to come; optional).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Address to listen on (default 127.0.0.1:8080).
    #[arg(long, env = "LIVESYNC_LISTEN")]
    listen: Option<String>,
    /// HS256 secret: clients must present a token signed with it.
    #[arg(long, env = "LIVESYNC_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// RS256 public key, PEM text or a path to a PEM file.
    #[arg(long, env = "LIVESYNC_JWT_PUBLIC_KEY")]
    jwt_public_key: Option<String>,
    /// Role for writes and snapshots when a token names none, or auth is off.
    #[arg(long, env = "LIVESYNC_DEFAULT_ROLE")]
    default_role: Option<String>,
    /// Log JSON lines.
    #[arg(long, env = "LIVESYNC_JSON_LOGS")]
    json_logs: bool,
    /// This node's name (default: host name and process id).
    #[arg(long, env = "LIVESYNC_NODE_NAME")]
    node_name: Option<String>,
    #[arg(long, env = "LIVESYNC_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    #[arg(long, env = "LIVESYNC_MAX_SUBSCRIPTIONS")]
    max_subscriptions: Option<usize>,
    #[arg(long, env = "LIVESYNC_MESSAGES_PER_SECOND")]
    messages_per_second: Option<u32>,
    #[arg(long, env = "LIVESYNC_CONNECTIONS_PER_IP")]
    connections_per_ip: Option<usize>,
    #[arg(long, env = "LIVESYNC_QUEUE_CAPACITY")]
    queue_capacity: Option<usize>,
    #[arg(long, env = "LIVESYNC_WINDOW_CHANGES")]
    window_changes: Option<usize>,
    #[arg(long, env = "LIVESYNC_WINDOW_BYTES")]
    window_bytes: Option<usize>,
    #[arg(long, env = "LIVESYNC_MAX_CATCH_UP_SECS")]
    max_catch_up_secs: Option<u64>,
    /// Retention for the cleanup endpoint, in hours (default 24).
    #[arg(long, env = "LIVESYNC_RETENTION_HOURS")]
    retention_hours: Option<u64>,
    #[arg(long, env = "LIVESYNC_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    #[arg(long, env = "LIVESYNC_READY_MAX_LAG")]
    ready_max_lag: Option<i64>,
    #[arg(long, env = "LIVESYNC_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    #[arg(long, env = "LIVESYNC_POOL_SIZE")]
    pool_size: Option<usize>,
    #[arg(long, env = "LIVESYNC_PRESENCE_TTL_MS")]
    presence_ttl_ms: Option<u64>,
    #[arg(long, env = "LIVESYNC_PRESENCE_COALESCE_MS")]
    presence_coalesce_ms: Option<u64>,
    #[arg(long, env = "LIVESYNC_BROADCASTS_PER_SECOND")]
    broadcasts_per_second: Option<u32>,
    #[arg(long, env = "LIVESYNC_MAX_PRESENCE_BYTES")]
    max_presence_bytes: Option<usize>,
    #[arg(long, env = "LIVESYNC_MAX_ROOMS")]
    max_rooms: Option<usize>,
    /// The built demo page to serve at `/` (e.g. demo/dist).
    #[arg(long, env = "LIVESYNC_DEMO_DIR")]
    demo_dir: Option<PathBuf>,
}

/// The TOML file: the same names as the flags, with `_` for `-`; limits in `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    redis_url: Option<String>,
    listen: Option<String>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<String>,
    default_role: Option<String>,
    json_logs: Option<bool>,
    node_name: Option<String>,
    retention_hours: Option<u64>,
    poll_interval_ms: Option<u64>,
    ready_max_lag: Option<i64>,
    heartbeat_ms: Option<u64>,
    pool_size: Option<usize>,
    presence_ttl_ms: Option<u64>,
    presence_coalesce_ms: Option<u64>,
    broadcasts_per_second: Option<u32>,
    max_presence_bytes: Option<usize>,
    max_rooms: Option<usize>,
    demo_dir: Option<PathBuf>,
    limits: Option<FileLimits>,
    /// `[[rooms]]`: who may join and broadcast where.
    #[serde(default)]
    rooms: Vec<crate::rooms::RoomRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_frame_bytes: Option<usize>,
    max_subscriptions: Option<usize>,
    messages_per_second: Option<u32>,
    connections_per_ip: Option<usize>,
    queue_capacity: Option<usize>,
    window_changes: Option<usize>,
    window_bytes: Option<usize>,
    max_catch_up_secs: Option<u64>,
    snapshot_page_rows: Option<usize>,
}

impl FileConfig {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = std::env::temp_dir().join(format!("livesync-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bridge.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nheartbeat_ms = 5000\n[limits]\nqueue_capacity = 64\nmax_subscriptions = 7\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "livesync-bridge",
            "--config",
            file.to_str().unwrap(),
            "--max-subscriptions",
            "9",
            "--database-url",
            "postgres://x@127.0.0.1/y",
        ]);
        let config = Config::from_cli(cli).unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.heartbeat, Duration::from_millis(5000));
        assert_eq!(config.limits.queue_capacity, 64);
        assert_eq!(config.limits.max_subscriptions, 9);
        assert_eq!(config.database_url, "postgres://x@127.0.0.1/y");
        assert_eq!(
            config.limits.max_frame_bytes,
            Limits::default().max_frame_bytes
        );
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused() {
        let dir = std::env::temp_dir().join(format!("livesync-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bridge.toml");
        std::fs::write(&file, "listn = \"x\"\n").unwrap();
        let cli = Cli::parse_from(["livesync-bridge", "--config", file.to_str().unwrap()]);
        assert!(matches!(
            Config::from_cli(cli),
            Err(ConfigError::Parse { .. })
        ));
        let cli = Cli::parse_from(["livesync-bridge", "--queue-capacity", "1"]);
        assert!(matches!(
            Config::from_cli(cli),
            Err(ConfigError::Invalid { .. })
        ));
    }
}
