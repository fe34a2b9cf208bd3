//! An instance's resource limits: `memory_mb`, `pids_max` and `cpu`, enforced by cgroup
//! controllers. cgroup v2 where the host delegates the `memory`, `pids` and `cpu` controllers
//! to wsedge's tree (current distributions); otherwise the v1 hierarchies (hosts with the
//! hybrid layout, whose v2 tree carries no such controller). Each instance gets a directory
//! per controller, named like its v2 cgroup (wsedge's pid first), which the child joins
//! before it executes the command.

use std::{
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// The limits of one function's instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceLimits {
    pub memory_mb: u32,
    pub pids_max: u32,
    pub cpu: f64,
}

/// The CFS period the CPU quota is expressed in (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where the limits are enforced.
#[derive(Debug, Clone)]
pub enum Hierarchy {
    /// The v2 tree has the controllers: limits go into each instance's v2 cgroup.
    V2,
    /// One v1 hierarchy per controller (`memory`, `pids`, `cpu` mount points), with a
    /// `wsedge` directory in each.
    V1 { roots: [PathBuf; 3] },
}

impl Hierarchy {
    /// Picks v2 when `v2_server_dir`'s parent delegates every controller (enabling them for
    /// its children), else the v1 hierarchies; `None` when neither can limit an instance.
    pub fn detect(v2_server_dir: Option<&Path>) -> Option<Hierarchy> {
        if let Some(dir) = v2_server_dir
            && enable_v2(dir).is_ok()
        {
            return Some(Hierarchy::V2);
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mut roots: [Option<PathBuf>; 3] = Default::default();
        for line in mounts.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut fs_fields = right.split(' ');
            if fs_fields.next() != Some("cgroup") {
                continue;
            }
            let options = fs_fields.nth(1).unwrap_or_default();
            let Some(mount) = left.split(' ').nth(4) else {
                continue;
            };
            for (i, controller) in CONTROLLERS.iter().enumerate() {
                if options.split(',').any(|o| o == *controller) {
                    roots[i] = Some(Path::new(mount).join("wsedge"));
                }
            }
        }
        let [Some(memory), Some(pids), Some(cpu)] = roots else {
            return None;
        };
        let roots = [memory, pids, cpu];
        for root in &roots {
            fs::create_dir_all(root).ok()?;
        }
        Some(Hierarchy::V1 { roots })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Hierarchy::V2 => "cgroup v2",
            Hierarchy::V1 { .. } => "cgroup v1",
        }
    }
}

/// Turns the controllers on for the children of `dir` (and of every ancestor up to the v2
/// mount, which must offer them).
fn enable_v2(dir: &Path) -> io::Result<()> {
    // From the top (the cgroup2 mount, then wsedge's own directory) down: a directory is
    // offered only what its parent enabled for its children. A host whose init system
    // delegates the controllers has them enabled already; a bare one (a container, a VM
    // without systemd) gets them enabled here.
    let chain: Vec<&Path> = dir.ancestors().take(3).collect();
    for d in chain.into_iter().rev() {
        let offered = fs::read_to_string(d.join("cgroup.controllers"))?;
        if !CONTROLLERS
            .iter()
            .all(|c| offered.split_whitespace().any(|o| o == *c))
        {
            return Err(io::Error::other("controllers not delegated"));
        }
        fs::write(d.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
    }
    Ok(())
}

/// One instance's limits, applied; removed with the instance.
pub struct InstanceLimits {
    /// The v1 directories (empty on v2, where the instance's own cgroup carries them).
    v1_dirs: Vec<PathBuf>,
    /// Where the kernel counts OOM kills: v1 `memory.oom_control`, v2 `memory.events`.
    oom_file: PathBuf,
}

impl InstanceLimits {
    /// Applies `limits` to a new instance named `name` (its v2 cgroup is `v2_dir`). Returns
    /// them and, on v1, the `cgroup.procs` files the child writes itself into.
    pub fn apply(
        hierarchy: &Hierarchy,
        name: &str,
        v2_dir: &Path,
        limits: ResourceLimits,
    ) -> io::Result<(InstanceLimits, Vec<OwnedFd>)> {
        let memory = u64::from(limits.memory_mb) * 1024 * 1024;
        let quota = ((limits.cpu * CPU_PERIOD_US as f64) as u64).max(1000);
        match hierarchy {
            Hierarchy::V2 => {
                fs::write(v2_dir.join("memory.max"), memory.to_string())?;
                // No swap: an instance over its memory is killed, not slowed to a crawl.
                let _ = fs::write(v2_dir.join("memory.swap.max"), "0");
                fs::write(v2_dir.join("pids.max"), limits.pids_max.to_string())?;
                fs::write(v2_dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                let limits = InstanceLimits {
                    v1_dirs: Vec::new(),
                    oom_file: v2_dir.join("memory.events"),
                };
                Ok((limits, Vec::new()))
            }
            Hierarchy::V1 { roots } => {
                let dirs: Vec<PathBuf> = roots.iter().map(|r| r.join(name)).collect();
                let made = InstanceLimits {
                    oom_file: dirs[0].join("memory.oom_control"),
                    v1_dirs: dirs.clone(),
                };
                for dir in &dirs {
                    fs::create_dir(dir)?;
                }
                let write =
                    |dir: &Path, file: &str, value: String| fs::write(dir.join(file), value);
                write(&dirs[0], "memory.limit_in_bytes", memory.to_string())?;
                let _ = write(&dirs[0], "memory.swappiness", "0".into());
                write(&dirs[1], "pids.max", limits.pids_max.to_string())?;
                write(&dirs[2], "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                write(&dirs[2], "cpu.cfs_quota_us", quota.to_string())?;
                let mut join = Vec::new();
                for dir in &dirs {
                    let file = fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))?;
                    join.push(file.into());
                }
                Ok((made, join))
            }
        }
    }

    /// How many times the kernel's OOM killer killed a process of this instance.
    pub fn oom_kills(&self) -> u64 {
        fs::read_to_string(&self.oom_file)
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let (key, value) = line.split_once(' ')?;
                    (key == "oom_kill").then(|| value.trim().parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    /// Removes the v1 directories once the instance's processes are gone (its v2 cgroup is
    /// removed with it).
    pub fn remove(&self) {
        for dir in &self.v1_dirs {
            let _ = super::cgroup::remove_when_empty(dir);
        }
    }
}

/// Removes v1 directories of instances whose wsedge is gone (named `<pid>-...`), as
/// `cgroup::clean_leftovers` does for v2. Their processes were killed through v2.
pub fn clean_leftovers(hierarchy: &Hierarchy, cgroup_root: Option<&Path>) {
    let Hierarchy::V1 { roots } = hierarchy else {
        return;
    };
    for root in roots {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if owner == std::process::id() || super::cgroup::owner_alive(cgroup_root, owner) {
                continue;
            }
            match fs::remove_dir(entry.path()) {
                Ok(()) => {
                    info!(cgroup = %entry.path().display(), "removed limits left by an earlier wsedge")
                }
                Err(e) => {
                    warn!(cgroup = %entry.path().display(), error = %e, "cannot remove limits left by an earlier wsedge")
                }
            }
        }
    }
}
