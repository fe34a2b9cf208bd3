use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// An in-process echo server that stops (within ~200 ms) when dropped.
pub struct Echo {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<std::io::Result<()>>>,
}

impl Echo {
    pub fn start(threads: usize) -> Echo {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread =
            thread::spawn(move || bench::run_echo("127.0.0.1:0".parse().unwrap(), threads, tx, s));
        let addr = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("echo server did not bind");
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/echo", self.addr)
    }

    /// Upgrades here are pushed to (`bench::echo::Push`).
    pub fn push_url(&self) -> String {
        format!("ws://{}/push", self.addr)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
