//! `network = "egress"`: outbound connections for an instance, through NAT on the host.
//!
//! Addressing: every instance gets its own address in 10.213.0.0/16 on `eth0` in its
//! namespace, the other end of a veth pair sits on the host as `wse<4 hex digits>` (the
//! address's low 16 bits, so the name is unique exactly when the address is). Every host-side
//! end carries the same gateway address, 10.213.0.1/32, plus a /32 route to its one instance;
//! the instance has a link-scope route to the gateway and its default route through it. So
//! every instance reaches the host at one fixed address (`REDIS_URL=redis://10.213.0.1:6379`
//! works for all of them), and there is no bridge: instances share no layer-2 segment, and
//! anything between two of them has to be routed by the host, where the forward chain drops
//! it. Instances get no IPv6 (no link-local addresses either, and the firewall drops IPv6
//! from them).
//!
//! The firewall is one nftables table, `inet wsedge`, loaded with `nft -f -` as a whole
//! (replacing a crashed wsedge's leftover in the same transaction) and deleted at a clean
//! stop. Its rules name instance interfaces by the `wse*` prefix, so they never change as
//! instances come and go; only the set of admin API ports depends on the servers of this
//! process. Links and addresses are managed with iproute2's `ip -batch -`: iproute2 is on
//! every host wsedge runs on, one exec configures one side, and `nft` is an outside binary
//! anyway.

use std::{
    collections::BTreeSet,
    io::Write,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
};

use tracing::{error, info, warn};

use super::netns::NetNs;

/// The address every instance reaches the host at.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
/// Instance addresses: 10.213.0.2 up to 10.213.255.254.
const NETWORK: &str = "10.213.0.0/16";
/// Host-side interface names start with this; the firewall matches them by it.
const LINK_PREFIX: &str = "wse";
/// What a host-side link's alias starts with, followed by the owning wsedge's pid.
const ALIAS_PREFIX: &str = "wsedge pid ";
const TABLE: &str = "inet wsedge";
/// Host names taken by something else (another wsedge, a leftover) are skipped, up to this
/// many in a row.
const MAX_TAKEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(
        "`nft` cannot be run ({0}); network = \"egress\" needs nftables (Debian: apt-get install nftables)"
    )]
    NftMissing(std::io::Error),
    #[error("nft refused wsedge's ruleset: {0}")]
    Nft(String),
    #[error("`ip` cannot be run ({0}); network = \"egress\" needs iproute2")]
    IpMissing(std::io::Error),
    #[error("ip {what}: {stderr}")]
    Ip { what: &'static str, stderr: String },
    #[error("enabling net.ipv4.ip_forward (needed for NAT): {0}")]
    Forwarding(std::io::Error),
    #[error("no free instance address left in {NETWORK}")]
    AddressesExhausted,
    #[error("egress is unavailable: the firewall could not be set up at start ({0})")]
    FirewallMissing(String),
}

/// The firewall of this process's servers: which admin ports it fences off, and why it is
/// missing when it is.
#[derive(Default)]
struct FirewallState {
    /// One entry per server holding a [`Firewall`] (ports may repeat: several servers on
    /// port 0 in tests never do, but a release must only take away its own entry).
    admin_ports: Vec<u16>,
    failure: Option<String>,
}

static FIREWALL: Mutex<FirewallState> = Mutex::new(FirewallState {
    admin_ports: Vec::new(),
    failure: None,
});

/// A server's share of the `inet wsedge` table: while one exists in this process, the table
/// is loaded; releasing the last one deletes it. One table per host: a second wsedge process
/// with egress functions would replace the first one's admin ports (see the README).
pub struct Firewall {
    admin_port: u16,
    released: AtomicBool,
}

impl Firewall {
    /// Loads the table (replacing any leftover), fencing off `admin_port`, enables IPv4
    /// forwarding and removes host-side links of wsedge processes that are gone.
    pub fn install(admin_port: u16) -> Result<Firewall, EgressError> {
        let mut state = FIREWALL.lock().expect("firewall lock");
        let result = (|| {
            remove_dead_links();
            enable_forwarding()?;
            let mut ports = state.admin_ports.clone();
            ports.push(admin_port);
            load_ruleset(&ports)
        })();
        match result {
            Ok(()) => {
                state.admin_ports.push(admin_port);
                state.failure = None;
                info!(table = TABLE, gateway = %GATEWAY, network = NETWORK, admin_port,
                      "egress firewall loaded: instances reach the host at the gateway and the outside through NAT, not the admin API or each other");
                Ok(Firewall {
                    admin_port,
                    released: AtomicBool::new(false),
                })
            }
            Err(e) => {
                state.failure = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Takes this server's admin port out; the last server deletes the table.
    pub fn release(&self) {
        if self.released.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut state = FIREWALL.lock().expect("firewall lock");
        if let Some(i) = state.admin_ports.iter().position(|p| *p == self.admin_port) {
            state.admin_ports.remove(i);
        }
        let result = if state.admin_ports.is_empty() {
            nft(&format!("delete table {TABLE}\n"))
                .map(|()| info!(table = TABLE, "egress firewall removed"))
        } else {
            load_ruleset(&state.admin_ports)
        };
        if let Err(e) = result {
            warn!(table = TABLE, error = %e, "cannot update the egress firewall at stop; the next start replaces it");
        }
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        self.release();
    }
}

/// What `wsedge check` asks of a host with egress functions: `nft` and `ip` can be run.
pub fn check_tools() -> Result<(), EgressError> {
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    runs("nft", "--version").map_err(EgressError::NftMissing)?;
    runs("ip", "-V").map_err(EgressError::IpMissing)?;
    Ok(())
}

/// The whole table. Priority `filter - 10` puts wsedge's drops ahead of a host firewall's
/// accepts in the same hook.
fn ruleset(admin_ports: &[u16]) -> String {
    let ports: BTreeSet<u16> = admin_ports.iter().copied().collect();
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let nic = format!("\"{LINK_PREFIX}*\"");
    format!(
        "table {TABLE}
delete table {TABLE}
table {TABLE} {{
  set admin_ports {{
    type inet_service
    elements = {{ {ports} }}
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    # Instances have no IPv6; nothing of theirs gets in through a link-local address.
    iifname {nic} meta nfproto ipv6 drop
    # The admin API, on any of the host's addresses. A reset, so a function fails fast.
    iifname {nic} tcp dport @admin_ports reject with tcp reset
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname {nic} meta nfproto ipv6 drop
    # No instance reaches another.
    iifname {nic} oifname {nic} drop
    # Nothing from outside opens a connection to an instance; replies come back.
    oifname {nic} ct state established,related accept
    oifname {nic} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {NETWORK} oifname != {nic} masquerade
  }}
}}
"
    )
}

fn load_ruleset(admin_ports: &[u16]) -> Result<(), EgressError> {
    nft(&ruleset(admin_ports))
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> Result<(), EgressError> {
    let stderr = run_with_input(Command::new("nft").args(["-f", "-"]), script)
        .map_err(EgressError::NftMissing)?;
    match stderr {
        None => Ok(()),
        Some(stderr) => Err(EgressError::Nft(stderr)),
    }
}

/// Runs `command` with `input` on stdin: `Ok(None)` on success, `Ok(Some(stderr))` when it
/// failed, `Err` when it could not be run at all.
fn run_with_input(command: &mut Command, input: &str) -> std::io::Result<Option<String>> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).trim().to_owned()))
}

/// NAT needs the host to forward IPv4; wsedge leaves it on at stop (something else on the
/// host may have come to rely on it).
fn enable_forwarding() -> Result<(), EgressError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let on = std::fs::read_to_string(PATH).map_err(EgressError::Forwarding)?;
    if on.trim() != "1" {
        std::fs::write(PATH, "1").map_err(EgressError::Forwarding)?;
        warn!(
            sysctl = "net.ipv4.ip_forward",
            "enabled IPv4 forwarding for egress functions (it stays on after wsedge stops)"
        );
    }
    Ok(())
}

/// Host-side links whose owner is gone. The kernel removes a pair with its namespace, but
/// only once the namespace's last process has died: a start after a crash removes them now.
fn remove_dead_links() {
    // Asked once: the cgroups tell which wsedge processes are alive in any PID namespace.
    let cgroups = super::cgroup::root();
    let Ok(out) = Command::new("ip")
        .args(["-j", "link", "show", "type", "veth"])
        .stderr(Stdio::null())
        .output()
    else {
        return;
    };
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    for link in links {
        let (Some(name), Some(alias)) = (link["ifname"].as_str(), link["ifalias"].as_str()) else {
            continue;
        };
        let owner = alias
            .strip_prefix(ALIAS_PREFIX)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(owner) = owner else { continue };
        if !name.starts_with(LINK_PREFIX) || super::cgroup::owner_alive(cgroups.as_deref(), owner) {
            continue;
        }
        match ip_batch(&format!("link del dev {name}\n"), None) {
            Ok(()) => info!(link = name, owner, "removed a dead wsedge's instance link"),
            Err(e) => warn!(link = name, error = %e, "cannot remove a dead wsedge's instance link"),
        }
    }
}

/// Indexes (low 16 bits of the address) of this process's links.
static IN_USE: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
/// Where the search for a free index starts: addresses are not reused at once, so a late
/// packet for a stopped instance does not reach its successor.
static NEXT: AtomicU16 = AtomicU16::new(2);

/// An instance's veth pair: removing the host end removes both.
pub struct Link {
    index: u16,
    host_name: String,
    address: Ipv4Addr,
    removed: AtomicBool,
}

impl Link {
    /// Gives `ns` an `eth0` with a fresh address and a default route through the gateway;
    /// `instance` names the link's owner in its alias.
    pub fn create(ns: &NetNs, instance: &str) -> Result<Link, EgressError> {
        if let Some(failure) = firewall_failure() {
            return Err(EgressError::FirewallMissing(failure));
        }
        let mut taken = 0;
        let link = loop {
            let index = reserve_index()?;
            let link = Link {
                index,
                host_name: format!("{LINK_PREFIX}{index:04x}"),
                address: Ipv4Addr::from(u32::from(GATEWAY) & 0xffff_0000 | u32::from(index)),
                removed: AtomicBool::new(false),
            };
            let add = format!(
                "link add {} type veth peer name eth0 netns /proc/{}/fd/{}\n",
                link.host_name,
                std::process::id(),
                ns.raw_fd()
            );
            match ip_batch(&add, None) {
                Ok(()) => break link,
                // Another wsedge's (or a leftover): its index stays reserved here, and the
                // next one is tried.
                Err(EgressError::Ip { stderr, .. }) if stderr.contains("File exists") => {
                    link.removed.store(true, Ordering::Relaxed);
                    taken += 1;
                    if taken >= MAX_TAKEN {
                        return Err(EgressError::AddressesExhausted);
                    }
                }
                Err(e) => {
                    link.removed.store(true, Ordering::Relaxed);
                    IN_USE.lock().expect("address lock").remove(&index);
                    return Err(e);
                }
            }
        };
        let has_ipv6 = ipv6_present();
        let (host, address, gateway) = (&link.host_name, link.address, GATEWAY);
        let mut host_side = format!(
            "link set dev {host} alias \"{ALIAS_PREFIX}{} {instance}\"\n",
            std::process::id()
        );
        if has_ipv6 {
            host_side += &format!("link set dev {host} addrgenmode none\n");
        }
        host_side += &format!(
            "addr add {gateway}/32 dev {host}\n\
             link set dev {host} up\n\
             route add {address}/32 dev {host} src {gateway}\n"
        );
        ip_batch(&host_side, None)?;
        let mut instance_side = String::new();
        if has_ipv6 {
            instance_side += "link set dev eth0 addrgenmode none\n";
        }
        instance_side += &format!(
            "addr add {address}/32 dev eth0\n\
             link set dev eth0 up\n\
             route add {gateway}/32 dev eth0 scope link\n\
             route add default via {gateway} dev eth0 src {address}\n"
        );
        ip_batch(&instance_side, Some(ns))?;
        Ok(link)
    }

    /// The instance's address, where other instances cannot reach it.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// Deletes the pair now (the instance has exited); later calls do nothing.
    pub fn remove(&self) {
        if self.removed.swap(true, Ordering::Relaxed) {
            return;
        }
        // Gone already when the namespace went first: nothing to report then.
        if let Err(e) = ip_batch(&format!("link del dev {}\n", self.host_name), None)
            && !matches!(&e, EgressError::Ip { stderr, .. } if stderr.contains("Cannot find device"))
        {
            error!(link = %self.host_name, error = %e, "cannot remove an instance's link");
        }
        IN_USE.lock().expect("address lock").remove(&self.index);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.remove();
    }
}

fn firewall_failure() -> Option<String> {
    let state = FIREWALL.lock().expect("firewall lock");
    match (&state.failure, state.admin_ports.is_empty()) {
        (_, false) => None,
        (Some(failure), true) => Some(failure.clone()),
        (None, true) => Some("no server of this process loaded it".into()),
    }
}

/// The next index no link of this process uses, reserved.
fn reserve_index() -> Result<u16, EgressError> {
    let mut in_use = IN_USE.lock().expect("address lock");
    // 0 and 0xffff are the /16's network and broadcast addresses, 1 the gateway.
    const USABLE: u32 = 0xffff - 2;
    for _ in 0..USABLE {
        let index = NEXT.load(Ordering::Relaxed);
        NEXT.store(
            if index >= 0xfffe { 2 } else { index + 1 },
            Ordering::Relaxed,
        );
        if in_use.insert(index) {
            return Ok(index);
        }
    }
    Err(EgressError::AddressesExhausted)
}

fn ipv6_present() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

/// `ip -batch -` with `script`, in the namespace `ns` when given (else wsedge's own).
fn ip_batch(script: &str, ns: Option<&NetNs>) -> Result<(), EgressError> {
    let mut command = Command::new("ip");
    command.args(["-batch", "-"]);
    if let Some(ns) = ns {
        let fd = ns.raw_fd();
        // SAFETY: only setns between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let what = match ns {
        Some(_) => "(instance side)",
        None => "(host side)",
    };
    match run_with_input(&mut command, script).map_err(EgressError::IpMissing)? {
        None => Ok(()),
        Some(stderr) => Err(EgressError::Ip { what, stderr }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_fences_off_every_admin_port_once() {
        let rules = ruleset(&[9901, 9902, 9901]);
        assert!(rules.contains("elements = { 9901, 9902 }"), "{rules}");
        assert!(rules.starts_with("table inet wsedge\ndelete table inet wsedge\n"));
    }

    #[test]
    fn indexes_skip_network_gateway_and_broadcast() {
        NEXT.store(0xfffe, Ordering::Relaxed);
        let a = reserve_index().unwrap();
        let b = reserve_index().unwrap();
        assert_eq!((a, b), (0xfffe, 2));
        let mut in_use = IN_USE.lock().unwrap();
        in_use.remove(&a);
        in_use.remove(&b);
    }
}
