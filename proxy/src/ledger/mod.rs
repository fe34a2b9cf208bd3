//! The billing ledger: one SQLite row per accepted connection in `state_dir/ledger.db`,
//! written when the connection is accepted, checkpointed while it is open and finished when
//! it ends. One writer thread owns the database; everyone else sends it [`Write`]s over a
//! channel that never blocks, so neither accept nor the data planes wait on the disk.
//!
//! After a crash the rows left open are finished at the next start (`interrupted`, 500)
//! with their last checkpoint as their end: [`CHECKPOINT_EVERY`] bounds what a crash loses.

mod billing;
mod ending;
mod query;
pub mod report;
mod schema;
mod writer;

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

pub use billing::{Interval, Measure, measure};
pub use ending::{ClosedBy, how_it_closed};
pub use query::{Filter, InstanceBill, LedgerRow, Reader, parse_since};

/// The ledger's file in `state_dir`.
pub const FILE: &str = "ledger.db";

/// How often open connections' counters and liveness are written: the most a crash can take
/// off a connection's billed time.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("state_dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state_dir {0} is in use by another wsedge (its recovery would finish that one's open connections)"
    )]
    InUse(PathBuf),
    #[error("no ledger at {0} (wsedge has not run with this state_dir)")]
    Missing(PathBuf),
    #[error("the ledger writer did not confirm its writes within {0:?}")]
    FlushTimeout(Duration),
    #[error(
        "since: {0:?} is neither an RFC 3339 time, a date (YYYY-MM-DD) nor a duration ago (e.g. 1h)"
    )]
    Since(String),
}

/// What kind of connection a row bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    WebSocket,
    /// One plain HTTP request on a function's route.
    Http,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WebSocket => "websocket",
            Kind::Http => "http",
        }
    }
}

/// A connection's counters as a row records them (in: client -> function).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub throttled_ms: u64,
}

/// A connection accepted: its row, open.
#[derive(Debug, Clone)]
pub struct Opened {
    pub id: String,
    pub function: String,
    pub instance: String,
    pub kind: Kind,
    /// The function's `memory_mb` now: a later config change does not rewrite the bill.
    pub memory_mb: u32,
    pub started_at: SystemTime,
    pub data_plane: &'static str,
}

/// An open connection's counters at a checkpoint.
#[derive(Debug, Clone)]
pub struct Progress {
    pub id: String,
    pub counters: Counters,
    pub data_plane: &'static str,
}

/// A connection ended.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: String,
    pub ended_at: SystemTime,
    pub status: u16,
    pub close_code: Option<u16>,
    pub closed_by: ClosedBy,
    pub counters: Counters,
    pub data_plane: &'static str,
}

/// One change for the writer, applied in the order sent.
#[derive(Debug)]
pub(crate) enum Write {
    Open(Opened),
    /// Every open row was alive at `at`; `progress`: those whose counters changed.
    Checkpoint {
        at: SystemTime,
        progress: Vec<Progress>,
    },
    Finish(Finished),
    /// Answered once everything sent before it is committed.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A [`Write`] and when it was sent: the writer reports how long each waited to commit.
pub(crate) struct Queued {
    pub(crate) at: std::time::Instant,
    pub(crate) write: Write,
}

/// Called by the writer with each change's time from sent to committed.
pub type OnCommit = Box<dyn Fn(Duration) + Send>;

/// How long a start waits for a database another process holds locked.
const START_WAIT: Duration = Duration::from_secs(10);

/// Opens the writer's connection and finishes the previous run's open rows, waiting (with
/// warnings) while another process holds the database locked.
fn open_and_recover(path: &Path) -> rusqlite::Result<(rusqlite::Connection, usize)> {
    let deadline = std::time::Instant::now() + START_WAIT;
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = schema::open_writer(path).and_then(|conn| {
            let recovered = schema::recover(&conn)?;
            Ok((conn, recovered))
        });
        match attempt {
            Err(e) if locked(&e) && std::time::Instant::now() < deadline => {
                warn!(ledger = %path.display(), error = %e, retry_in = ?wait,
                      "ledger locked at start; retrying");
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

fn locked(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The file in `state_dir` one wsedge holds locked while it runs.
const LOCK_FILE: &str = "wsedge.lock";

/// The handle services write through; cheap to share.
pub struct Ledger {
    path: PathBuf,
    writes: mpsc::Sender<Queued>,
    /// Held (locked) for the process's life; the kernel drops the lock when it dies.
    _lock: std::fs::File,
}

impl Ledger {
    /// Opens (creating `state_dir` and the file if needed) `state_dir/ledger.db`, finishes
    /// the rows a previous run left open, and starts the writer; `lag` hears how long each
    /// change waited from sent to committed.
    pub fn open(
        state_dir: &Path,
        lag: impl Fn(Duration) + Send + 'static,
    ) -> Result<Ledger, LedgerError> {
        std::fs::create_dir_all(state_dir).map_err(|source| LedgerError::StateDir {
            path: state_dir.into(),
            source,
        })?;
        // One wsedge per ledger: a second one's start-up recovery would take the first one's
        // open rows for a crash's and finish them.
        let lock_path = state_dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| LedgerError::StateDir {
                path: lock_path.clone(),
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::InUse(state_dir.into()));
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(LedgerError::StateDir {
                    path: lock_path,
                    source,
                });
            }
        }
        let path = state_dir.join(FILE);
        let sqlite = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let (conn, recovered) = open_and_recover(&path).map_err(sqlite)?;
        if recovered > 0 {
            warn!(
                connections = recovered,
                ledger = %path.display(),
                "wsedge stopped without draining: its open connections are finished as interrupted (status 500) at their last checkpoint"
            );
        }
        info!(ledger = %path.display(), "billing ledger ready");
        let (writes, queue) = mpsc::channel();
        writer::spawn(conn, queue, path.clone(), Box::new(lag));
        Ok(Ledger {
            path,
            writes,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open_row(&self, row: Opened) {
        self.send(Write::Open(row));
    }

    pub fn checkpoint(&self, at: SystemTime, progress: Vec<Progress>) {
        self.send(Write::Checkpoint { at, progress });
    }

    pub fn finish(&self, row: Finished) {
        self.send(Write::Finish(row));
    }

    fn send(&self, write: Write) {
        // The writer lives as long as the process; this fails only if its thread panicked.
        let queued = Queued {
            at: std::time::Instant::now(),
            write,
        };
        if self.writes.send(queued).is_err() {
            warn!(ledger = %self.path.display(), "the ledger writer has stopped; a write is lost");
        }
    }

    /// Waits (`within` at most) until everything sent so far is committed.
    pub async fn flush(&self, within: Duration) -> Result<(), LedgerError> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.send(Write::Flush(done));
        match tokio::time::timeout(within, committed).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(LedgerError::FlushTimeout(within)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_wsedge_on_the_same_state_dir_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ledger::open(dir.path(), |_| {}).unwrap();
        let err = Ledger::open(dir.path(), |_| {}).err().expect("refused");
        assert!(matches!(err, LedgerError::InUse(_)), "{err}");
        drop(first);
        Ledger::open(dir.path(), |_| {}).expect("free again");
    }

    #[test]
    fn a_start_waits_for_a_database_held_locked_and_recovers_its_open_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let setup = schema::open_writer(&path).unwrap();
        setup
            .execute(
                "INSERT INTO connections (id, function, instance, kind, memory_mb,
                     started_at_ms, last_seen_ms, data_plane)
                 VALUES ('a-1', 'echo', 'echo-1', 'websocket', 128, 1000, 3000, 'kernel')",
                [],
            )
            .unwrap();
        setup.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            setup.execute_batch("COMMIT").unwrap();
        });
        let started = std::time::Instant::now();
        Ledger::open(dir.path(), |_| {}).expect("opened once the lock is released");
        assert!(started.elapsed() >= Duration::from_millis(600));
        release.join().unwrap();
        let rows = Reader::open(dir.path())
            .unwrap()
            .rows(&Filter::default())
            .unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            (r.status, r.closed_by.as_deref(), r.duration_ms),
            (Some(500), Some("interrupted"), 2000),
            "ended at its last checkpoint: {r:?}"
        );
    }
}
