//! The node's open connections: per-IP admission (the `connections_per_ip` limit) and
//! their queues, for queue-depth metrics and stats.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::hub::Outbox;

#[derive(Default)]
pub struct ConnectionRegistry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Inner {
    per_ip: HashMap<IpAddr, usize>,
    outboxes: HashMap<u64, Outbox>,
}

/// A connection's place in the registry; gives it back on drop.
pub struct Admission {
    registry: Arc<ConnectionRegistry>,
    ip: IpAddr,
    pub id: u64,
}

impl ConnectionRegistry {
    /// Admits one more connection from `ip`, unless it already has `limit`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<Admission> {
        let mut inner = self.inner.lock();
        let count = inner.per_ip.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        crate::metrics::connections(1);
        Some(Admission {
            registry: self.clone(),
            ip,
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    pub fn register_outbox(&self, outbox: Outbox) {
        self.inner.lock().outboxes.insert(outbox.connection, outbox);
    }

    pub fn count(&self) -> usize {
        self.inner.lock().per_ip.values().sum()
    }

    /// (total, largest) messages waiting in connection queues.
    pub fn queue_depths(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        inner
            .outboxes
            .values()
            .map(Outbox::depth)
            .fold((0, 0), |(total, max), d| (total + d, max.max(d)))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut inner = self.registry.inner.lock();
        inner.outboxes.remove(&self.id);
        if let Some(count) = inner.per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                inner.per_ip.remove(&self.ip);
            }
        }
        crate::metrics::connections(-1);
    }
}
