//! Host facts the benchmark reports alongside its own numbers: descriptor limit, whole-machine
//! CPU from /proc/stat (the proxy's cost includes softirq and kworker time no per-process
//! counter shows), where that CPU went (per CPU, context switches, cross-CPU interrupts) and
//! the resident memory of the processes under test.

use std::{fs, io};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Aggregate CPU jiffies from the first `cpu` line of /proc/stat.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

pub fn cpu_times() -> CpuTimes {
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_cpu_line(s.lines().next()?))
        .unwrap_or_default()
}

fn parse_cpu_line(line: &str) -> Option<CpuTimes> {
    let mut it = line.split_ascii_whitespace();
    if it.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already included in user/nice, so it is left out of both sums.
    let f: Vec<u64> = it.take(8).map(|v| v.parse().unwrap_or(0)).collect();
    if f.len() < 4 {
        return None;
    }
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Some(CpuTimes {
        busy,
        total: busy + get(3) + get(4),
    })
}

/// Counters that say where the machine's CPU went: busy jiffies per CPU, context switches and
/// the cross-CPU interrupts (rescheduling and function-call IPIs) a wake-up on another CPU
/// costs. Summed over the whole machine, like [`CpuTimes`].
///
/// `process_ticks` and `kthread_ticks` are the part of the machine's CPU the run itself used:
/// the processes under test (user and system time, which with tick accounting includes the
/// softirq work, loopback delivery among it, done while they ran) and the kernel's worker and
/// softirq threads. Unlike the whole-machine figure, other work on a shared machine (someone
/// compiling) hardly shows in them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    pub busy_by_cpu: Vec<u64>,
    /// Idle and iowait jiffies per CPU. Unlike the busy ones, which the timer tick samples
    /// (and a CPU woken by a timer in step with the tick, then idle again before the next,
    /// is never seen busy), the kernel measures these to the nanosecond when idle ticks are
    /// stopped: elapsed time minus idle is the exact busy time.
    pub idle_by_cpu: Vec<u64>,
    pub context_switches: u64,
    pub resched_ipis: u64,
    pub call_ipis: u64,
    pub process_ticks: u64,
    pub kthread_ticks: u64,
}

impl HostCounters {
    /// The machine's counters now, with `pids` (and this process) as the processes under test.
    pub fn now(pids: &[u32]) -> HostCounters {
        let mut c = HostCounters::default();
        if let Ok(stat) = fs::read_to_string("/proc/stat") {
            c.parse_stat(&stat);
        }
        if let Ok(irqs) = fs::read_to_string("/proc/interrupts") {
            c.parse_interrupts(&irqs, c.busy_by_cpu.len());
        }
        let me = std::process::id();
        c.process_ticks = std::iter::once(me)
            .chain(pids.iter().copied().filter(|&p| p != me))
            .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .filter_map(|s| task_ticks(&s).map(|(_, t)| t))
            .sum();
        c.kthread_ticks = kernel_worker_ticks();
        c
    }

    fn parse_stat(&mut self, stat: &str) {
        for line in stat.lines() {
            let Some((name, _)) = line.split_once(' ') else {
                continue;
            };
            let per_cpu = name
                .strip_prefix("cpu")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if per_cpu {
                // The same fields as the aggregate line: reuse its parser.
                if let Some(t) = parse_cpu_line(&format!("cpu{}", &line[name.len()..])) {
                    self.busy_by_cpu.push(t.busy);
                    self.idle_by_cpu.push(t.total - t.busy);
                }
            } else if name == "ctxt" {
                self.context_switches = line[4..].trim().parse().unwrap_or(0);
            }
        }
    }

    /// `RES:` and `CAL:` rows of /proc/interrupts: one count per CPU, then a description.
    fn parse_interrupts(&mut self, text: &str, cpus: usize) {
        for line in text.lines() {
            let mut it = line.split_ascii_whitespace();
            let slot = match it.next() {
                Some("RES:") => &mut self.resched_ipis,
                Some("CAL:") => &mut self.call_ipis,
                _ => continue,
            };
            *slot = it
                .take(cpus.max(1))
                .map_while(|v| v.parse::<u64>().ok())
                .sum();
        }
    }

    /// What happened between `earlier` and `self` (per-CPU lists matched by position).
    pub fn since(&self, earlier: &HostCounters) -> HostCounters {
        HostCounters {
            busy_by_cpu: self
                .busy_by_cpu
                .iter()
                .zip(earlier.busy_by_cpu.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            idle_by_cpu: self
                .idle_by_cpu
                .iter()
                .zip(earlier.idle_by_cpu.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            context_switches: self
                .context_switches
                .saturating_sub(earlier.context_switches),
            resched_ipis: self.resched_ipis.saturating_sub(earlier.resched_ipis),
            call_ipis: self.call_ipis.saturating_sub(earlier.call_ipis),
            process_ticks: self.process_ticks.saturating_sub(earlier.process_ticks),
            kthread_ticks: self.kthread_ticks.saturating_sub(earlier.kthread_ticks),
        }
    }
}

/// (command name, user + system ticks) from a `/proc/PID/stat` line. The name is in
/// parentheses and may hold spaces, so fields are counted after the last `)`.
fn task_ticks(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let (name, rest) = stat[open + 1..].rsplit_once(')')?;
    // After the name: state(3) ... utime(14) stime(15), 1-based over the whole line.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((name, utime + stime))
}

/// CPU ticks of the kernel's workqueue and softirq threads (`kworker/*`, `ksoftirqd/*`): where
/// the kernel data plane's deferred work (sockmap redirects, psock backlogs) runs. A worker
/// that exits between two readings takes its ticks with it; they come and go rarely.
fn kernel_worker_ticks() -> u64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| {
        let name = e.ok()?.file_name();
        name.to_str()?.parse::<u32>().ok()?;
        let stat = fs::read_to_string(format!("/proc/{}/stat", name.to_str()?)).ok()?;
        let (comm, ticks) = task_ticks(&stat)?;
        (comm.starts_with("kworker") || comm.starts_with("ksoftirqd")).then_some(ticks)
    })
    .sum()
}

/// Restricts the calling thread (and so every thread and process it starts afterwards) to
/// `cpu`, so runs of the benchmark put each process in the same place.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks against its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is out of range"),
            ));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock every embedded send timestamp uses, so a
/// backend process on the same machine (push) and the load generator agree on it. Network
/// namespaces do not change it (only a time namespace would).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into an owned timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Sum of VmRSS (kB) over `pids`; a process that is gone counts as 0.
pub fn rss_kb(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_ascii_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// xorshift64*: handshake keys and mask keys need unpredictability across runs, not
/// cryptographic strength, and must not cost a syscall per frame.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let mut b = [0u8; 8];
        // SAFETY: writes at most 8 bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        let mut seed = u64::from_ne_bytes(b);
        if n != 8 {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            seed = t ^ (std::process::id() as u64) << 32;
        }
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_ne_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// A mask key; never all-zero, so masking always changes the bytes on the wire.
    pub fn mask(&mut self) -> [u8; 4] {
        let v = (self.next_u64() >> 32) as u32;
        (if v == 0 { 0x5A5A_5A5A } else { v }).to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_sums_exclude_guest() {
        let t = parse_cpu_line("cpu  10 1 5 100 4 2 3 1 50 50").unwrap();
        assert_eq!((t.busy, t.total), (22, 126));
        assert!(parse_cpu_line("intr 1 2 3").is_none());
    }

    #[test]
    fn host_counters_parse_per_cpu_and_ipis() {
        let mut c = HostCounters::default();
        c.parse_stat(
            "cpu  20 0 10 100 0 0 0 0 0 0\ncpu0 15 0 5 50 0 0 0 0 0 0\n\
             cpu1 5 0 5 50 0 0 0 0 0 0\nintr 1 2\nctxt 777\n",
        );
        c.parse_interrupts(
            "           CPU0       CPU1\n LOC:  9  9  Local timer interrupts\n\
             RES:  3  4  Rescheduling interrupts\n CAL:  10 20 Function call interrupts\n",
            2,
        );
        assert_eq!(
            (c.busy_by_cpu.as_slice(), c.idle_by_cpu.as_slice()),
            (&[20, 10][..], &[50, 50][..])
        );
        assert_eq!(
            (c.context_switches, c.resched_ipis, c.call_ipis),
            (777, 7, 30)
        );
        let later = HostCounters {
            busy_by_cpu: vec![25, 30],
            idle_by_cpu: vec![60, 50],
            context_switches: 800,
            resched_ipis: 9,
            call_ipis: 30,
            ..HostCounters::default()
        };
        let d = later.since(&c);
        assert_eq!(
            (d.busy_by_cpu.as_slice(), d.idle_by_cpu.as_slice()),
            (&[5, 20][..], &[10, 0][..])
        );
        assert_eq!(
            (d.context_switches, d.resched_ipis, d.call_ipis),
            (23, 2, 0)
        );
    }

    #[test]
    fn task_ticks_survive_odd_names() {
        let line = "42 (kworker/0:1 (x)) I 2 0 0 0 -1 69238880 0 0 0 0 7 5 0 0 20 0 1 0";
        assert_eq!(task_ticks(line), Some(("kworker/0:1 (x)", 12)));
        assert!(task_ticks("42 (x) R 1").is_none());
        let own = HostCounters::now(&[]);
        assert!(
            !own.busy_by_cpu.is_empty() && own.context_switches > 0,
            "{own:?}"
        );
    }

    #[test]
    fn monotonic_matches_instant() {
        // std's Instant is CLOCK_MONOTONIC on Linux: a span measured both ways agrees.
        let (a, t) = (monotonic_ns(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (b, e) = (monotonic_ns(), t.elapsed().as_nanos() as u64);
        assert!(b - a >= 20_000_000 && (b - a).abs_diff(e) < 5_000_000);
    }

    #[test]
    fn own_rss_is_visible() {
        assert!(rss_kb(&[std::process::id()]) > 0);
        assert_eq!(rss_kb(&[u32::MAX]), 0);
    }
}
