//! One thread and one epoll set notice when a spliced socket's peer shuts its write side.
//!
//! Spliced sockets never become readable for data (the kernel programs consume it), so all
//! userspace needs from them is the FIN. Registering them with the async runtime would cost
//! a task, two registrations and their futures per connection for the whole connection's
//! life; here each socket costs one one-shot, RDHUP-only epoll registration and a table
//! entry, and work happens only when a hang-up arrives.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex},
};

/// Which of a connection's two sockets hung up.
pub struct Hangup<T> {
    pub conn: Arc<T>,
    pub from_client: bool,
}

type Table<T> = Arc<Mutex<HashMap<u64, (Arc<T>, bool)>>>;

pub struct HangupWatcher<T> {
    epoll: Arc<OwnedFd>,
    table: Table<T>,
}

impl<T: Send + Sync + 'static> HangupWatcher<T> {
    /// Starts the watcher thread; `on_hangup` runs on it for every hang-up (or error).
    pub fn start(on_hangup: impl Fn(Hangup<T>) + Send + 'static) -> io::Result<Self> {
        // SAFETY: epoll_create1 returns a new descriptor we own, or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let table: Table<T> = Arc::default();
        let (thread_epoll, thread_table) = (epoll.clone(), table.clone());
        std::thread::Builder::new()
            .name("wsedge-hangups".into())
            .spawn(move || watch_loop(&thread_epoll, &thread_table, on_hangup))?;
        Ok(HangupWatcher { epoll, table })
    }

    /// Watches `fd` (identified by `cookie`) for one hang-up or error.
    pub fn watch(&self, cookie: u64, fd: RawFd, conn: Arc<T>, from_client: bool) -> io::Result<()> {
        self.watch_events(cookie, fd, conn, from_client, libc::EPOLLRDHUP)
    }

    /// Watches `fd` for one hang-up, error or arrival of data: for a socket that receives
    /// nothing while the kernel carries the connection (the proxy's socket of a zero-hop
    /// connection), data means the connection left the kernel path.
    pub fn watch_data(
        &self,
        cookie: u64,
        fd: RawFd,
        conn: Arc<T>,
        from_client: bool,
    ) -> io::Result<()> {
        self.watch_events(
            cookie,
            fd,
            conn,
            from_client,
            libc::EPOLLRDHUP | libc::EPOLLIN,
        )
    }

    fn watch_events(
        &self,
        cookie: u64,
        fd: RawFd,
        conn: Arc<T>,
        from_client: bool,
        events: libc::c_int,
    ) -> io::Result<()> {
        self.table
            .lock()
            .expect("hangup table")
            .insert(cookie, (conn, from_client));
        let mut event = libc::epoll_event {
            events: (events | libc::EPOLLONESHOT) as u32,
            u64: cookie,
        };
        // SAFETY: valid epoll and socket descriptors, event outlives the call.
        let rc =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if rc != 0 {
            self.forget(cookie);
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// What is watched under `cookie`, if anything.
    pub fn get(&self, cookie: u64) -> Option<Arc<T>> {
        let table = self.table.lock().expect("hangup table");
        table.get(&cookie).map(|(conn, _)| conn.clone())
    }

    /// Everything watched right now (a connection with two watched sockets appears twice).
    pub fn watched(&self) -> Vec<Arc<T>> {
        let table = self.table.lock().expect("hangup table");
        table.values().map(|(conn, _)| conn.clone()).collect()
    }

    /// Drops the table entry; the epoll registration goes when the socket is closed.
    pub fn forget(&self, cookie: u64) {
        self.table.lock().expect("hangup table").remove(&cookie);
    }
}

fn watch_loop<T>(epoll: &OwnedFd, table: &Table<T>, on_hangup: impl Fn(Hangup<T>)) {
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: the buffer holds `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                -1,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %io::Error::last_os_error(), "hang-up watcher stopped");
            return;
        }
        for event in &events[..n as usize] {
            let cookie = event.u64;
            // A connection already torn down leaves no entry: nothing to do.
            let entry = table.lock().expect("hangup table").remove(&cookie);
            if let Some((conn, from_client)) = entry {
                on_hangup(Hangup { conn, from_client });
            }
        }
    }
}
