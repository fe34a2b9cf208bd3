//! The proxies under test, each started the same way: listen on a free loopback port, proxy
//! WebSocket upgrades to the echo backend, report the PIDs whose memory counts as "proxy".
//! `wsedge-zero-hop` is the exception: wsedge starts the echo backend itself, as a function
//! instance, and the bench starts none. The `-tls` modes terminate `wss://` with the run's one
//! certificate and proxy to the same plaintext backend.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::placement::{self, Placement};

/// One mode of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Direct,
    /// wsedge in front of the bench's backend as an upstream: the two-socket splice.
    WsedgeKernel,
    /// `wsedge-kernel` with the platform's default rate quotas on (10 messages/s and
    /// 128 KB/s per connection, throttled): what enforcing them costs on the edge workload,
    /// which sends exactly 10 messages/s per connection.
    WsedgeQuotas,
    /// `wsedge-kernel` loaded without its trace points (`kernel_trace = false`): against
    /// `wsedge-kernel` (trace points present, nobody tracing), what they cost idle.
    WsedgeNoTrace,
    /// wsedge with the backend as a function instance it spawns (one instance takes every
    /// connection): the zero-hop data plane once it exists, the two-socket splice before.
    WsedgeZeroHop,
    WsedgeUserspace,
    Nginx,
    Haproxy,
    /// wsedge terminating TLS on `tls_listen`, `data_plane = "auto"`.
    WsedgeTls,
    NginxTls,
    HaproxyTls,
}

/// The TLS parameters every connection of a TLS mode should show in the load generator's
/// `tls_sessions` (its format: protocol, cipher suite, key exchange group, handshake kind).
pub const TLS_SESSION: &str = "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519 Full";
/// The same cipher suite by its IANA name, as OpenSSL's `Ciphersuites` takes it.
const TLS_CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// What the TLS modes serve, from `bench cert`: the leaf alone, its key, and both in one file.
#[derive(Debug, Clone)]
pub struct Pki {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_key: PathBuf,
}

impl Pki {
    pub fn in_dir(dir: &Path) -> Pki {
        Pki {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            cert_key: dir.join("cert-key.pem"),
        }
    }
}

impl Mode {
    pub const ALL: [Mode; 11] = [
        Mode::Direct,
        Mode::WsedgeKernel,
        Mode::WsedgeQuotas,
        Mode::WsedgeNoTrace,
        Mode::WsedgeZeroHop,
        Mode::WsedgeUserspace,
        Mode::Nginx,
        Mode::Haproxy,
        Mode::WsedgeTls,
        Mode::NginxTls,
        Mode::HaproxyTls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::WsedgeKernel => "wsedge-kernel",
            Mode::WsedgeQuotas => "wsedge-kernel-quotas",
            Mode::WsedgeNoTrace => "wsedge-kernel-notrace",
            Mode::WsedgeZeroHop => "wsedge-zero-hop",
            Mode::WsedgeUserspace => "wsedge-userspace",
            Mode::Nginx => "nginx",
            Mode::Haproxy => "haproxy",
            Mode::WsedgeTls => "wsedge-tls",
            Mode::NginxTls => "nginx-tls",
            Mode::HaproxyTls => "haproxy-tls",
        }
    }

    /// Whether a run without `--modes` includes this mode. The trace-point comparison is a
    /// question about one build of the programs, asked with `--modes`, not of every run.
    pub fn by_default(self) -> bool {
        self != Mode::WsedgeNoTrace
    }

    /// Whether clients connect with `wss://`.
    pub fn tls(self) -> bool {
        matches!(self, Mode::WsedgeTls | Mode::NginxTls | Mode::HaproxyTls)
    }

    /// Whether the bench measures `workload` through this mode. The TLS modes are compared
    /// on messages (edge, bulk) and on handshakes; push would measure the same relay as edge,
    /// and edge-max's steps would double a full run's length.
    pub fn runs(self, workload: &str) -> bool {
        match self {
            // The quotas shape every other workload (bulk is far above 128 KB/s): only edge
            // compares like with like.
            Mode::WsedgeQuotas | Mode::WsedgeNoTrace => workload == "edge",
            _ => !self.tls() || matches!(workload, "edge" | "bulk" | "handshake"),
        }
    }

    /// The `data_plane` wsedge's `/connections` should report for this mode's connections.
    pub fn expected_data_plane(self) -> Option<&'static str> {
        match self {
            Mode::WsedgeKernel | Mode::WsedgeQuotas | Mode::WsedgeNoTrace => Some("kernel"),
            Mode::WsedgeZeroHop => Some("kernel-zero-hop"),
            Mode::WsedgeUserspace => Some("userspace"),
            // No kTLS on this machine's kernel: "auto" relays the decrypted stream in user
            // space.
            Mode::WsedgeTls => Some("userspace-tls"),
            Mode::Direct | Mode::Nginx | Mode::Haproxy | Mode::NginxTls | Mode::HaproxyTls => None,
        }
    }

    /// Whether the bench starts the echo backend (every mode but the one whose proxy spawns
    /// it as a function instance).
    pub fn needs_backend(self) -> bool {
        self != Mode::WsedgeZeroHop
    }
}

/// A running proxy (or none, for `direct`): where clients connect, and its processes.
pub struct Running {
    pub target: SocketAddr,
    /// Clients connect with `wss://` (to `localhost`, the certificate's name, sent as SNI).
    pub tls: bool,
    /// wsedge's admin API.
    pub admin: Option<SocketAddr>,
    child: Option<Child>,
    root_pid: Option<u32>,
    /// Whether the proxy's children are proxy too (nginx workers; not wsedge's function
    /// instances, which are the backend).
    count_children: bool,
}

impl Running {
    /// The URL of `path` through this proxy.
    pub fn url(&self, path: &str) -> String {
        match self.tls {
            true => format!("wss://localhost:{}/{path}", self.target.port()),
            false => format!("ws://{}/{path}", self.target),
        }
    }

    /// The proxy's PIDs now: the process and, for nginx, its workers.
    pub fn pids(&self) -> Vec<u32> {
        let Some(root) = self.root_pid else {
            return Vec::new();
        };
        let mut pids = vec![root];
        if self.count_children {
            pids.extend(children_of(root));
        }
        pids
    }

    /// The function instances wsedge spawned (its children), for `wsedge-zero-hop`; none for
    /// the other modes, whose backend the bench starts.
    pub fn instance_pids(&self) -> Vec<u32> {
        match (self.root_pid, self.count_children) {
            (Some(root), false) if self.admin.is_some() => children_of(root),
            _ => Vec::new(),
        }
    }
}

impl Running {
    /// The proxy's exit status if it is no longer running (it should outlive every run).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// How many of wsedge's open connections run on each data plane now (`GET /connections`),
    /// or `None` for a proxy without an admin API.
    pub fn data_planes(&self) -> Result<Option<BTreeMap<String, u64>>> {
        let Some(admin) = self.admin else {
            return Ok(None);
        };
        let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // HTTP/1.0: the answer is delimited by the close, never chunked.
        s.write_all(format!("GET /connections HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)?;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of the response head")?;
        if !answer.starts_with(b"HTTP/1.1 200") && !answer.starts_with(b"HTTP/1.0 200") {
            bail!(
                "/connections answered {:?}",
                String::from_utf8_lossy(&answer[..split])
            );
        }
        let conns: Vec<Value> =
            serde_json::from_slice(&answer[split + 4..]).context("/connections JSON")?;
        let mut planes = BTreeMap::new();
        for c in &conns {
            let mut plane = c["data_plane"].as_str().unwrap_or("(missing)").to_string();
            if self.tls && c["tls"] != true {
                plane = format!("{plane} (tls: {})", c["tls"]);
            }
            *planes.entry(plane).or_insert(0) += 1;
        }
        Ok(Some(planes))
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

/// Starts `mode` in front of `backend` (`None` only for the mode that spawns its own), with
/// its files in `dir`, on the proxy's CPU of `placement`; a TLS mode serves `pki`.
pub fn start(
    mode: Mode,
    backend: Option<SocketAddr>,
    dir: &Path,
    release: &Path,
    placement: Placement,
    pki: &Pki,
) -> Result<Running> {
    let backend = match (mode.needs_backend(), backend) {
        (true, Some(b)) => Some(b),
        (true, None) => bail!("{} needs a running backend", mode.name()),
        (false, _) => None,
    };
    if mode == Mode::Direct {
        return Ok(Running {
            target: backend.expect("checked above"),
            tls: false,
            admin: None,
            child: None,
            root_pid: None,
            count_children: false,
        });
    }
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut admin = None;
    let tls = mode.tls().then_some(pki);
    let threads = placement.proxy_threads();
    let mut cmd = match (mode, backend) {
        (
            Mode::WsedgeKernel
            | Mode::WsedgeQuotas
            | Mode::WsedgeNoTrace
            | Mode::WsedgeUserspace
            | Mode::WsedgeTls,
            Some(b),
        ) => {
            let upstream = format!("upstreams = [\"{b}\"]");
            wsedge(mode, listen, tls, &upstream, dir, release, &mut admin)?
        }
        (Mode::WsedgeZeroHop, _) => {
            let function = zero_hop_function(release, placement);
            wsedge(mode, listen, None, &function, dir, release, &mut admin)?
        }
        (Mode::Nginx | Mode::NginxTls, Some(b)) => nginx(listen, tls, b, dir, threads)?,
        (Mode::Haproxy | Mode::HaproxyTls, Some(b)) => haproxy(listen, tls, b, dir, threads)?,
        _ => unreachable!("backend presence checked above"),
    };
    if let Some(cpus) = placement.cpus() {
        placement::pin(&mut cmd, cpus.proxy);
    }
    let log = std::fs::File::create(dir.join(format!("{}.log", mode.name())))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", mode.name()))?;
    wait_listening(listen, &mut child, mode.name())?;
    let root_pid = Some(child.id());
    let running = Running {
        target: listen,
        tls: mode.tls(),
        admin,
        child: Some(child),
        root_pid,
        count_children: matches!(mode, Mode::Nginx | Mode::NginxTls),
    };
    if mode == Mode::WsedgeZeroHop {
        // Cold-start the instance before the load, as every other mode's backend is already
        // running; it then stays warm (keep_warm_s) for the whole measurement.
        warm_up(listen).context("cold-starting the zero-hop instance")?;
    }
    Ok(running)
}

/// One WebSocket connection through the proxy: upgrade (101), then a clean close both ways,
/// so it ends as a client's would.
fn warm_up(proxy: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(
        format!(
            "GET /echo HTTP/1.1\r\nHost: {proxy}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break head.len();
        }
        head.extend_from_slice(&buf[..n]);
    };
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!(
            "upgrade answered {:?}",
            String::from_utf8_lossy(&head)
                .lines()
                .next()
                .unwrap_or("nothing")
        );
    }
    // Close 1000, masked with the key 1,2,3,4; the echo answers with its own close frame.
    s.write_all(&[0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2])?;
    let mut rest = head.split_off(end);
    while rest.first() != Some(&0x88) {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("the connection ended without a close frame");
        }
        rest.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

fn write(path: PathBuf, text: String) -> Result<PathBuf> {
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The zero-hop mode's function: the bench's echo backend as a spawned instance in its own
/// network namespace, listening on 0.0.0.0:$PORT, one instance for every connection,
/// sandboxed as any instance (as `nobody`, with room for its thousands of connections). It
/// would inherit wsedge's CPU; `--cpu` puts it on the backend's, as in every other mode.
fn zero_hop_function(release: &Path, placement: Placement) -> String {
    let cpu = placement
        .cpus()
        .map_or(String::new(), |c| format!(", \"--cpu\", \"{}\"", c.backend));
    format!(
        "command = [\"{}\", \"echo\"{cpu}]\nisolation = \"netns\"\nuser = \"nobody\"\n\
         instance_concurrency = 100000\nmax_instances = 1\nmemory_mb = 1024\npids_max = 64\ncpu = 1.0",
        release.join("bench").display()
    )
}

/// wsedge with the rate quotas off (but for `wsedge-kernel-quotas`, which keeps the
/// defaults), so they do not shape the load; `instances` is the
/// function's `upstreams` or `command` lines. With `tls`, `listen` is its `tls_listen` and
/// plain `ws://` goes to a port nobody uses.
fn wsedge(
    mode: Mode,
    listen: SocketAddr,
    tls: Option<&Pki>,
    instances: &str,
    dir: &Path,
    release: &Path,
    admin_addr: &mut Option<SocketAddr>,
) -> Result<Command> {
    let plane = match mode {
        Mode::WsedgeUserspace => "userspace",
        Mode::WsedgeTls => "auto",
        _ => "kernel",
    };
    let listeners = match tls {
        Some(pki) => format!(
            "listen = \"127.0.0.1:{}\"\ntls_listen = \"{listen}\"\ntls_cert = \"{}\"\n\
             tls_key = \"{}\"\ntls_handshake_timeout_s = 10\n",
            free_port()?,
            pki.cert.display(),
            pki.key.display()
        ),
        None => format!("listen = \"{listen}\"\n"),
    };
    let admin = free_port()?;
    *admin_addr = Some(SocketAddr::from(([127, 0, 0, 1], admin)));
    let rates = match mode {
        Mode::WsedgeQuotas => "",
        _ => "messages_per_s = 0\nbytes_per_s = 0\n",
    };
    let trace = match mode {
        Mode::WsedgeNoTrace => "kernel_trace = false\n",
        _ => "",
    };
    let config = write(
        dir.join(format!("{}.toml", mode.name())),
        format!(
            "[server]\n{listeners}admin_listen = \"127.0.0.1:{admin}\"\n{trace}\
             data_plane = \"{plane}\"\nstate_dir = \"{state}\"\ndrain_timeout_s = 1\n\n\
             [[function]]\nname = \"echo\"\nroute = \"/\"\n{instances}\n\
             idle_timeout_s = 7200\nexecution_timeout_s = 7200\n\
             [function.limits]\nmax_message_bytes = 262144\n{rates}",
            state = dir.display()
        ),
    )?;
    let mut cmd = Command::new(release.join("wsedge"));
    cmd.arg("run").arg("-c").arg(config).env("RUST_LOG", "warn");
    Ok(cmd)
}

/// nginx as a WebSocket reverse proxy: a worker per CPU it may use, long timeouts, no logs;
/// with `tls`, TLS 1.3 with the one cipher suite only.
fn nginx(
    listen: SocketAddr,
    tls: Option<&Pki>,
    backend: SocketAddr,
    dir: &Path,
    workers: usize,
) -> Result<Command> {
    let d = dir.display();
    let (ssl, ssl_config) = match tls {
        Some(pki) => (
            " ssl",
            format!(
                "    ssl_certificate {};\n    ssl_certificate_key {};\n\
                     ssl_protocols TLSv1.3;\n    ssl_conf_command Ciphersuites {};\n",
                pki.cert.display(),
                pki.key.display(),
                TLS_CIPHER_SUITE
            ),
        ),
        None => ("", String::new()),
    };
    let config = write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes {workers};\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n\
             error_log {d}/nginx-error.log error;\n\
             events {{ worker_connections 20000; multi_accept on; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n\
               proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fcgi;\n\
               uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
               upstream echo {{ server {backend}; }}\n\
               server {{\n    listen {listen}{ssl} backlog=4096;\n{ssl_config}    location / {{\n\
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

/// HAProxy in HTTP mode (it recognises the upgrade and tunnels): a thread per CPU it may use,
/// long tunnel timeouts, no logs. maxconn is what the 20000-descriptor hard limit allows.
/// With `tls`, TLS 1.3 with the one cipher suite only.
fn haproxy(
    listen: SocketAddr,
    tls: Option<&Pki>,
    backend: SocketAddr,
    dir: &Path,
    threads: usize,
) -> Result<Command> {
    let ssl = tls.map_or(String::new(), |pki| {
        format!(
            " ssl crt {} ssl-min-ver TLSv1.3 ciphersuites {TLS_CIPHER_SUITE}",
            pki.cert_key.display()
        )
    });
    let config = write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread {threads}\n  maxconn 9900\n\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n\
               timeout server 1h\n  timeout tunnel 1h\n\n\
             frontend ws\n  bind {listen}{ssl}\n  default_backend echo\n\n\
             backend echo\n  server echo {backend} maxconn 9900\n",
        ),
    )?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(config);
    Ok(cmd)
}
