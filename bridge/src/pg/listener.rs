//! The doorbell: one connection per node that LISTENs on `livesync` and wakes the
//! log reader on every ring. After any failure it reconnects, LISTENs again and wakes
//! the reader, which reads whatever it missed (rings are only hints; the log is the
//! truth).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::reader::FollowerStatus;
use super::PgError;

/// Listens until cancelled.
pub struct DoorbellListener {
    pub database_url: String,
    pub wake: Arc<Notify>,
    /// True while LISTEN is active (for `/ready`).
    pub listening: Arc<AtomicBool>,
    pub status: Arc<FollowerStatus>,
}

impl DoorbellListener {
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            match self.listen_once(&cancel).await {
                Ok(()) => return,
                Err(e) => {
                    self.listening.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "doorbell connection lost; reconnecting");
                    crate::metrics::listener_reconnects();
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(&self, cancel: &CancellationToken) -> Result<(), PgError> {
        let (client, mut connection) = tokio_postgres::connect(&self.database_url, NoTls).await?;
        let (ring_tx, mut ring_rx) = tokio::sync::mpsc::unbounded_channel();
        // The connection must be polled for LISTEN's reply and for notifications.
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if ring_tx.send(Ok(n.payload().to_string())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = ring_tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        let _abort = AbortOnDrop(driver);
        client.batch_execute("LISTEN livesync").await?;
        self.listening.store(true, Ordering::Relaxed);
        tracing::info!("listening for the livesync doorbell");
        // Whatever was committed while we were not listening.
        self.wake.notify_one();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                ring = ring_rx.recv() => match ring {
                    Some(Ok(payload)) => {
                        if let Ok(position) = payload.parse::<i64>() {
                            self.status.newest_seen.fetch_max(position, Ordering::Relaxed);
                        }
                        self.wake.notify_one();
                    }
                    Some(Err(e)) => return Err(e.into()),
                    // The driver ended without an error: the server closed the connection.
                    None => return Err(PgError::Closed),
                },
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
