//! The node's window of recent transactions: a subscriber resuming from a position
//! inside it is served from memory, without a query.

use std::collections::VecDeque;
use std::sync::Arc;

use super::Txn;

/// The newest committed transactions, complete after `start`: every transaction with
/// a change after `start` and at or before the newest `last` is here.
#[derive(Debug)]
pub struct RecentWindow {
    txns: VecDeque<Arc<Txn>>,
    start: i64,
    changes: usize,
    max_changes: usize,
    bytes: usize,
    max_bytes: usize,
}

impl RecentWindow {
    /// An empty window whose coverage begins after `start`, holding at most
    /// `max_changes` changes and about `max_bytes` bytes.
    pub fn new(start: i64, max_changes: usize, max_bytes: usize) -> Self {
        RecentWindow {
            txns: VecDeque::new(),
            start,
            changes: 0,
            max_changes,
            bytes: 0,
            max_bytes,
        }
    }

    /// Whether everything after `after` (up to the newest transaction) is held here.
    pub fn covers(&self, after: i64) -> bool {
        after >= self.start
    }

    /// The position the window's coverage begins after.
    pub fn start(&self) -> i64 {
        self.start
    }

    pub fn len_changes(&self) -> usize {
        self.changes
    }

    /// Adds the next transaction, evicting the oldest ones beyond the bound (the
    /// newest transaction is always kept, however large).
    pub fn push(&mut self, txn: Arc<Txn>) {
        self.changes += txn.change_count();
        self.bytes += txn.approx_bytes();
        self.txns.push_back(txn);
        while (self.changes > self.max_changes || self.bytes > self.max_bytes)
            && self.txns.len() > 1
        {
            if let Some(old) = self.txns.pop_front() {
                self.changes -= old.change_count();
                self.bytes -= old.approx_bytes();
                self.start = old.last;
            }
        }
    }

    /// Forgets everything and starts over after `start` (the reader lost its place).
    pub fn reset(&mut self, start: i64) {
        self.txns.clear();
        self.changes = 0;
        self.bytes = 0;
        self.start = start;
    }

    /// Up to `max` transactions with changes after `after`, oldest first. `after` must
    /// be covered.
    pub fn after(&self, after: i64, max: usize) -> Vec<Arc<Txn>> {
        let first = self.txns.partition_point(|t| t.last <= after);
        self.txns.range(first..).take(max).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(after: i64, last: i64) -> Arc<Txn> {
        Arc::new(Txn {
            after,
            last,
            tx: 0,
            committed_at_micros: 0,
            tables: vec![super::super::TableChanges {
                relation: 1,
                name: None,
                changes: (after + 1..=last)
                    .map(|p| super::super::Change {
                        position: p,
                        op: super::super::Op::Insert,
                        json: "{}".into(),
                        entry: serde_json::value::RawValue::from_string("[]".into()).unwrap(),
                    })
                    .collect(),
            }],
        })
    }

    #[test]
    fn evicts_oldest_and_moves_its_start() {
        let mut w = RecentWindow::new(0, 5, usize::MAX);
        w.push(txn(0, 3));
        w.push(txn(3, 5));
        assert!(w.covers(0));
        w.push(txn(5, 7)); // 7 changes > 5: the first goes
        assert!(!w.covers(0));
        assert!(w.covers(3));
        assert_eq!(w.start(), 3);
        let after: Vec<i64> = w.after(4, 10).iter().map(|t| t.last).collect();
        assert_eq!(after, vec![5, 7]);
        let after: Vec<i64> = w.after(5, 10).iter().map(|t| t.last).collect();
        assert_eq!(after, vec![7]);
    }
}
