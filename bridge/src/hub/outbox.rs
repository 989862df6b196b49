//! A connection's bounded queue of messages to write. The hub, catch-up tasks and the
//! session put messages in; the connection's writer task takes them out and writes
//! several per flush.

use std::sync::Arc;

use tokio::sync::mpsc;

/// One message waiting to be written.
#[derive(Debug)]
pub enum Outbound {
    /// A whole JSON text message.
    Text(String),
    /// A whole JSON text message whose bytes several connections share (presence
    /// diffs and broadcasts fanned out to a room).
    Shared(Arc<str>),
    /// A `changes` message: the subscription's prefix (`{"type":"changes","sub":…,`)
    /// and the body shared by every subscriber of the same stream.
    Changes {
        prefix: Arc<str>,
        body: Arc<ChangesBody>,
    },
    /// A WebSocket ping (heartbeat).
    Ping,
    /// Close the connection with this code and reason once everything before is written.
    Close { code: u16, reason: String },
}

/// The shared part of a transaction's `changes` message(s): one part normally, several
/// when it is larger than the frame limit.
#[derive(Debug)]
pub struct ChangesBody {
    pub parts: Vec<String>,
    pub changes: usize,
}

impl ChangesBody {
    /// Builds `"position":P,"changes":[…]}` from serialised changes, split into parts
    /// (`"part":i,"parts":n`) that each stay under `max_bytes` where a change allows.
    pub fn build<'a>(
        position: i64,
        changes: impl IntoIterator<Item = &'a str>,
        max_bytes: usize,
    ) -> ChangesBody {
        let changes: Vec<&str> = changes.into_iter().collect();
        let total: usize = changes.iter().map(|c| c.len() + 1).sum();
        let budget = max_bytes.saturating_sub(128).max(1);
        let mut groups: Vec<&[&str]> = Vec::new();
        if total <= budget {
            groups.push(&changes[..]);
        } else {
            let mut start = 0;
            let mut size = 0;
            for (i, c) in changes.iter().enumerate() {
                if i > start && size + c.len() + 1 > budget {
                    groups.push(&changes[start..i]);
                    start = i;
                    size = 0;
                }
                size += c.len() + 1;
            }
            groups.push(&changes[start..]);
        }
        let parts = groups.len();
        let parts = groups
            .iter()
            .enumerate()
            .map(|(i, group)| {
                let mut out =
                    String::with_capacity(group.iter().map(|c| c.len() + 1).sum::<usize>() + 64);
                out.push_str("\"position\":");
                crate::changelog::push_int(&mut out, position);
                if parts > 1 {
                    out.push_str(",\"part\":");
                    crate::changelog::push_int(&mut out, i as i64 + 1);
                    out.push_str(",\"parts\":");
                    crate::changelog::push_int(&mut out, parts as i64);
                }
                out.push_str(",\"changes\":[");
                for (j, c) in group.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    out.push_str(c);
                }
                out.push_str("]}");
                out
            })
            .collect();
        ChangesBody {
            parts,
            changes: changes.len(),
        }
    }
}

/// The sending side of a connection's queue.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub connection: u64,
    tx: mpsc::Sender<Outbound>,
}

/// The receiving side, owned by the connection's writer.
pub type OutboxReceiver = mpsc::Receiver<Outbound>;

impl Outbox {
    pub fn new(connection: u64, capacity: usize) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
        (Outbox { connection, tx }, rx)
    }

    /// Queues without waiting; gives the message back when the queue is full or closed.
    pub fn try_send(&self, message: Outbound) -> Result<(), mpsc::error::TrySendError<Outbound>> {
        self.tx.try_send(message)
    }

    /// Queues, waiting for room. Err when the connection is gone.
    pub async fn send(&self, message: Outbound) -> Result<(), Outbound> {
        self.tx.send(message).await.map_err(|e| e.0)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Messages waiting.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_transactions_come_in_parts_that_each_parse() {
        let change = format!("{{\"x\":\"{}\"}}", "a".repeat(300));
        let changes: Vec<&str> = std::iter::repeat_n(change.as_str(), 10).collect();
        let whole = ChangesBody::build(42, changes.clone(), 1 << 20);
        assert_eq!(whole.parts.len(), 1);
        let split = ChangesBody::build(42, changes, 1024);
        assert!(split.parts.len() > 1);
        let mut seen = 0;
        for (i, part) in split.parts.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(&format!("{{{part}")).unwrap();
            assert_eq!(v["position"], 42);
            assert_eq!(v["part"], i as u64 + 1);
            assert_eq!(v["parts"], split.parts.len() as u64);
            seen += v["changes"].as_array().unwrap().len();
            assert!(part.len() <= 1024, "part of {} bytes", part.len());
        }
        assert_eq!(seen, 10);
    }
}
