//! The write queue, persisted so a restart neither loses a write nor reuses a
//! mutation id. The file is JSON lines, append-only while open:
//!   {"client_id": "...", "next": N}   header (first line, after compaction)
//!   {"add": <mutation>}               a write, before it is ever sent
//!   {"done": <mutation_id>}           its write_result arrived
//! Opening compacts it (a new file with the header and the pending adds, renamed
//! over the old one: atomic). Replays are safe because the bridge applies a
//! (client_id, mutation_id) once and returns the first result to retries.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One mutation as the protocol's `write` carries it (minus `type` and `id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mutation {
    pub table: String,
    pub op: String,
    pub key: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_values: Option<Value>,
    pub mutation_id: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Record {
    Header { client_id: String, next: i64 },
    Add { add: Mutation },
    Done { done: i64 },
}

/// Where the queue lives: a file, or nowhere (tests, throwaway clients).
#[derive(Debug)]
pub struct MutationQueue {
    client_id: String,
    path: Option<PathBuf>,
    file: Option<File>,
    /// Held for the queue's life: two processes sharing a file would hand out the
    /// same mutation ids, and the bridge would answer the second with the first's result.
    _lock: Option<File>,
    next: i64,
    pending: BTreeMap<i64, Mutation>,
}

impl MutationQueue {
    /// A queue kept in memory only: lost on exit (mutation ids start at 1).
    pub fn in_memory(client_id: &str) -> MutationQueue {
        MutationQueue {
            client_id: client_id.into(),
            path: None,
            file: None,
            _lock: None,
            next: clock_start(),
            pending: BTreeMap::new(),
        }
    }

    /// Opens (or creates) the queue file of `client_id`, compacting it.
    pub fn open(path: impl AsRef<Path>, client_id: &str) -> Result<MutationQueue> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::QueueIo {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = File::create(path.with_extension("lock")).map_err(io)?;
        if let Err(e) = lock.try_lock() {
            return Err(Error::QueueLocked {
                path,
                message: e.to_string(),
            });
        }
        // A file without a header (new, emptied or deleted) starts its ids from the
        // clock: ids it handed out before are then all below, so a write can never
        // pass for a retry of an earlier mutation (the bridge would answer it with
        // that mutation's result and apply nothing).
        let mut next = clock_start();
        let mut pending = BTreeMap::new();
        match File::open(&path) {
            Ok(file) => {
                for (i, line) in BufReader::new(file).lines().enumerate() {
                    let line = line.map_err(io)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let record: Record = match serde_json::from_str(&line) {
                        Ok(r) => r,
                        // A torn last line (killed mid-append) was never sent: drop it.
                        Err(_) if is_last_line(&path, i) => break,
                        Err(e) => {
                            return Err(Error::QueueCorrupt {
                                path,
                                line: i + 1,
                                message: e.to_string(),
                            })
                        }
                    };
                    match record {
                        Record::Header {
                            client_id: c,
                            next: n,
                        } => {
                            if c != client_id {
                                return Err(Error::QueueClientMismatch {
                                    path,
                                    found: c,
                                    expected: client_id.into(),
                                });
                            }
                            // A header: the file's own count goes on.
                            next = n;
                        }
                        Record::Add { add } => {
                            next = next.max(add.mutation_id + 1);
                            pending.insert(add.mutation_id, add);
                        }
                        Record::Done { done } => {
                            pending.remove(&done);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Compact: header + pending, written aside and renamed over (atomic).
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(io)?;
            let mut text = line(&Record::Header {
                client_id: client_id.into(),
                next,
            });
            for m in pending.values() {
                text.push_str(&line(&Record::Add { add: m.clone() }));
            }
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io)?;
        Ok(MutationQueue {
            client_id: client_id.into(),
            path: Some(path),
            file: Some(file),
            _lock: Some(lock),
            next,
            pending,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Assigns the next mutation id to `mutation` and persists it (fsync) before
    /// returning, so it is never sent before it is safe on disk.
    pub fn push(&mut self, mut mutation: Mutation) -> Result<Mutation> {
        mutation.mutation_id = self.next;
        self.append(&Record::Add {
            add: mutation.clone(),
        })?;
        self.next += 1;
        self.pending.insert(mutation.mutation_id, mutation.clone());
        Ok(mutation)
    }

    /// The write_result for `mutation_id` arrived: it is settled.
    pub fn complete(&mut self, mutation_id: i64) -> Result<Option<Mutation>> {
        let Some(m) = self.pending.remove(&mutation_id) else {
            return Ok(None);
        };
        self.append(&Record::Done { done: mutation_id })?;
        Ok(Some(m))
    }

    /// Pending mutations in id (= send) order.
    pub fn pending(&self) -> impl Iterator<Item = &Mutation> {
        self.pending.values()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn next_mutation_id(&self) -> i64 {
        self.next
    }

    fn append(&mut self, record: &Record) -> Result<()> {
        let (Some(file), Some(path)) = (self.file.as_mut(), self.path.as_ref()) else {
            return Ok(());
        };
        let io = |source| Error::QueueIo {
            path: path.clone(),
            source,
        };
        // One write call per record, then fsync: a kill leaves at most a torn last line.
        file.write_all(line(record).as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

fn line(record: &Record) -> String {
    let mut s = serde_json::to_string(record).expect("records serialise");
    s.push('\n');
    s
}

fn is_last_line(path: &Path, index: usize) -> bool {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count() == index + 1)
        .unwrap_or(false)
}

/// Microseconds since the Unix epoch: where a queue without a header starts its
/// mutation ids.
fn clock_start() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(1)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(title: &str) -> Mutation {
        Mutation {
            table: "public.items".into(),
            op: "update".into(),
            key: json!({"id": 1}),
            values: Some(json!({"title": title})),
            base_version: None,
            base_values: None,
            mutation_id: 0,
            hlc: None,
        }
    }

    #[test]
    fn ids_survive_a_restart_and_pending_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        let first;
        {
            let mut q = MutationQueue::open(&path, "c").unwrap();
            first = q.push(m("a")).unwrap().mutation_id;
            assert!(
                first > 1_000_000_000_000_000,
                "a new file starts from the clock"
            );
            assert_eq!(q.push(m("b")).unwrap().mutation_id, first + 1);
            assert_eq!(q.push(m("c")).unwrap().mutation_id, first + 2);
            q.complete(first).unwrap();
            q.complete(first + 2).unwrap();
        }
        let mut q = MutationQueue::open(&path, "c").unwrap();
        assert_eq!(
            q.pending().map(|m| m.mutation_id).collect::<Vec<_>>(),
            [first + 1]
        );
        // Settled ids are never reused, even the highest one.
        assert_eq!(q.push(m("d")).unwrap().mutation_id, first + 3);
        q.complete(first + 1).unwrap();
        q.complete(first + 3).unwrap();
        drop(q);
        let q = MutationQueue::open(&path, "c").unwrap();
        assert!(q.is_empty());
        assert_eq!(q.next_mutation_id(), first + 4);
        // Another opener of the same file is refused while one holds it.
        let held = q;
        assert!(matches!(
            MutationQueue::open(&path, "c"),
            Err(Error::QueueLocked { .. })
        ));
        drop(held);
        assert!(matches!(
            MutationQueue::open(&path, "other"),
            Err(Error::QueueClientMismatch { .. })
        ));
    }

    #[test]
    fn an_emptied_file_never_reuses_an_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        let used = {
            let mut q = MutationQueue::open(&path, "c").unwrap();
            let id = q.push(m("a")).unwrap().mutation_id;
            q.complete(id).unwrap();
            id
        };
        // Emptied (or deleted) behind the client's back: the header is gone.
        std::fs::write(&path, "").unwrap();
        let mut q = MutationQueue::open(&path, "c").unwrap();
        assert!(q.push(m("b")).unwrap().mutation_id > used);
        drop(q);
        std::fs::remove_file(&path).unwrap();
        let mut q = MutationQueue::open(&path, "c").unwrap();
        assert!(q.push(m("c")).unwrap().mutation_id > used);
    }

    #[test]
    fn a_torn_last_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.jsonl");
        {
            let mut q = MutationQueue::open(&path, "c").unwrap();
            q.push(m("a")).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"add\": {\"table\"").unwrap();
        drop(f);
        let q = MutationQueue::open(&path, "c").unwrap();
        assert_eq!(q.len(), 1);
    }
}
