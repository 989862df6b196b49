//! Pages of the log read from the database for catch-up, shared: clients resuming
//! from the same position (after a bridge restart, typically all of them) trigger one
//! read, not one each, and move through the following pages in step.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::changelog::Txn;

/// One page: the transactions after a position.
pub type Page = Arc<Vec<Arc<Txn>>>;

/// The most recent pages by the position they start after; a page being read is
/// read once however many ask for it at the same time.
/// A cached page: the position it starts after, when it was asked for, the page.
type Entry = (i64, Instant, Arc<OnceCell<Page>>);

pub struct PageCache {
    pages: Mutex<VecDeque<Entry>>,
    capacity: usize,
}

/// A page is shared for this long: long enough for a crowd resuming together, short
/// enough that a compaction or a reset of the log is not hidden for long.
const FRESH_FOR: Duration = Duration::from_secs(2);

impl PageCache {
    pub fn new(capacity: usize) -> Self {
        PageCache {
            pages: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
        }
    }

    /// Forgets every page (the log was reset).
    pub fn clear(&self) {
        self.pages.lock().clear();
    }

    /// The page after `after`, from the cache or from `read` (run by one caller; the
    /// others wait for its result, and retry themselves if it failed).
    pub async fn get<E, F, Fut>(&self, after: i64, read: F) -> Result<Page, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<Arc<Txn>>, E>>,
    {
        let cell = {
            let mut pages = self.pages.lock();
            pages.retain(|(_, at, _)| at.elapsed() < FRESH_FOR);
            match pages.iter().find(|(start, _, _)| *start == after) {
                Some((_, _, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(OnceCell::new());
                    pages.push_back((after, Instant::now(), cell.clone()));
                    while pages.len() > self.capacity {
                        pages.pop_front();
                    }
                    cell
                }
            }
        };
        cell.get_or_try_init(|| async { read().await.map(Arc::new) })
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_readers_of_one_page_read_it_once() {
        let cache = Arc::new(PageCache::new(4));
        let reads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (cache, reads) = (cache.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get::<(), _, _>(7, || async {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(Vec::new())
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // A failed read is not cached.
        let failed = cache.get::<&str, _, _>(8, || async { Err("down") }).await;
        assert!(failed.is_err());
        let again = cache
            .get::<&str, _, _>(8, || async { Ok(Vec::new()) })
            .await;
        assert!(again.is_ok());
    }
}
