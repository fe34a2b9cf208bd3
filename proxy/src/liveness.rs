//! Whether another wsedge process is alive, asked in a way that holds across PID namespaces.
//!
//! A wsedge holds an exclusive `flock` on a directory of its own (its cgroup directory, its
//! pinned maps' directory) for its whole life; the kernel drops the lock however the process
//! dies. Another wsedge asks the directory, not `/proc/<pid>`: a wsedge in a container has a pid
//! this one cannot see, or sees as somebody else's. `flock` works on cgroupfs and bpffs
//! directories alike.

use std::{fs::File, io, os::fd::AsRawFd, path::Path, time::Duration};

/// Takes the exclusive lock on `dir`; the returned file holds it.
pub fn lock(dir: &Path) -> io::Result<File> {
    let file = File::open(dir)?;
    // SAFETY: a valid descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Whether `dir` was made so recently that its wsedge may not have locked it yet (between
/// its `mkdir` and its `flock`): such a directory, if it holds nothing yet, is not a leftover.
pub fn fresh(dir: &Path) -> bool {
    std::fs::metadata(dir)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().unwrap_or_default() <= Duration::from_secs(10))
}

/// Whether a live process holds `dir`'s lock. This process counts too: a second open file
/// is refused the lock like any other process's.
pub fn held(dir: &Path) -> bool {
    match lock(dir) {
        // Ours now, so nobody held it; dropping the file releases it again.
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EWOULDBLOCK),
    }
}
