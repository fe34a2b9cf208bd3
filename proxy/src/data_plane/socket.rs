//! Socket options the data planes need that std and tokio do not expose.

use std::{io, os::fd::AsRawFd};

fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live i32.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads a socket option into `value`.
///
/// # Safety
/// `T` must be plain data for which any bytes the kernel writes are a valid value.
unsafe fn getsockopt_into<T>(
    fd: &impl AsRawFd,
    level: i32,
    name: i32,
    value: &mut T,
) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the pointer and length describe a live, writable T.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_mut(value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an integer socket option.
fn getsockopt<T: Default + Copy + Into<i128>>(
    fd: &impl AsRawFd,
    level: i32,
    name: i32,
) -> io::Result<T> {
    let mut value = T::default();
    // SAFETY: integers are valid for any bit pattern.
    unsafe { getsockopt_into(fd, level, name, &mut value) }?;
    Ok(value)
}

/// The kernel's unique, never-reused id of a socket: the key of the kernel maps.
pub fn cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// Cookie of the network namespace the socket lives in (`SO_NETNS_COOKIE`).
pub fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// Sizes the receive buffer (the stream parser's largest message, and the receive window)
/// to at least one maximal frame. FORCE ignores `net.core.rmem_max`, which is below what a
/// 256 KiB frame needs.
pub fn set_receive_buffer(fd: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// Makes the kernel look at bytes already queued on the socket. Bytes that arrived before
/// the socket entered the sockmap are not parsed until more arrive (a kernel behaviour checked here);
/// setting SO_RCVLOWAT runs `tcp_data_ready`, which is the psock's parser entry point.
pub fn kick_receive_path(fd: &impl AsRawFd) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)
}

/// Bytes handed to this socket's TCP send path so far: acknowledged plus still queued.
pub fn bytes_queued_to_tcp(fd: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: tcp_info is plain integers; zero is valid and so is whatever the kernel writes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    unsafe { getsockopt_into(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info) }?;
    let mut unacked: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + unacked.max(0) as u64)
}

/// Bytes this socket's TCP received that userspace has read (received minus still queued).
pub fn bytes_read(fd: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: tcp_info is plain integers; zero is valid and so is whatever the kernel writes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    unsafe { getsockopt_into(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info) }?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info
        .tcpi_bytes_received
        .saturating_sub(queued.max(0) as u64))
}

/// The pending socket error (SO_ERROR), if any.
pub fn take_error(fd: &impl AsRawFd) -> Option<io::Error> {
    match getsockopt::<i32>(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
        Ok(0) | Err(_) => None,
        Ok(errno) => Some(io::Error::from_raw_os_error(errno)),
    }
}

pub fn shutdown_write(fd: &impl AsRawFd) {
    // SAFETY: shutdown on a valid fd; errors (already closed) are irrelevant here.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}
