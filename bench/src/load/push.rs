//! Push workload: the backend sends every connection messages at a fixed rate (see
//! [`crate::echo::Push`]) and the client only receives. Each message carries its
//! CLOCK_MONOTONIC send time, so the recorded latency is one-way, backend to client.

use std::io;
use std::time::Instant;

use super::meter::{Meter, Stage};
use super::{Client, Ctx, poll_once, pump};

pub(super) fn run(ctx: &mut Ctx, m: &mut Meter, clients: &mut [Client]) -> io::Result<()> {
    loop {
        let now = Instant::now();
        if m.tick(now) == Stage::Drain {
            return Ok(());
        }
        poll_once(ctx, m.until_next_stage(now))?;
        for ev in ctx.events.iter() {
            if let Some(c) = clients.get_mut(ev.token().0) {
                pump(c, ev, ctx.poll.registry(), &mut ctx.scratch, m);
            }
        }
    }
}
