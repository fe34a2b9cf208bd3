//! The kernel maps pinned under `/sys/fs/bpf/wsedge/<pid>/`, so `bpftool` and other tools
//! can read a running wsedge's maps by path.
//!
//! A pin keeps its map alive after the process is gone, so pins must not outlive wsedge: a
//! clean stop removes the directory, and a start removes the directories of wsedge processes
//! that did not stop cleanly (whose owner is gone: see [`crate::liveness`]).

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::Ebpf;
use tracing::{info, warn};

use crate::liveness::{fresh, held, lock};

/// Where bpffs is mounted on every distribution that mounts it.
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// This process's pin directory, locked while it exists.
pub struct PinDir {
    path: PathBuf,
    /// Holds the `flock` that tells other wsedge processes this one is alive.
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("mounting bpffs at {BPFFS}: {0}")]
    Mount(io::Error),
    #[error("{0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error("{0} is held by a live wsedge in another PID namespace")]
    Taken(PathBuf),
    #[error("pinning map {0}: {1}")]
    Pin(String, String),
}

impl PinDir {
    /// Pins every map of `ebpf` under a fresh directory of this process, after removing what
    /// wsedge processes that are gone left behind. The first server of a process gets
    /// `<pid>`, later ones (tests run several in one process) `<pid>-<n>`.
    pub fn pin(ebpf: &Ebpf) -> Result<PinDir, PinError> {
        ensure_bpffs()?;
        let root = Path::new(BPFFS).join("wsedge");
        fs::create_dir_all(&root).map_err(|e| PinError::Dir(root.clone(), e))?;
        clean_leftovers(&root);
        static SERVERS: AtomicU32 = AtomicU32::new(0);
        let name = match SERVERS.fetch_add(1, Ordering::Relaxed) {
            0 => std::process::id().to_string(),
            n => format!("{}-{n}", std::process::id()),
        };
        let path = root.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            // Left by a dead wsedge with this pid that `clean_leftovers` could not remove,
            // or held by a live one in another PID namespace.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if held(&path) {
                    return Err(PinError::Taken(path));
                }
                remove(&path);
                fs::create_dir(&path).map_err(|e| PinError::Dir(path.clone(), e))?;
            }
            Err(e) => return Err(PinError::Dir(path, e)),
        }
        let lock = lock(&path).map_err(|e| PinError::Dir(path.clone(), e))?;
        let dir = PinDir { path, _lock: lock };
        for (name, map) in ebpf.maps() {
            // Sections (`.rodata`, `.bss`) are maps too; bpftool shows them by id.
            if name.starts_with('.') {
                continue;
            }
            map.pin(dir.path.join(name))
                .map_err(|e| PinError::Pin(name.to_string(), e.to_string()))?;
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

/// Mounts bpffs at its usual place if nothing is mounted there (a bare host or a container
/// that was not given the host's).
fn ensure_bpffs() -> Result<(), PinError> {
    if is_bpffs(Path::new(BPFFS)) {
        return Ok(());
    }
    let _ = fs::create_dir_all(BPFFS);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(PinError::Mount(io::Error::last_os_error()));
    }
    info!(path = BPFFS, "mounted bpffs for the pinned maps");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-parameter.
    unsafe { libc::statfs(c.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC }
}

/// Removes the pin directories whose owner is gone.
fn clean_leftovers(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // A directory another wsedge has just made is empty (nothing pinned yet).
        let abandoned = fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some()) || !fresh(&path);
        if path.is_dir() && abandoned && !held(&path) {
            remove(&path);
            info!(path = %path.display(), "removed maps pinned by a wsedge that did not stop cleanly");
        }
    }
}

/// Unpins (deletes) every map in `dir`, then `dir`.
fn remove(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
    }
    if let Err(e) = fs::remove_dir(dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %dir.display(), error = %e, "cannot remove pinned maps");
    }
}
