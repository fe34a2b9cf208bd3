//! The connection supervisor: the idle and execution timers of every open connection, and
//! the close at shutdown. One task for all connections; each is looked
//! at only when one of its deadlines can have passed, so thousands of busy connections cost a
//! few map lookups per idle period, not per second.

use std::{sync::Arc, time::Duration};

use proxy_common::policy::Ending;
use tracing::info;

use crate::{app::AppState, clock::monotonic_ns, conn::Connection, data_plane::Path};

/// How often deadlines are compared with the clock: the timers' resolution.
const TICK: Duration = Duration::from_millis(250);

pub async fn run(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = monotonic_ns();
        for conn in state.registry.snapshot() {
            if now >= conn.next_check_ns() {
                check(&state, &conn, now);
            }
        }
    }
}

/// Ends `conn` if a timer ran out, otherwise schedules its next look.
fn check(state: &AppState, conn: &Connection, now: u64) {
    let ([inbound, outbound], _) = conn.totals(state.data_plane.live());
    // Any frame either way, control frames included, is activity; so is a frame the client
    // sent that waits for its rate (it counts once it goes on, which may be long for a large
    // message at the byte rate).
    let waiting = if inbound.rate.waiting_since_ns != 0 {
        now
    } else {
        0
    };
    let last = conn
        .started_ns
        .max(inbound.last_activity_ns)
        .max(outbound.last_activity_ns)
        .max(waiting);
    let secs = |s: u64| s.saturating_mul(1_000_000_000);
    let idle_at = last.saturating_add(secs(conn.limits.idle_timeout_s));
    let execution_at = conn
        .started_ns
        .saturating_add(secs(conn.limits.execution_timeout_s));
    if now >= execution_at {
        stop(state, conn, Ending::ExecutionTimeout);
    } else if now >= idle_at {
        stop(state, conn, Ending::IdleTimeout);
    } else {
        conn.set_next_check_ns(idle_at.min(execution_at));
    }
}

/// Ends a connection from the proxy's side: close frames with [`proxy_close_code`] to both
/// sides, or TCP cut without one.
///
/// [`proxy_close_code`]: proxy_common::policy::proxy_close_code
pub fn stop(state: &AppState, conn: &Connection, ending: Ending) {
    if !conn.request_stop(ending) {
        return;
    }
    info!(id = %conn.id, ?ending, "the proxy is ending the connection");
    Path::stop(&state.data_plane, conn, ending);
}
