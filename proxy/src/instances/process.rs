//! Starting one instance process: its command, environment, namespace, cgroup and logs.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
};
use tracing::info;

use super::{
    cgroup::Cgroup,
    egress,
    limits::{Hierarchy, InstanceLimits, ResourceLimits},
    netns::NetNs,
    sandbox::Sandbox,
};
use crate::config::{Isolation, Network};

/// What every instance of one function is started with.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub function: String,
    pub command: Vec<String>,
    /// Working directory, and the base of a relative program path.
    pub base_dir: PathBuf,
    pub isolation: Isolation,
    /// `$PORT` inside a namespace; with isolation "none" every instance gets a free port.
    pub port: u16,
    /// The function's `env` table: with `PORT`, `WSEDGE_FUNCTION`, `WSEDGE_INSTANCE`,
    /// `PATH`, `HOME` and `LANG`, all an instance's environment (wsedge's own variables, its
    /// secrets among them, never reach a function).
    pub env: std::collections::BTreeMap<String, String>,
    /// The user, namespaces and filters instances are confined to (wsedge running as root).
    pub sandbox: Option<Arc<Sandbox>>,
    /// Where and how much the instances' cgroups limit them, when cgroups can.
    pub limits: Option<(Arc<Hierarchy>, ResourceLimits)>,
    /// "egress": the namespace gets a veth pair to the host (see `egress`).
    pub network: Network,
}

/// A started instance process.
pub struct Started {
    pub child: Child,
    pub pid: u32,
    /// Where the instance listens, as seen from its namespace.
    pub addr: SocketAddr,
    pub netns: Option<Arc<NetNs>>,
    pub cgroup: Option<Cgroup>,
    pub limits: Option<InstanceLimits>,
    pub egress: Option<Arc<egress::Link>>,
}

/// Starts `spec.command` as instance `instance_id`; stdout and stderr become log lines.
pub fn spawn(
    spec: &SpawnSpec,
    instance_id: &str,
    cgroup_root: Option<&Path>,
) -> io::Result<Started> {
    let (port, netns) = match spec.isolation {
        Isolation::Netns => (spec.port, Some(Arc::new(NetNs::create()?))),
        Isolation::None => (free_port()?, None),
    };
    // Before the command runs: a function may connect to its database as it starts.
    let egress = match (&netns, spec.network) {
        (Some(ns), Network::Egress) => Some(Arc::new(
            egress::Link::create(ns, instance_id).map_err(io::Error::other)?,
        )),
        _ => None,
    };
    // Unique per process: several servers in one process (tests) may name an instance alike.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let cgroup = match cgroup_root {
        Some(root) => Some(Cgroup::create(
            root,
            &format!(
                "{}-{}-{instance_id}",
                std::process::id(),
                SEQUENCE.fetch_add(1, Ordering::Relaxed)
            ),
        )?),
        None => None,
    };
    let procs: Option<OwnedFd> = match &cgroup {
        Some(c) => Some(c.procs_for_joining()?.into()),
        None => None,
    };
    let (limits, limit_procs) = match (&spec.limits, &cgroup) {
        (Some((hierarchy, limits)), Some(c)) => {
            let (applied, join) = InstanceLimits::apply(hierarchy, c.name(), c.path(), *limits)
                .inspect_err(|_| {
                    let _ = c.remove();
                })?;
            (Some(applied), join)
        }
        _ => (None, Vec::new()),
    };
    // At most the three v1 controllers: a fixed array, so the child allocates nothing.
    let mut limit_fds = [-1; 3];
    for (slot, fd) in limit_fds.iter_mut().zip(&limit_procs) {
        *slot = fd.as_raw_fd();
    }
    let program = resolve_program(&spec.command[0], &spec.base_dir);
    let mut command = Command::new(program);
    command
        .args(&spec.command[1..])
        .current_dir(&spec.base_dir)
        .env_clear()
        .envs(base_environment(spec.sandbox.is_some()))
        .envs(&spec.env)
        .env("PORT", port.to_string())
        .env("WSEDGE_FUNCTION", &spec.function)
        .env("WSEDGE_INSTANCE", instance_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let sandbox = spec.sandbox.clone();
    let ns_fd = netns.as_ref().map(|n| n.raw_fd());
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            // Own process group: stopping an instance without cgroups reaches its children.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // If wsedge dies, so does the instance (the cgroup clean-up catches the rest).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent
            {
                return Err(io::Error::other("wsedge exited during spawn"));
            }
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            for fd in limit_fds.into_iter().filter(|&fd| fd >= 0) {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Last: it drops the privileges the steps above need.
            if let Some(sandbox) = &sandbox {
                sandbox.enter()?;
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            if let Some(c) = &cgroup {
                let _ = c.remove();
            }
            if let Some(l) = &limits {
                l.remove();
            }
            return Err(e);
        }
    };
    drop(procs);
    drop(limit_procs);
    let pid = child.id().unwrap_or_default();
    let outputs = [
        (child.stdout.take().map(|o| Box::new(o) as Output), "stdout"),
        (child.stderr.take().map(|e| Box::new(e) as Output), "stderr"),
    ];
    for (stream, output) in outputs {
        if let Some(stream) = stream {
            let (function, instance) = (spec.function.clone(), instance_id.to_string());
            tokio::spawn(forward_lines(stream, function, instance, output));
        }
    }
    Ok(Started {
        child,
        pid,
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        netns,
        cgroup,
        limits,
        egress,
    })
}

/// What every instance's environment starts from: `PATH` and `LANG` as wsedge has them (so
/// the function's interpreter is found as on the host), and `HOME`: the private `/tmp` when
/// sandboxed (the instance's user has no writable home), else wsedge's.
fn base_environment(sandboxed: bool) -> Vec<(&'static str, String)> {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let home = if sandboxed {
        "/tmp".to_string()
    } else {
        var("HOME", "/tmp")
    };
    vec![
        ("PATH", var("PATH", "/usr/local/bin:/usr/bin:/bin")),
        ("HOME", home),
        ("LANG", var("LANG", "C.UTF-8")),
    ]
}

pub fn resolve_program(program: &str, base_dir: &Path) -> PathBuf {
    let path = Path::new(program);
    if path.is_relative() && program.contains('/') {
        base_dir.join(path)
    } else {
        path.to_path_buf()
    }
}

/// A port nobody on the host listens on right now (isolation "none").
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// An instance's stdout or stderr.
type Output = Box<dyn AsyncRead + Unpin + Send>;

/// Each line the instance prints becomes a log event with its function and instance, as a
/// platform's function logs.
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    function: String,
    instance: String,
    output: &'static str,
) {
    let mut lines = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match lines.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                info!(target: "wsedge::function", function = %function, instance = %instance,
                      output, "{}", text.trim_end());
            }
        }
    }
}

/// True once a socket in `pid`'s network namespace listens on `port` (read from
/// `/proc/PID/net/tcp{,6}`, so readiness is checked without connecting to the instance).
pub fn listening(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|table| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).is_ok_and(|text| {
            text.lines().skip(1).any(|row| {
                let mut fields = row.split_whitespace();
                let local = fields.nth(1).unwrap_or_default();
                let state = fields.nth(1).unwrap_or_default();
                state == "0A" && local.ends_with(&want)
            })
        })
    })
}
