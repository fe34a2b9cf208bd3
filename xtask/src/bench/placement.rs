//! Which CPU each process of a run is on. On a 2-CPU machine the scheduler's choice of CPU
//! decides how many wake-ups cross CPUs (an inter-processor interrupt each, expensive in a VM),
//! and it chooses differently from run to run: pinned, every run of every mode puts the load
//! generator, the proxy and the backend in the same place.

use std::{fmt, os::unix::process::CommandExt, process::Command, str::FromStr};

use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use serde_json::{Value, json};

/// The CPUs of a pinned run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpus {
    /// `bench load`.
    pub load: usize,
    /// wsedge, nginx (master and workers) or HAProxy.
    pub proxy: usize,
    /// `bench echo`: the bench's backend, or the function instance wsedge spawns for
    /// `wsedge-zero-hop` (which re-pins itself with `--cpu`, since it inherits wsedge's CPU).
    pub backend: usize,
}

/// `--cpus`: pinned, or left to the scheduler (`none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Pinned(Cpus),
    Unpinned,
}

/// The placement a run uses unless `--cpus` says otherwise; see README, "Benchmark".
pub const DEFAULT: Placement = Placement::Pinned(Cpus {
    load: 0,
    proxy: 1,
    backend: 0,
});

/// What is wrong with a `--cpus` value or with the machine for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// A `role=cpu` pair names no role the bench knows.
    UnknownRole(String),
    /// Not `role=cpu` with a CPU number.
    Malformed(String),
    /// A role given twice, or one of load, proxy and backend missing.
    Roles,
    /// A CPU this process may not run on (absent, offline, or outside its affinity mask).
    Unavailable(usize),
    /// The affinity mask could not be read.
    Affinity(nix::Error),
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementError::UnknownRole(r) => {
                write!(f, "unknown role {r:?} (roles: load, proxy, backend)")
            }
            PlacementError::Malformed(p) => write!(f, "{p:?} is not ROLE=CPU"),
            PlacementError::Roles => {
                write!(
                    f,
                    "give each of load, proxy and backend exactly once, or \"none\""
                )
            }
            PlacementError::Unavailable(cpu) => write!(
                f,
                "CPU {cpu} is not available to this process (use --cpus none, or CPUs it may run on)"
            ),
            PlacementError::Affinity(e) => write!(f, "reading the CPU affinity: {e}"),
        }
    }
}

impl std::error::Error for PlacementError {}

impl FromStr for Placement {
    type Err = PlacementError;

    /// `none`, or `load=0,proxy=1,backend=0` (any order).
    fn from_str(s: &str) -> Result<Placement, PlacementError> {
        if s.trim() == "none" {
            return Ok(Placement::Unpinned);
        }
        let (mut load, mut proxy, mut backend) = (None, None, None);
        for pair in s.split(',').map(str::trim) {
            let (role, cpu) = pair
                .split_once('=')
                .ok_or_else(|| PlacementError::Malformed(pair.into()))?;
            let cpu: usize = cpu
                .trim()
                .parse()
                .map_err(|_| PlacementError::Malformed(pair.into()))?;
            let slot = match role.trim() {
                "load" => &mut load,
                "proxy" => &mut proxy,
                "backend" => &mut backend,
                other => return Err(PlacementError::UnknownRole(other.into())),
            };
            if slot.replace(cpu).is_some() {
                return Err(PlacementError::Roles);
            }
        }
        match (load, proxy, backend) {
            (Some(load), Some(proxy), Some(backend)) => Ok(Placement::Pinned(Cpus {
                load,
                proxy,
                backend,
            })),
            _ => Err(PlacementError::Roles),
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Unpinned => f.write_str("none"),
            Placement::Pinned(c) => {
                write!(f, "load={},proxy={},backend={}", c.load, c.proxy, c.backend)
            }
        }
    }
}

impl Placement {
    pub fn cpus(self) -> Option<Cpus> {
        match self {
            Placement::Pinned(c) => Some(c),
            Placement::Unpinned => None,
        }
    }

    /// Every CPU the placement names is one this process may run on.
    pub fn check(self) -> Result<(), PlacementError> {
        let Some(c) = self.cpus() else {
            return Ok(());
        };
        let allowed = sched_getaffinity(Pid::from_raw(0)).map_err(PlacementError::Affinity)?;
        for cpu in [c.load, c.proxy, c.backend] {
            if !allowed.is_set(cpu).unwrap_or(false) {
                return Err(PlacementError::Unavailable(cpu));
            }
        }
        Ok(())
    }

    /// Threads (or worker processes) to give a proxy: one per CPU it may use, so nginx and
    /// HAProxy do not run two workers time-sliced on one pinned CPU.
    pub fn proxy_threads(self) -> usize {
        match self {
            Placement::Pinned(_) => 1,
            Placement::Unpinned => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// The report's words for it.
    pub fn describe(self) -> String {
        match self {
            Placement::Unpinned => "unpinned (every process wherever the scheduler puts it)".into(),
            Placement::Pinned(c) => format!(
                "load generator on CPU {}, proxy on CPU {}, echo backend (and the zero-hop \
                 instance) on CPU {}; softirq and kworkers run where the kernel puts them",
                c.load, c.proxy, c.backend
            ),
        }
    }

    pub fn to_json(self) -> Value {
        match self.cpus() {
            None => json!("none"),
            Some(c) => json!({ "load": c.load, "proxy": c.proxy, "backend": c.backend }),
        }
    }
}

/// Starts `cmd` on `cpu` only (its threads and children inherit the mask).
pub fn pin(cmd: &mut Command, cpu: usize) {
    let mut set = CpuSet::new();
    // Out of range only for CPUs beyond CpuSet's 1024; `check` has already refused those.
    let _ = set.set(cpu);
    // SAFETY: sched_setaffinity is a plain syscall, safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
        });
    }
}

/// The CPUs `pid`'s threads may run on (`Cpus_allowed_list`), the distinct lists joined by
/// " / " when its threads differ; "gone" when it has exited.
pub fn allowed_cpus(pid: u32) -> String {
    let mut lists: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
            Some(line.trim().to_string())
        })
        .collect();
    lists.sort();
    lists.dedup();
    match lists.is_empty() {
        true => "gone".into(),
        false => lists.join(" / "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_roles_in_any_order() {
        assert_eq!("none".parse(), Ok(Placement::Unpinned));
        assert_eq!(
            "backend=0, load=1,proxy=0".parse(),
            Ok(Placement::Pinned(Cpus {
                load: 1,
                proxy: 0,
                backend: 0
            }))
        );
        assert_eq!(DEFAULT.to_string().parse(), Ok(DEFAULT));
        assert_eq!(
            "load=0,proxy=1".parse::<Placement>(),
            Err(PlacementError::Roles)
        );
        assert_eq!(
            "load=0,load=1,proxy=1,backend=0".parse::<Placement>(),
            Err(PlacementError::Roles)
        );
        assert!(matches!(
            "load=0,proxy=1,echo=0".parse::<Placement>(),
            Err(PlacementError::UnknownRole(_))
        ));
        assert!(matches!(
            "load=x,proxy=1,backend=0".parse::<Placement>(),
            Err(PlacementError::Malformed(_))
        ));
    }

    #[test]
    fn own_mask_is_readable() {
        assert_ne!(allowed_cpus(std::process::id()), "gone");
        assert!(Placement::Unpinned.check().is_ok());
    }
}
