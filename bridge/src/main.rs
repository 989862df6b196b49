//! `livesync-bridge`: configuration → logging → bridge → run until SIGTERM/SIGINT.

use anyhow::Context;
use livesync_bridge::config::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_args()?;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn"));
    if config.json_logs {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let bridge = livesync_bridge::start(config.clone())
        .await
        .context("starting the bridge")?;
    println!(
        "livesync bridge ready: ws://{}/ws  (health: http://{}/health, metrics: http://{}/metrics)",
        bridge.addr, bridge.addr, bridge.addr
    );
    tokio::select! {
        _ = signal() => tracing::info!("shutting down: telling clients to reconnect"),
        _ = bridge.stopped() => {}
    }
    bridge.shutdown().await;
    Ok(())
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
