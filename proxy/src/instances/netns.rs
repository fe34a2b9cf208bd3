//! Network namespaces for instances (`isolation = "netns"`): every instance gets its own, so
//! each can bind 0.0.0.0:9000 as the platform's samples do.
//!
//! wsedge reaches an instance with a socket *created inside* the instance's namespace (a
//! socket belongs to the namespace it was created in, whatever thread uses it later), rather
//! than with a veth pair: no addresses, routes or NAT to manage, nothing left behind, and the
//! connection is plain loopback TCP inside the namespace. The cost is one short-lived thread
//! per socket (`setns` changes only the calling thread). Namespaces are anonymous: the kernel
//! frees one when its last process and wsedge's handle are gone, so a crash of wsedge cannot
//! leak one (the instance processes themselves are cleaned up through their cgroups).
//! Instances in a namespace have loopback only: no network egress.

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
};

pub struct NetNs {
    fd: OwnedFd,
    /// Inode of the namespace (as in `/proc/PID/ns/net`): how operators and tests find it.
    pub inode: u64,
}

impl NetNs {
    /// A fresh network namespace with its loopback interface up.
    pub fn create() -> io::Result<NetNs> {
        in_thread(|| {
            // SAFETY: plain syscall; it changes only this short-lived thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let file = std::fs::File::open("/proc/thread-self/ns/net")?;
            loopback_up()?;
            let inode = file.metadata()?.ino();
            Ok(NetNs {
                fd: file.into(),
                inode,
            })
        })
    }

    /// For `setns` in a child process before it executes the instance's command.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A non-blocking TCP socket that lives in this namespace.
    pub fn tcp_socket(&self) -> io::Result<OwnedFd> {
        let ns = self.fd.try_clone()?;
        in_thread(move || {
            // SAFETY: plain syscalls on descriptors this closure owns.
            unsafe {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let fd = libc::socket(
                    libc::AF_INET,
                    libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                );
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(OwnedFd::from_raw_fd(fd))
            }
        })
    }
}

/// Runs `f` on a fresh thread, so namespace changes never leak into runtime threads.
fn in_thread<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::spawn(f)
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// `ip link set lo up` in the calling thread's namespace.
fn loopback_up() -> io::Result<()> {
    // SAFETY: an ifreq filled with the interface name and read back by the kernel.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
