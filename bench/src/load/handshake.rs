//! Handshake workload: each worker loops connect, upgrade, one echo, close. It measures
//! what a connection costs to set up and tear down, which for the proxy includes installing
//! and removing per-connection kernel state.

use std::time::{Duration, Instant};

use mio::{Registry, Token};

use super::meter::{Meter, Stage};
use super::{Client, Ctx, DRAIN, HANDSHAKE_TIMEOUT, LoadConfig, Msg, Target, pending, poll_once};
use crate::sys;
use crate::ws::{self, OPCODE_BINARY, OPCODE_CLOSE};

/// Pause before a failed worker retries, so a dead target is not hammered in a hot loop.
const RETRY: Duration = Duration::from_millis(10);
const SLOT_BITS: usize = 24;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Idle,
    Upgrade,
    Echo,
    Closing,
}

struct Worker {
    client: Client,
    /// Distinguishes this worker's current socket from its earlier ones in stale events.
    generation: usize,
    step: Step,
    retry_at: Instant,
    ever_upgraded: bool,
}

/// Returns (workers that upgraded at least once, RSS when the window opened).
pub(super) fn run(ctx: &mut Ctx, m: &mut Meter, cfg: &LoadConfig) -> (usize, u64) {
    let workers = cfg.connections.min(1 << SLOT_BITS);
    let filler: Vec<u8> = (0..cfg.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut msg = Vec::with_capacity(cfg.size + 14);
    let mut close = Vec::new();
    ws::write_frame(
        &mut close,
        OPCODE_CLOSE,
        Some(ctx.rng.mask()),
        &1000u16.to_be_bytes(),
    );
    let now = Instant::now();
    let mut slots: Vec<Worker> = (0..workers)
        .map(|i| Worker {
            client: Client::dead(Token(i)),
            generation: 0,
            step: Step::Idle,
            retry_at: now,
            ever_upgraded: false,
        })
        .collect();
    let mut rss_after = None;
    let mut drain_until = None;
    loop {
        let now = Instant::now();
        let stage = m.tick(now);
        if stage == Stage::Window && rss_after.is_none() {
            rss_after = Some(sys::rss_kb(&cfg.rss_pids));
        }
        if stage == Stage::Drain {
            let until = *drain_until.get_or_insert(now + DRAIN);
            if now >= until || slots.iter().all(|w| w.step == Step::Idle) {
                break;
            }
        }
        for (i, w) in slots.iter_mut().enumerate() {
            if w.step != Step::Idle && now.duration_since(w.client.started) > HANDSHAKE_TIMEOUT {
                match w.step {
                    Step::Upgrade => m.connect_errors += 1,
                    _ => m.errors += 1,
                }
                fail(w, now);
            }
            if w.step == Step::Idle && stage != Stage::Drain && now >= w.retry_at {
                start(ctx.poll.registry(), &ctx.target, m, w, i);
            }
        }
        let timeout = m.until_next_stage(now).min(RETRY);
        if poll_once(ctx, timeout).is_err() {
            continue;
        }
        for ev in ctx.events.iter() {
            let slot = ev.token().0 & ((1 << SLOT_BITS) - 1);
            let Some(w) = slots.get_mut(slot) else {
                continue;
            };
            if w.generation != ev.token().0 >> SLOT_BITS || w.step == Step::Idle {
                continue;
            }
            let registry = ctx.poll.registry();
            let c = &mut w.client;
            if w.step == Step::Upgrade {
                match c.advance(registry, &ctx.target, &mut ctx.rng, &mut ctx.scratch) {
                    Ok(true) => {
                        m.on_handshake();
                        m.on_tls_session(c);
                        w.ever_upgraded = true;
                        msg.clear();
                        ws::write_frame(&mut msg, OPCODE_BINARY, Some(ctx.rng.mask()), &filler);
                        match c.send(registry, &[&msg]) {
                            Ok(()) => {
                                m.on_sent();
                                w.step = Step::Echo;
                            }
                            Err(_) => {
                                m.errors += 1;
                                fail(w, Instant::now());
                            }
                        }
                    }
                    Ok(false) if pending(c) => {}
                    _ => {
                        m.connect_errors += 1;
                        fail(w, Instant::now());
                    }
                }
                continue;
            }
            let (mut echoed, mut closed) = (false, false);
            let mut r = if ev.is_writable() {
                c.flush(registry).map(|_| false)
            } else {
                Ok(false)
            };
            if r.is_ok() {
                let hup = ev.is_read_closed() || ev.is_error();
                r = c.read_msgs(registry, &mut ctx.scratch, hup, |msg| match msg {
                    Msg::Data(_) => echoed = true,
                    Msg::Close => closed = true,
                });
            }
            let eof = matches!(r, Ok(true));
            if w.step == Step::Echo && echoed {
                let rtt = c.started.elapsed().as_nanos() as u64;
                if m.measuring() {
                    m.received += 1;
                    m.record(rtt);
                }
                if c.send(registry, &[&close]).is_err() {
                    m.errors += 1;
                    fail(w, Instant::now());
                    continue;
                }
                w.step = Step::Closing;
            }
            if w.step == Step::Closing && (closed || eof) {
                m.iterations += m.measuring() as u64;
                w.client.kill();
                w.step = Step::Idle;
                w.retry_at = Instant::now();
                if m.stage != Stage::Drain {
                    start(registry, &ctx.target, m, w, slot);
                }
            } else if r.is_err() || eof || closed {
                m.errors += 1;
                fail(w, Instant::now());
            }
        }
    }
    m.close();
    let est = slots.iter().filter(|w| w.ever_upgraded).count();
    (est, rss_after.unwrap_or(0))
}

fn start(registry: &Registry, target: &Target, m: &mut Meter, w: &mut Worker, slot: usize) {
    w.generation = (w.generation + 1) & ((1 << (usize::BITS as usize - SLOT_BITS)) - 1);
    let token = Token(w.generation << SLOT_BITS | slot);
    match Client::connect(registry, target, token) {
        Ok(c) => {
            w.client = c;
            w.step = Step::Upgrade;
        }
        Err(_) => {
            m.connect_errors += 1;
            fail(w, Instant::now());
        }
    }
}

fn fail(w: &mut Worker, now: Instant) {
    w.client.kill();
    w.step = Step::Idle;
    w.retry_at = now + RETRY;
}
