//! The ledger's one table and how a connection opens it: WAL, so `wsedge billing` and the
//! admin API read while the writer writes.

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OpenFlags};

/// Version of the table below, in `PRAGMA user_version`: a later layout migrates from it.
const VERSION: i64 = 1;

/// Times are ms since the Unix epoch (UTC). `last_seen_ms` is the last checkpoint: the
/// best-known end of a connection wsedge did not see end.
const CREATE: &str = "
CREATE TABLE IF NOT EXISTS connections (
    id            TEXT PRIMARY KEY NOT NULL,
    function      TEXT NOT NULL,
    instance      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    memory_mb     INTEGER NOT NULL,
    started_at_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    ended_at_ms   INTEGER,
    status        INTEGER,
    close_code    INTEGER,
    closed_by     TEXT,
    bytes_in      INTEGER NOT NULL DEFAULT 0,
    bytes_out     INTEGER NOT NULL DEFAULT 0,
    messages_in   INTEGER NOT NULL DEFAULT 0,
    messages_out  INTEGER NOT NULL DEFAULT 0,
    data_plane    TEXT NOT NULL,
    throttled_ms  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS connections_by_start ON connections (started_at_ms);
CREATE INDEX IF NOT EXISTS connections_open ON connections (id) WHERE ended_at_ms IS NULL;
";

/// The writer's connection: creates the file and the table if needed. A short busy timeout:
/// a locked database is the writer's to retry with backoff (and to log), not SQLite's to wait
/// on silently.
pub(super) fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_millis(250))?;
    // WAL survives in the file; setting it again is a no-op.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL in WAL mode: a power loss can lose the last commits, never corrupt the file;
    // the checkpoints already accept losing the last seconds.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < VERSION {
        conn.execute_batch(CREATE)?;
        conn.pragma_update(None, "user_version", VERSION)?;
    }
    Ok(conn)
}

/// A reader's connection: never creates or changes the file.
pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Finishes every row still open: wsedge stopped without seeing those connections end
/// (crash, kill -9). Each ends at its last checkpoint. Runs before this process opens any
/// row, so only a previous run's rows are open.
pub(super) fn recover(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE connections SET ended_at_ms = last_seen_ms, status = 500, closed_by = 'interrupted'
         WHERE ended_at_ms IS NULL",
        [],
    )
}
