//! Instances of functions that wsedge starts itself (`command`): cold start on demand, reuse
//! while a slot is free, scale out to `max_instances` (then 429), keep warm, scale to zero,
//! and notice crashes.
//!
//! A [`Pool`] per function holds its instances; a connection holds a [`Lease`] (one of its
//! instance's `instance_concurrency` slots) for its whole life. Starting happens in its own
//! task, so a client that gives up does not cancel a start others may be waiting on.

pub mod cgroup;
pub mod egress;
pub mod limits;
pub mod netns;
pub mod process;
pub mod sandbox;

use std::{
    io,
    net::SocketAddr,
    os::fd::{FromRawFd, IntoRawFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::{net::TcpStream, sync::watch};
use tracing::{info, warn};

use crate::{metrics::Metrics, protocols::error_response::HandshakeError};
use netns::NetNs;
pub use process::SpawnSpec;

/// How long an instance gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How often a starting instance is checked for its listening socket.
const READY_POLL: Duration = Duration::from_millis(5);

pub struct Pool {
    spec: SpawnSpec,
    concurrency: u32,
    max_instances: u32,
    start_timeout: Duration,
    keep_warm: Duration,
    cgroup_root: Option<PathBuf>,
    metrics: Arc<Metrics>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    instances: Vec<Arc<Instance>>,
    next_number: u64,
    /// Set at shutdown: no more starts.
    closed: bool,
}

#[derive(Clone, Debug)]
enum Readiness {
    Starting,
    Ready,
    Failed(HandshakeError),
}

pub struct Instance {
    pub id: Arc<str>,
    pub started_at: SystemTime,
    /// Connections holding a slot; changed only under the pool's lock.
    active: AtomicU64,
    /// Bumped whenever the instance becomes idle, so a stale keep-warm timer does nothing.
    idle_generation: AtomicU64,
    readiness: watch::Sender<Readiness>,
    process: std::sync::OnceLock<ProcessInfo>,
    /// Set when wsedge itself stops the instance (an exit then is no crash).
    stopping: AtomicBool,
    exited: watch::Sender<bool>,
}

struct ProcessInfo {
    pid: u32,
    addr: SocketAddr,
    netns: Option<Arc<NetNs>>,
    cgroup: Option<cgroup::Cgroup>,
    limits: Option<limits::InstanceLimits>,
    egress: Option<Arc<egress::Link>>,
}

impl ProcessInfo {
    /// SIGKILLs the whole instance: its cgroup (also processes that left the process group),
    /// or its process group without one.
    fn kill(&self) {
        match &self.cgroup {
            Some(c) => {
                let _ = c.kill();
            }
            // SAFETY: plain syscall; the instance leads its own process group.
            None => unsafe {
                libc::kill(-(self.pid as i32), libc::SIGKILL);
            },
        }
    }
}

/// Where and how to reach an instance.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    netns: Option<Arc<NetNs>>,
}

impl Target {
    pub fn fixed(addr: SocketAddr) -> Target {
        Target { addr, netns: None }
    }

    /// Opens a TCP connection to the instance, from inside its namespace if it has one.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        match &self.netns {
            None => TcpStream::connect(self.addr).await,
            Some(ns) => {
                let fd = ns.tcp_socket()?;
                // SAFETY: a fresh, owned TCP socket.
                let socket = unsafe { tokio::net::TcpSocket::from_raw_fd(fd.into_raw_fd()) };
                socket.connect(self.addr).await
            }
        }
    }
}

/// One of an instance's slots, held by a connection for its whole life.
pub struct Lease {
    pool: Arc<Pool>,
    instance: Arc<Instance>,
}

impl Lease {
    pub fn instance_id(&self) -> &Arc<str> {
        &self.instance.id
    }

    pub fn target(&self) -> Option<Target> {
        self.instance.process.get().map(|p| Target {
            addr: p.addr,
            netns: p.netns.clone(),
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(&self.instance);
    }
}

/// What `GET /instances` shows for one instance.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct InstanceView {
    pub id: String,
    pub function: String,
    pub state: String,
    pub pid: u32,
    pub address: String,
    /// Inode of the instance's network namespace (`/proc/PID/ns/net`); absent without one.
    pub netns: Option<u64>,
    pub connections: u64,
    pub started_at: String,
}

impl Pool {
    pub fn new(
        spec: SpawnSpec,
        function: &crate::config::FunctionConfig,
        cgroup_root: Option<PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            spec,
            concurrency: function.instance_concurrency,
            max_instances: function.max_instances,
            start_timeout: Duration::from_millis(function.start_timeout_ms),
            keep_warm: Duration::from_secs(function.keep_warm_s),
            cgroup_root,
            metrics,
            state: Mutex::default(),
        })
    }

    /// A slot on a running instance, on one being started, or on a new one; 429 when every
    /// instance is busy and `max_instances` run; the start's error when it fails.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, HandshakeError> {
        let (lease, fresh) = {
            let mut state = self.state.lock().expect("pool lock");
            if state.closed {
                return Err(HandshakeError::draining());
            }
            let free = state
                .instances
                .iter()
                .filter(|i| i.has_free_slot(self.concurrency))
                // Ready before starting, then the oldest: connections pack onto few instances.
                .min_by_key(|i| !matches!(*i.readiness.borrow(), Readiness::Ready))
                .cloned();
            let (instance, fresh) = match free {
                Some(instance) => (instance, false),
                None if state.instances.len() < self.max_instances as usize => {
                    state.next_number += 1;
                    let instance = Arc::new(Instance::new(
                        format!("{}-{}", self.spec.function, state.next_number).into(),
                    ));
                    state.instances.push(instance.clone());
                    (instance, true)
                }
                None => {
                    return Err(HandshakeError::new(
                        429,
                        "function_busy",
                        format!(
                            "all {} instances of {} are busy",
                            self.max_instances, self.spec.function
                        ),
                    ));
                }
            };
            instance.active.fetch_add(1, Ordering::Relaxed);
            let lease = Lease {
                pool: self.clone(),
                instance,
            };
            (lease, fresh)
        };
        if fresh {
            tokio::spawn(self.clone().start(lease.instance.clone()));
        }
        let mut readiness = lease.instance.readiness.subscribe();
        let outcome = readiness
            .wait_for(|r| !matches!(r, Readiness::Starting))
            .await
            .map(|r| r.clone());
        match outcome {
            Ok(Readiness::Ready) => Ok(lease),
            Ok(Readiness::Failed(e)) => Err(e),
            _ => Err(HandshakeError::internal("instance start was abandoned")),
        }
    }

    async fn start(self: Arc<Self>, instance: Arc<Instance>) {
        let begun = Instant::now();
        let mut started = match process::spawn(
            &self.spec,
            &instance.id,
            self.cgroup_root.as_deref(),
        ) {
            Ok(started) => started,
            Err(e) => {
                warn!(function = %self.spec.function, instance = %instance.id, error = %e, "instance could not be started");
                self.forget(&instance);
                instance.fail(HandshakeError::new(
                    500,
                    "instance_start_failed",
                    format!("starting {:?}: {e}", self.spec.command[0]),
                ));
                return;
            }
        };
        let pid = started.pid;
        let _ = instance.process.set(ProcessInfo {
            pid,
            addr: started.addr,
            netns: started.netns.take(),
            cgroup: started.cgroup.take(),
            limits: started.limits.take(),
            egress: started.egress.take(),
        });
        self.metrics.instance_started(&self.spec.function);
        info!(function = %self.spec.function, instance = %instance.id, pid, address = %started.addr,
              netns = instance.process.get().and_then(|p| p.netns.as_ref()).map(|n| n.inode),
              egress_address = instance.process.get().and_then(|p| p.egress.as_ref()).map(|l| l.address().to_string()),
              "instance starting");
        tokio::spawn(self.clone().watch_exit(instance.clone(), started.child));
        let deadline = begun + self.start_timeout;
        let mut exited = instance.exited.subscribe();
        loop {
            if *exited.borrow_and_update() {
                return; // watch_exit reported it
            }
            if process::listening(pid, started.addr.port()) {
                let took = begun.elapsed();
                self.metrics.instance_ready(&self.spec.function, took);
                info!(function = %self.spec.function, instance = %instance.id,
                      cold_start_ms = took.as_millis() as u64, "instance ready");
                instance.readiness.send_replace(Readiness::Ready);
                return;
            }
            if Instant::now() >= deadline {
                warn!(function = %self.spec.function, instance = %instance.id, timeout = ?self.start_timeout,
                      "instance did not listen in time; stopping it");
                self.forget(&instance);
                instance.fail(HandshakeError::gateway_timeout(format!(
                    "instance {} did not listen on port {} within {:?}",
                    instance.id,
                    started.addr.port(),
                    self.start_timeout
                )));
                instance.stop().await;
                return;
            }
            let _ = tokio::time::timeout(READY_POLL, exited.changed()).await;
        }
    }

    /// Reaps the process; an exit wsedge did not ask for is a crash: the instance is never
    /// routed to again, and connections still starting on it get 502.
    async fn watch_exit(
        self: Arc<Self>,
        instance: Arc<Instance>,
        mut child: tokio::process::Child,
    ) {
        let status = child.wait().await;
        self.forget(&instance);
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let oom_kills = instance
            .process
            .get()
            .and_then(|p| p.limits.as_ref())
            .map_or(0, |l| l.oom_kills());
        if oom_kills > 0 {
            // Its connections end like a crash's (1011, status 439); the log says why.
            self.metrics.instance_oom(&self.spec.function);
            warn!(function = %self.spec.function, instance = %instance.id, %status, reason = "oom",
                  memory_mb = self.spec.limits.as_ref().map(|(_, l)| l.memory_mb),
                  connections = instance.active.load(Ordering::Relaxed),
                  "instance killed: oom (over its memory_mb)");
        }
        if !instance.stopping.load(Ordering::Relaxed) {
            self.metrics.instance_crashed(&self.spec.function);
            warn!(function = %self.spec.function, instance = %instance.id, %status,
                  connections = instance.active.load(Ordering::Relaxed), "instance exited unexpectedly");
        } else {
            info!(function = %self.spec.function, instance = %instance.id, %status, "instance stopped");
        }
        instance.fail(HandshakeError::new(
            502,
            "instance_crashed",
            format!(
                "instance {} exited ({status}) before it listened",
                instance.id
            ),
        ));
        // Before the exit is announced, so a stopped server has left no link behind.
        if let Some(link) = instance.process.get().and_then(|p| p.egress.clone()) {
            let _ = tokio::task::spawn_blocking(move || link.remove()).await;
        }
        instance.exited.send_replace(true);
        let instance_ref = instance.clone();
        // Whatever the instance left running goes with it; removal waits for the kernel.
        let _ = tokio::task::spawn_blocking(move || {
            let process = instance_ref.process.get();
            if let Some(c) = process.and_then(|p| p.cgroup.as_ref()) {
                let _ = c.kill();
                let _ = c.remove();
            }
            if let Some(l) = process.and_then(|p| p.limits.as_ref()) {
                l.remove();
            }
        })
        .await;
    }

    fn forget(&self, instance: &Arc<Instance>) {
        let mut state = self.state.lock().expect("pool lock");
        state.instances.retain(|i| !Arc::ptr_eq(i, instance));
    }

    fn release(self: &Arc<Self>, instance: &Arc<Instance>) {
        let generation = {
            let _state = self.state.lock().expect("pool lock");
            if instance.active.fetch_sub(1, Ordering::Relaxed) != 1 {
                return;
            }
            instance.idle_generation.fetch_add(1, Ordering::Relaxed) + 1
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = self.clone();
        let instance = instance.clone();
        runtime.spawn(async move {
            // A retired pool keeps nothing warm: nobody will be routed to it again.
            if !pool.state.lock().expect("pool lock").closed {
                tokio::time::sleep(pool.keep_warm).await;
            }
            {
                let mut state = pool.state.lock().expect("pool lock");
                let still_idle = instance.active.load(Ordering::Relaxed) == 0
                    && instance.idle_generation.load(Ordering::Relaxed) == generation;
                if !still_idle || !state.instances.iter().any(|i| Arc::ptr_eq(i, &instance)) {
                    return;
                }
                state.instances.retain(|i| !Arc::ptr_eq(i, &instance));
            }
            info!(function = %pool.spec.function, instance = %instance.id, keep_warm = ?pool.keep_warm,
                  "instance idle; scaling down");
            instance.stop().await;
        });
    }

    /// Takes the pool out of service (its function was removed or changed by a reload): no
    /// new connections; idle instances stop now, busy ones when their last connection ends.
    pub fn retire(self: &Arc<Self>) {
        let idle: Vec<Arc<Instance>> = {
            let mut state = self.state.lock().expect("pool lock");
            state.closed = true;
            let (idle, busy) = std::mem::take(&mut state.instances)
                .into_iter()
                .partition(|i| i.active.load(Ordering::Relaxed) == 0);
            state.instances = busy;
            idle
        };
        for instance in idle {
            tokio::spawn(async move { instance.stop().await });
        }
    }

    /// Stops every instance (shutdown); no new ones start.
    pub async fn stop_all(&self) {
        let instances = {
            let mut state = self.state.lock().expect("pool lock");
            state.closed = true;
            std::mem::take(&mut state.instances)
        };
        futures_util::future::join_all(instances.iter().map(|i| i.stop())).await;
    }

    pub fn views(&self) -> Vec<InstanceView> {
        let state = self.state.lock().expect("pool lock");
        state
            .instances
            .iter()
            .map(|i| {
                let process = i.process.get();
                InstanceView {
                    id: i.id.to_string(),
                    function: self.spec.function.clone(),
                    state: match *i.readiness.borrow() {
                        Readiness::Starting => "starting",
                        Readiness::Ready => "ready",
                        Readiness::Failed(_) => "failed",
                    }
                    .into(),
                    pid: process.map_or(0, |p| p.pid),
                    address: process.map_or_else(String::new, |p| p.addr.to_string()),
                    netns: process.and_then(|p| p.netns.as_ref()).map(|n| n.inode),
                    connections: i.active.load(Ordering::Relaxed),
                    started_at: humantime::format_rfc3339_millis(i.started_at).to_string(),
                }
            })
            .collect()
    }
}

impl Instance {
    fn new(id: Arc<str>) -> Instance {
        Instance {
            id,
            started_at: SystemTime::now(),
            active: AtomicU64::new(0),
            idle_generation: AtomicU64::new(0),
            readiness: watch::Sender::new(Readiness::Starting),
            process: std::sync::OnceLock::new(),
            stopping: AtomicBool::new(false),
            exited: watch::Sender::new(false),
        }
    }

    fn has_free_slot(&self, concurrency: u32) -> bool {
        !matches!(*self.readiness.borrow(), Readiness::Failed(_))
            && self.active.load(Ordering::Relaxed) < u64::from(concurrency)
    }

    /// Fails a start still in progress (a ready instance keeps serving its connections).
    fn fail(&self, error: HandshakeError) {
        self.readiness.send_if_modified(|r| {
            if matches!(r, Readiness::Starting) {
                *r = Readiness::Failed(error);
                true
            } else {
                false
            }
        });
    }

    /// SIGTERM to the instance's processes, SIGKILL after a grace period.
    async fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let Some(process) = self.process.get() else {
            return;
        };
        self.signal(process, libc::SIGTERM);
        let mut exited = self.exited.subscribe();
        let gone = matches!(
            tokio::time::timeout(STOP_GRACE, exited.wait_for(|e| *e)).await,
            Ok(Ok(_))
        );
        if !gone {
            warn!(instance = %self.id, grace = ?STOP_GRACE, "instance ignored SIGTERM; killing it");
            process.kill();
            let _ = exited.wait_for(|e| *e).await;
        }
    }

    fn signal(&self, process: &ProcessInfo, signal: libc::c_int) {
        match &process.cgroup {
            Some(c) => c.signal(signal),
            // SAFETY: plain syscall; the instance leads its own process group.
            None => unsafe {
                libc::kill(-(process.pid as i32), signal);
            },
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // The pool is gone without a stop (a test's server dropped): take the processes along.
        if let Some(process) = self.process.get()
            && !*self.exited.borrow()
        {
            process.kill();
        }
    }
}
