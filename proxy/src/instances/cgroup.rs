//! One cgroup (v2) per spawned instance, under `<cgroup2 mount>/wsedge/<pid>-s<n>/` (one
//! directory per server, several servers can run in one process, as in tests): stopping an
//! instance kills its whole process tree (`cgroup.kill`), and at start wsedge kills and
//! removes what a crashed wsedge left behind (whose wsedge is gone: see [`crate::liveness`]).
//! The zero-hop data plane attaches its `sock_ops`
//! program to the server's directory, so it sees exactly that server's instances. Without a
//! writable cgroup2 mount (not root), instances are stopped through their process group
//! instead.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::liveness::{fresh, held, lock};

pub struct Cgroup {
    path: PathBuf,
}

/// `<cgroup2 mount>/wsedge`, created if needed; `None` when there is no writable cgroup2.
pub fn root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mount-point options... - fstype source super-options
    let mount = mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2")
            .then(|| left.split(' ').nth(4).map(PathBuf::from))?
    })?;
    let root = mount.join("wsedge");
    fs::create_dir_all(&root).ok()?;
    // A cgroup we cannot create children in is no use (read-only mount, not root).
    let probe = root.join(format!(".probe-{}", std::process::id()));
    fs::create_dir(&probe).ok()?;
    let _ = fs::remove_dir(&probe);
    Some(root)
}

/// A fresh directory for one server's instance cgroups, under [`root`], locked for the
/// rest of the process's life. A name a live wsedge in another PID namespace holds (same
/// pid) is skipped.
pub fn server_dir() -> Option<PathBuf> {
    static SERVERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    /// The locks: a directory's lock lives as long as the process (a directory removed at a
    /// clean stop keeps a harmless open handle).
    static LOCKS: std::sync::Mutex<Vec<fs::File>> = std::sync::Mutex::new(Vec::new());
    let root = root()?;
    for _ in 0..64 {
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root.join(format!("{}-s{n}", std::process::id()));
        if let Err(e) = fs::create_dir(&dir)
            && (e.kind() != io::ErrorKind::AlreadyExists || held(&dir))
        {
            continue;
        }
        let lock = lock(&dir).ok()?;
        LOCKS.lock().expect("cgroup locks").push(lock);
        return Some(dir);
    }
    None
}

/// Whether the wsedge whose resources are named after `pid` is alive: one of its server
/// directories under `root` is locked. Without cgroups (`root` is `None`) only `/proc` can
/// be asked. A dead wsedge whose pid a live one in another namespace shares is taken for
/// alive: its leftovers stay, which is safe, rather than a live one's being killed.
pub fn owner_alive(root: Option<&Path>, pid: u32) -> bool {
    let Some(root) = root else {
        return Path::new(&format!("/proc/{pid}")).exists();
    };
    let prefix = format!("{pid}-s");
    fs::read_dir(root).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix) && held(&e.path()))
    })
}

impl Cgroup {
    /// Creates `<root>/<name>`; `name` starts with wsedge's pid (see [`clean_leftovers`]).
    pub fn create(root: &Path, name: &str) -> io::Result<Cgroup> {
        let path = root.join(name);
        fs::create_dir(&path)?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's name (`<wsedge pid>-...`), which the v1 limits reuse.
    pub fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// `cgroup.procs`, opened for writing: a child writes "0" to it to join before `exec`.
    pub fn procs_for_joining(&self) -> io::Result<fs::File> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
    }

    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        for pid in self.pids() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// SIGKILLs every process in the cgroup, including ones that left the process group.
    pub fn kill(&self) -> io::Result<()> {
        fs::write(self.path.join("cgroup.kill"), "1")
    }

    /// Waits (bounded) until the cgroup is empty, then removes it.
    pub fn remove(&self) -> io::Result<()> {
        remove_when_empty(&self.path)
    }
}

/// Removes a cgroup directory (v2, or a v1 controller's) once the kernel has let its last
/// process go, waiting at most 2 s: the kernel refuses to remove it until then.
pub fn remove_when_empty(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Removes a server's directory (see [`server_dir`]) once its instances are stopped, so a
/// clean stop leaves nothing for [`clean_leftovers`].
pub fn remove_server_dir(dir: &Path) -> io::Result<()> {
    Cgroup {
        path: dir.to_path_buf(),
    }
    .remove()
}

/// Kills and removes instance cgroups whose wsedge process is gone (a crash or SIGKILL of
/// wsedge), so their instances and namespaces do not outlive it.
pub fn clean_leftovers(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) || held(&entry.path()) {
            continue;
        }
        let cgroup = Cgroup { path: entry.path() };
        let children: Vec<Cgroup> = fs::read_dir(&cgroup.path)
            .map(|dir| {
                dir.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| Cgroup { path: e.path() })
                    .collect()
            })
            .unwrap_or_default();
        // Another wsedge's server directory, just made, holds nothing yet.
        if children.is_empty() && cgroup.pids().is_empty() && fresh(&cgroup.path) {
            continue;
        }
        // `cgroup.kill` reaches every descendant; the instance cgroups inside a server's
        // directory must go before the directory itself.
        let _ = cgroup.kill();
        let processes =
            cgroup.pids().len() + children.iter().map(|c| c.pids().len()).sum::<usize>();
        for child in &children {
            let _ = child.remove();
        }
        match cgroup.remove() {
            Ok(()) => {
                info!(cgroup = %name, processes, "removed an instance left by an earlier wsedge")
            }
            Err(e) => {
                warn!(cgroup = %name, error = %e, "cannot remove an instance left by an earlier wsedge")
            }
        }
    }
}
