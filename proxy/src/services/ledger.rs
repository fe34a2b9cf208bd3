//! What the services write to the billing ledger: a row when a connection is accepted, its
//! counters every [`CHECKPOINT_EVERY`] while it is open, its end.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use proxy_common::{
    SideState,
    policy::{Ending, function_status},
};

use crate::{
    app::AppState,
    conn::{Connection, throttled_ms},
    ledger::{CHECKPOINT_EVERY, Counters, Finished, Kind, Opened, Progress, how_it_closed},
};

/// Opens the row of a connection just registered (or of a plain HTTP request answered).
pub fn accepted(state: &AppState, conn: &Connection, memory_mb: u32, kind: Kind) {
    state.ledger.open_row(Opened {
        id: conn.id.to_string(),
        function: conn.function.to_string(),
        instance: conn.instance.to_string(),
        kind,
        memory_mb,
        started_at: conn.started_at,
        data_plane: conn.plane().as_str(),
    });
}

/// Finishes the row of a connection that ended with `result`, its final counters in `sides`.
/// A socket error is read through the stop the proxy asked for, if any (a connection cut at
/// the end of the drain), else as the sockets closing: what the close frames say, or the
/// client dropping TCP.
pub fn ended(
    state: &AppState,
    conn: &Connection,
    result: &std::io::Result<Ending>,
    sides: [SideState; 2],
) {
    let [inbound, outbound] = sides;
    let ending = match result {
        Ok(ending) => *ending,
        Err(_) => conn.stop_reason().unwrap_or(Ending::Closed),
    };
    let (closed_by, close_code) = how_it_closed(ending, &inbound, &outbound);
    state.ledger.finish(Finished {
        id: conn.id.to_string(),
        ended_at: SystemTime::now(),
        status: function_status(ending, &inbound, &outbound),
        close_code,
        closed_by,
        counters: counters(&sides),
        data_plane: conn.plane().as_str(),
    });
}

pub fn counters([inbound, outbound]: &[SideState; 2]) -> Counters {
    Counters {
        bytes_in: inbound.bytes,
        bytes_out: outbound.bytes,
        messages_in: inbound.messages,
        messages_out: outbound.messages,
        throttled_ms: throttled_ms(inbound),
    }
}

/// Every [`CHECKPOINT_EVERY`]: marks every open row alive and writes the counters of those
/// that changed since the last checkpoint (kernel counters read live from the maps).
pub async fn checkpoints(state: Arc<AppState>) {
    let mut ticks = tokio::time::interval(CHECKPOINT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: HashMap<(u64, u64), (Counters, &'static str)> = HashMap::new();
    loop {
        ticks.tick().await;
        let at = SystemTime::now();
        let open = state.registry.snapshot();
        let mut progress = Vec::new();
        let mut seen = HashMap::with_capacity(open.len());
        for conn in &open {
            let (sides, _) = conn.totals(state.data_plane.live());
            let now = (counters(&sides), conn.plane().as_str());
            let key = (conn.id.epoch_ms, conn.id.key);
            if written.get(&key) != Some(&now) {
                progress.push(Progress {
                    id: conn.id.to_string(),
                    counters: now.0,
                    data_plane: now.1,
                });
            }
            seen.insert(key, now);
        }
        written = seen;
        state.ledger.checkpoint(at, progress);
    }
}
