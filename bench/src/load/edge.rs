//! Edge workload: every connection sends one small message per period, with connections'
//! phases spread evenly so the offered load is smooth. Because all connections share one
//! period, the whole schedule is a single round-robin sequence: send k goes to connection
//! k mod N at t0 + k * period / N, so the timer state is one counter.

use std::io;
use std::time::{Duration, Instant};

use super::meter::{Meter, Stage};
use super::payload::Payloads;
use super::{Client, Ctx, LoadConfig, drain, poll_once, pump, send_one};

/// A send this far behind its slot counts as late (the poll timer has 1 ms resolution).
const LATE: Duration = Duration::from_millis(2);

pub(super) fn run(
    ctx: &mut Ctx,
    m: &mut Meter,
    clients: &mut [Client],
    cfg: &LoadConfig,
) -> io::Result<()> {
    let open: Vec<usize> = (0..clients.len())
        .filter(|&i| clients[i].is_open())
        .collect();
    let n = open.len() as u64;
    let step_ns = 1e9 / cfg.rate / n as f64;
    let mut payloads = Payloads::new(cfg.size, &mut ctx.rng);
    let t0 = Instant::now();
    let due = |k: u64| t0 + Duration::from_nanos((k as f64 * step_ns) as u64);
    let mut k: u64 = 0;
    loop {
        let now = Instant::now();
        if m.tick(now) == Stage::Drain {
            break;
        }
        // Send everything that is due, but at most one round per pass so reads interleave.
        let round_end = k + n;
        while k < round_end && due(k) <= now {
            let c = &mut clients[open[(k % n) as usize]];
            if c.is_open() {
                let at = Instant::now();
                if at.saturating_duration_since(due(k)) > LATE {
                    m.on_late();
                }
                let sent_ns = m.ns(at);
                send_one(ctx.poll.registry(), m, &mut payloads, c, sent_ns);
            }
            k += 1;
        }
        let timeout = due(k)
            .saturating_duration_since(Instant::now())
            .min(m.until_next_stage(now));
        poll_once(ctx, timeout)?;
        for ev in ctx.events.iter() {
            if let Some(c) = clients.get_mut(ev.token().0) {
                pump(c, ev, ctx.poll.registry(), &mut ctx.scratch, m);
            }
        }
    }
    drain(ctx, m, clients);
    Ok(())
}
