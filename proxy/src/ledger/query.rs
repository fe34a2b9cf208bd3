//! Reading the ledger, for `GET /billing`, `GET /billing/instances` and `wsedge billing`:
//! a read-only connection, so it works while wsedge writes and while it is stopped.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime},
};

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};

use super::{
    FILE, LedgerError,
    billing::{Interval, measure},
    schema,
    writer::ms,
};

/// One connection's row, as `/billing` shows it. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerRow {
    pub id: String,
    pub function: String,
    pub instance: String,
    pub started_at: String,
    /// `None` while the connection is open.
    pub ended_at: Option<String>,
    /// While open: up to its last checkpoint.
    pub duration_ms: u64,
    /// The function status; `None` while open.
    pub status: Option<u16>,
    pub close_code: Option<u16>,
    /// `client`, `function`, `proxy` or `interrupted`; `None` while open.
    pub closed_by: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub data_plane: String,
    pub kind: String,
    pub throttled_ms: u64,
}

/// One instance's bill, as `/billing/instances` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceBill {
    pub instance: String,
    pub function: String,
    /// Its first connection's start.
    pub started_at: String,
    /// Its last connection's end; `None` while one is open.
    pub ended_at: Option<String>,
    /// The time at least one of its connections was open.
    pub billed_ms: u64,
    /// memory_mb / 1024 × billed seconds.
    pub gb_s: f64,
    /// One per connection.
    pub invocations: u64,
}

/// Which rows to read.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Rows of connections open at or after this time: ended then or later, or still open.
    /// Instances are billed from this time on.
    pub since: Option<SystemTime>,
    pub function: Option<String>,
}

/// Parses `since`: an RFC 3339 time (`2026-01-02T03:04:05Z`, fractions and offsets
/// allowed), a UTC date (`2026-01-02`), or a duration ago (`90s`, `15m`, `2h`, `1day`).
pub fn parse_since(text: &str) -> Result<SystemTime, LedgerError> {
    let bad = || LedgerError::Since(text.to_string());
    let text = text.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    if let Some(t) = parse_offset(text) {
        return Ok(t);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(&format!("{text}T00:00:00Z")) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(text).map_err(|_| bad())?;
    SystemTime::now().checked_sub(ago).ok_or_else(bad)
}

/// An RFC 3339 time with a numeric offset (`+02:00`), which humantime does not read.
fn parse_offset(text: &str) -> Option<SystemTime> {
    let (local, offset) = text.split_at(text.len().checked_sub(6)?);
    let sign = match offset.as_bytes()[0] {
        b'+' => 1i64,
        b'-' => -1,
        _ => return None,
    };
    let (h, m) = offset[1..].split_once(':')?;
    let seconds = sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60);
    let local = humantime::parse_rfc3339_weak(local).ok()?;
    // Local time minus its offset is UTC.
    if seconds >= 0 {
        local.checked_sub(Duration::from_secs(seconds as u64))
    } else {
        local.checked_add(Duration::from_secs(seconds.unsigned_abs()))
    }
}

/// A read-only view of a ledger file.
pub struct Reader {
    conn: Connection,
}

/// One row as stored, before formatting.
struct Stored {
    id: String,
    function: String,
    instance: String,
    kind: String,
    memory_mb: u32,
    started_at_ms: i64,
    last_seen_ms: i64,
    ended_at_ms: Option<i64>,
    status: Option<u16>,
    close_code: Option<u16>,
    closed_by: Option<String>,
    counters: [i64; 5],
    data_plane: String,
}

impl Reader {
    /// Opens `state_dir/ledger.db` read-only.
    pub fn open(state_dir: &Path) -> Result<Reader, LedgerError> {
        let path = state_dir.join(FILE);
        if !path.exists() {
            return Err(LedgerError::Missing(path));
        }
        let conn = schema::open_reader(&path).map_err(|source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        })?;
        Ok(Reader { conn })
    }

    /// The rows `filter` selects, oldest first.
    pub fn rows(&self, filter: &Filter) -> rusqlite::Result<Vec<LedgerRow>> {
        Ok(self.stored(filter)?.into_iter().map(row).collect())
    }

    /// Each instance's bill over the rows `filter` selects, by function and instance.
    pub fn instances(&self, filter: &Filter) -> rusqlite::Result<Vec<InstanceBill>> {
        let since = filter.since.map(ms).unwrap_or(i64::MIN);
        let mut by_instance: BTreeMap<(String, String), Vec<Stored>> = BTreeMap::new();
        for s in self.stored(filter)? {
            by_instance
                .entry((s.function.clone(), s.instance.clone()))
                .or_default()
                .push(s);
        }
        Ok(by_instance
            .into_iter()
            .map(|((function, instance), rows)| {
                let intervals: Vec<Interval> = rows
                    .iter()
                    .map(|s| Interval {
                        start_ms: clamp(s.started_at_ms.max(since)),
                        end_ms: clamp(s.ended_at_ms.unwrap_or(s.last_seen_ms)),
                        memory_mb: s.memory_mb,
                    })
                    .collect();
                let bill = measure(&intervals);
                let started = rows.iter().map(|s| s.started_at_ms).min().unwrap_or(0);
                let ended = rows
                    .iter()
                    .map(|s| s.ended_at_ms)
                    .try_fold(0, |last, end| end.map(|e| e.max(last)));
                InstanceBill {
                    instance,
                    function,
                    started_at: rfc3339(started),
                    ended_at: ended.map(rfc3339),
                    billed_ms: bill.billed_ms,
                    gb_s: bill.gb_s(),
                    invocations: rows.len() as u64,
                }
            })
            .collect())
    }

    fn stored(&self, filter: &Filter) -> rusqlite::Result<Vec<Stored>> {
        let mut query = self.conn.prepare_cached(
            "SELECT id, function, instance, kind, memory_mb, started_at_ms, last_seen_ms,
                    ended_at_ms, status, close_code, closed_by, bytes_in, bytes_out,
                    messages_in, messages_out, throttled_ms, data_plane
             FROM connections
             WHERE (?1 IS NULL OR ended_at_ms IS NULL OR ended_at_ms >= ?1)
               AND (?2 IS NULL OR function = ?2)
             ORDER BY started_at_ms, id",
        )?;
        let rows = query.query_map(
            params![filter.since.map(ms), filter.function.as_deref()],
            |r| {
                Ok(Stored {
                    id: r.get(0)?,
                    function: r.get(1)?,
                    instance: r.get(2)?,
                    kind: r.get(3)?,
                    memory_mb: r.get(4)?,
                    started_at_ms: r.get(5)?,
                    last_seen_ms: r.get(6)?,
                    ended_at_ms: r.get(7)?,
                    status: r.get(8)?,
                    close_code: r.get(9)?,
                    closed_by: r.get(10)?,
                    counters: [r.get(11)?, r.get(12)?, r.get(13)?, r.get(14)?, r.get(15)?],
                    data_plane: r.get(16)?,
                })
            },
        )?;
        rows.collect()
    }
}

fn row(s: Stored) -> LedgerRow {
    let [bytes_in, bytes_out, messages_in, messages_out, throttled_ms] =
        s.counters.map(|c| c.max(0) as u64);
    let end = s.ended_at_ms.unwrap_or(s.last_seen_ms);
    LedgerRow {
        id: s.id,
        function: s.function,
        instance: s.instance,
        started_at: rfc3339(s.started_at_ms),
        ended_at: s.ended_at_ms.map(rfc3339),
        duration_ms: (end - s.started_at_ms).max(0) as u64,
        status: s.status,
        close_code: s.close_code,
        closed_by: s.closed_by,
        bytes_in,
        bytes_out,
        messages_in,
        messages_out,
        data_plane: s.data_plane,
        kind: s.kind,
        throttled_ms,
    }
}

fn clamp(ms: i64) -> u64 {
    ms.max(0) as u64
}

fn rfc3339(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(clamp(ms));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_rfc3339_offsets_dates_and_durations_ago() {
        let at = |t: &str| parse_since(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        let utc = at("2026-01-02T03:04:05Z");
        assert_eq!(
            humantime::format_rfc3339(utc).to_string(),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(at("2026-01-02T05:04:05+02:00"), utc);
        assert_eq!(at("2026-01-02T01:04:05-02:00"), utc);
        assert_eq!(
            at("2026-01-02T03:04:05.250Z"),
            utc + Duration::from_millis(250)
        );
        assert_eq!(
            at("2026-01-02"),
            utc - Duration::from_secs(3 * 3600 + 4 * 60 + 5)
        );
        let ago = SystemTime::now().duration_since(at("1h")).unwrap();
        // Loose: the wall clock may be stepped between the two readings.
        assert!(ago > Duration::from_secs(3590) && ago < Duration::from_secs(3660));
        assert!(parse_since("yesterday-ish").is_err());
    }
}
