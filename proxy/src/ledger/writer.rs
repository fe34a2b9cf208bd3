//! The one writer: takes what is queued, writes it in one transaction, and on any error
//! (locked database, full disk, I/O error) logs, waits and retries the same batch, so
//! nothing sent is ever dropped.

use std::{
    path::PathBuf,
    sync::mpsc::{Receiver, TryRecvError},
    time::{Duration, SystemTime},
};

use rusqlite::{Connection, params};
use tracing::{info, warn};

use super::{Counters, OnCommit, Queued, Write};

/// Most writes per transaction: bounds one transaction's time while the queue is long.
const MAX_BATCH: usize = 4096;

const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

pub(super) fn spawn(conn: Connection, queue: Receiver<Queued>, path: PathBuf, on_commit: OnCommit) {
    std::thread::Builder::new()
        .name("wsedge-ledger".into())
        .spawn(move || run(conn, queue, path, on_commit))
        .expect("spawning the ledger writer");
}

fn run(mut conn: Connection, queue: Receiver<Queued>, path: PathBuf, on_commit: OnCommit) {
    let mut batch = Vec::new();
    loop {
        match queue.recv() {
            Ok(write) => batch.push(write),
            // Every sender is gone and everything was written.
            Err(_) => return,
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(write) => batch.push(write),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut wait = FIRST_RETRY;
        let mut failures = 0u32;
        while let Err(e) = apply(&mut conn, &batch) {
            failures += 1;
            warn!(ledger = %path.display(), error = %e, writes = batch.len(), retry_in = ?wait,
                  "ledger write failed; keeping the batch and retrying");
            std::thread::sleep(wait);
            wait = (wait * 2).min(LAST_RETRY);
        }
        if failures > 0 {
            info!(ledger = %path.display(), writes = batch.len(), failures, "ledger writes resumed");
        }
        for queued in batch.drain(..) {
            match queued.write {
                Write::Flush(done) => {
                    let _ = done.send(());
                }
                _ => on_commit(queued.at.elapsed()),
            }
        }
    }
}

fn apply(conn: &mut Connection, batch: &[Queued]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for Queued { write, .. } in batch {
        match write {
            Write::Open(row) => {
                // A retried batch may meet its own row: the first insert stands.
                tx.prepare_cached(
                    "INSERT INTO connections (id, function, instance, kind, memory_mb,
                         started_at_ms, last_seen_ms, data_plane)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7) ON CONFLICT (id) DO NOTHING",
                )?
                .execute(params![
                    row.id,
                    row.function,
                    row.instance,
                    row.kind.as_str(),
                    row.memory_mb,
                    ms(row.started_at),
                    row.data_plane
                ])?;
            }
            Write::Checkpoint { at, progress } => {
                // A row opened after the registry snapshot keeps its own start.
                tx.prepare_cached(
                    "UPDATE connections SET last_seen_ms = max(last_seen_ms, ?1)
                     WHERE ended_at_ms IS NULL",
                )?
                .execute(params![ms(*at)])?;
                let mut update = tx.prepare_cached(
                    "UPDATE connections SET bytes_in = ?2, bytes_out = ?3, messages_in = ?4,
                         messages_out = ?5, throttled_ms = ?6, data_plane = ?7
                     WHERE id = ?1 AND ended_at_ms IS NULL",
                )?;
                for p in progress {
                    let c = counters(&p.counters);
                    update.execute(params![p.id, c[0], c[1], c[2], c[3], c[4], p.data_plane])?;
                }
            }
            Write::Finish(row) => {
                // The first end written stands (a connection cut at the end of the drain may
                // be finished twice).
                let c = counters(&row.counters);
                tx.prepare_cached(
                    "UPDATE connections SET ended_at_ms = max(?2, started_at_ms),
                         last_seen_ms = max(last_seen_ms, ?2), status = ?3, close_code = ?4,
                         closed_by = ?5, bytes_in = ?6, bytes_out = ?7, messages_in = ?8,
                         messages_out = ?9, throttled_ms = ?10, data_plane = ?11
                     WHERE id = ?1 AND ended_at_ms IS NULL",
                )?
                .execute(params![
                    row.id,
                    ms(row.ended_at),
                    row.status,
                    row.close_code,
                    row.closed_by.as_str(),
                    c[0],
                    c[1],
                    c[2],
                    c[3],
                    c[4],
                    row.data_plane
                ])?;
            }
            Write::Flush(_) => {}
        }
    }
    tx.commit()
}

/// SQLite integers are signed: counters past i64::MAX (never reached) saturate.
fn counters(c: &Counters) -> [i64; 5] {
    [
        c.bytes_in,
        c.bytes_out,
        c.messages_in,
        c.messages_out,
        c.throttled_ms,
    ]
    .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

pub(super) fn ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
