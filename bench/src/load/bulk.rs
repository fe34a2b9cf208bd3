//! Bulk workload: each connection keeps exactly one large message in flight, so throughput
//! is bounded by the round trip and by how fast the path copies bytes, not by a schedule.

use std::io;
use std::time::Instant;

use super::meter::{Meter, Stage};
use super::payload::Payloads;
use super::{Client, Ctx, LoadConfig, drain, poll_once, pump, send_one};

pub(super) fn run(
    ctx: &mut Ctx,
    m: &mut Meter,
    clients: &mut [Client],
    cfg: &LoadConfig,
) -> io::Result<()> {
    let mut payloads = Payloads::new(cfg.size, &mut ctx.rng);
    m.tick(Instant::now());
    for c in clients.iter_mut().filter(|c| c.is_open()) {
        let sent_ns = m.now_ns();
        send_one(ctx.poll.registry(), m, &mut payloads, c, sent_ns);
    }
    loop {
        let now = Instant::now();
        if m.tick(now) == Stage::Drain {
            break;
        }
        poll_once(ctx, m.until_next_stage(now))?;
        for ev in ctx.events.iter() {
            let Some(c) = clients.get_mut(ev.token().0) else {
                continue;
            };
            pump(c, ev, ctx.poll.registry(), &mut ctx.scratch, m);
            if c.is_open() && c.in_flight == 0 {
                let sent_ns = m.now_ns();
                send_one(ctx.poll.registry(), m, &mut payloads, c, sent_ns);
            }
        }
    }
    drain(ctx, m, clients);
    Ok(())
}
