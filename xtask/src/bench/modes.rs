//! The proxies under test, each started the same way: listen on a free loopback port, proxy
//! WebSocket upgrades to the echo backend, report the PIDs whose memory counts as "proxy".

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// One mode of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    WsedgeKernel,
    WsedgeUserspace,
    Nginx,
    Haproxy,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::WsedgeKernel,
        Mode::WsedgeUserspace,
        Mode::Nginx,
        Mode::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::WsedgeKernel => "wsedge-kernel",
            Mode::WsedgeUserspace => "wsedge-userspace",
            Mode::Nginx => "nginx",
            Mode::Haproxy => "haproxy",
        }
    }
}

/// A running proxy (or none, for `direct`): where clients connect, and its processes.
pub struct Running {
    pub target: SocketAddr,
    child: Option<Child>,
    root_pid: Option<u32>,
}

impl Running {
    /// The proxy's PIDs now: the process and its children (nginx workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(root) = self.root_pid else {
            return Vec::new();
        };
        let mut pids = vec![root];
        pids.extend(children_of(root));
        pids
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGTERM first so nginx's master takes its workers down with it.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.split_whitespace().nth(1).map(String::from))
                })
                .flatten()
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .collect()
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(addr: SocketAddr, child: &mut Child, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited before listening on {addr}: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{name} did not listen on {addr} within 15 s")
}

/// Starts `mode` in front of `backend`, with its files in `dir`.
pub fn start(mode: Mode, backend: SocketAddr, dir: &Path, release: &Path) -> Result<Running> {
    if mode == Mode::Direct {
        return Ok(Running {
            target: backend,
            child: None,
            root_pid: None,
        });
    }
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut cmd = match mode {
        Mode::WsedgeKernel | Mode::WsedgeUserspace => wsedge(mode, listen, backend, dir, release)?,
        Mode::Nginx => nginx(listen, backend, dir)?,
        Mode::Haproxy => haproxy(listen, backend, dir)?,
        Mode::Direct => unreachable!(),
    };
    let log = std::fs::File::create(dir.join(format!("{}.log", mode.name())))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", mode.name()))?;
    wait_listening(listen, &mut child, mode.name())?;
    let root_pid = Some(child.id());
    Ok(Running {
        target: listen,
        child: Some(child),
        root_pid,
    })
}

fn write(path: PathBuf, text: String) -> Result<PathBuf> {
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// wsedge with quotas raised far above the load, so they do not shape it.
fn wsedge(
    mode: Mode,
    listen: SocketAddr,
    backend: SocketAddr,
    dir: &Path,
    release: &Path,
) -> Result<Command> {
    let plane = if mode == Mode::WsedgeKernel {
        "kernel"
    } else {
        "userspace"
    };
    let admin = free_port()?;
    let config = write(
        dir.join(format!("{}.toml", mode.name())),
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             data_plane = \"{plane}\"\nstate_dir = \"{state}\"\ndrain_timeout_s = 1\n\n\
             [[function]]\nname = \"echo\"\nroute = \"/\"\nupstreams = [\"{backend}\"]\n\
             idle_timeout_s = 7200\nexecution_timeout_s = 7200\n\
             [function.limits]\nmax_message_bytes = 262144\nmessages_per_s = 1000000000\n\
             bytes_per_s = 1000000000000\n",
            state = dir.display()
        ),
    )?;
    let mut cmd = Command::new(release.join("wsedge"));
    cmd.arg("run").arg("-c").arg(config).env("RUST_LOG", "warn");
    Ok(cmd)
}

/// nginx as a WebSocket reverse proxy: a worker per core, long timeouts, no logs.
fn nginx(listen: SocketAddr, backend: SocketAddr, dir: &Path) -> Result<Command> {
    let d = dir.display();
    let config = write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes auto;\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log error;\n\
             events {{ worker_connections 20000; multi_accept on; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n\
               proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fcgi;\n\
               uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
               upstream echo {{ server {backend}; }}\n\
               server {{\n    listen {listen} backlog=4096;\n    location / {{\n\
                 proxy_pass http://echo;\n      proxy_http_version 1.1;\n\
                 proxy_set_header Upgrade $http_upgrade;\n\
                 proxy_set_header Connection \"upgrade\";\n\
                 proxy_read_timeout 3600s;\n      proxy_send_timeout 3600s;\n\
                 proxy_buffering off;\n    }}\n  }}\n}}\n"
        ),
    )?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(config)
        .args(["-g", "daemon off;"]);
    Ok(cmd)
}

/// HAProxy in HTTP mode (it recognises the upgrade and tunnels): a thread per core, long
/// tunnel timeouts, no logs. maxconn is what the 20000-descriptor hard limit allows.
fn haproxy(listen: SocketAddr, backend: SocketAddr, dir: &Path) -> Result<Command> {
    let config = write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread {threads}\n  maxconn 9900\n\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n\
               timeout server 1h\n  timeout tunnel 1h\n\n\
             frontend ws\n  bind {listen}\n  default_backend echo\n\n\
             backend echo\n  server echo {backend} maxconn 9900\n",
            threads = std::thread::available_parallelism().map_or(1, |n| n.get()),
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(config);
    Ok(cmd)
}
