//! The shared set-up step of `demo` and `test`: install what is missing.
//!
//! Each check prints one line, `xtask: checking WHAT ... ok`, or says what it installs.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::cmd;

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: [&str; 4] = ["llvm-22-dev", "libpolly-22-dev", "libz3-dev", "zlib1g-dev"];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

/// Checks (and where possible installs) everything the build and the tests need.
pub fn run() -> Result<()> {
    rust_src()?;
    llvm()?;
    bpf_linker()?;
    bpffs();
    nftables()?;
    // deploy/tests/check.sh verifies the systemd unit.
    debian_tool(
        "systemd-analyze (systemd)",
        || cmd::exists("systemd-analyze"),
        &["systemd"],
    )?;
    Ok(())
}

/// The eBPF crate is built with `-Z build-std=core`, which needs the standard library's source.
fn rust_src() -> Result<()> {
    cmd::checking("rust-src");
    let installed = cmd::output(cmd::new("rustup").args(["component", "list", "--installed"]))
        .context("`rustup component list --installed` failed: is rustup installed?")?;
    if installed
        .lines()
        .any(|line| line.trim().starts_with("rust-src"))
    {
        println!("ok");
        return Ok(());
    }
    println!("missing, installing");
    cmd::run(cmd::new("rustup").args(["component", "add", "rust-src"]))
}

/// bpf-linker links against LLVM 22's shared library and needs its headers to build.
fn llvm() -> Result<()> {
    cmd::checking(&format!("LLVM 22 ({LLVM_PREFIX})"));
    if llvm_present() {
        println!("ok");
        return Ok(());
    }
    let packages = LLVM_PACKAGES.join(" ");
    println!("missing");
    apt_install(&LLVM_PACKAGES, "LLVM 22 (for bpf-linker)")?;
    if !llvm_present() {
        bail!("apt-get installed {packages} but {LLVM_PREFIX}/lib/libLLVM.so is still missing");
    }
    Ok(())
}

fn llvm_present() -> bool {
    let prefix = Path::new(LLVM_PREFIX);
    prefix.join("lib/libLLVM.so").exists() && prefix.join("include/llvm").is_dir()
}

/// The linker for the eBPF target, installed with cargo against the system's LLVM 22.
fn bpf_linker() -> Result<()> {
    cmd::checking("bpf-linker");
    if let Some(version) = bpf_linker_version() {
        println!("ok ({version})");
        return Ok(());
    }
    println!("missing, installing bpf-linker {BPF_LINKER_VERSION} (takes about 2 minutes)");
    let install = |locked: bool| {
        let mut cargo = cmd::cargo();
        cargo.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            cargo.arg("--locked");
        }
        // bpf-linker's build script reads LLVM_PREFIX, llvm-sys reads LLVM_SYS_221_PREFIX:
        // with only the latter the link fails with "unable to find library -lLLVM".
        cargo
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX);
        cmd::run(&mut cargo)
    };
    if let Err(err) = install(true) {
        println!("xtask: {err:#}; retrying without --locked");
        install(false)?;
    }
    match bpf_linker_version() {
        Some(version) => {
            println!("xtask: installed {version}");
            Ok(())
        }
        None => bail!("bpf-linker was installed but `bpf-linker --version` still fails"),
    }
}

fn bpf_linker_version() -> Option<String> {
    let out = cmd::output(cmd::new("bpf-linker").arg("--version"))?;
    Some(out.trim().to_owned())
}

/// The proxy pins its maps under /sys/fs/bpf. Not fatal: without it kernel tests skip or fail
/// with their own message.
fn bpffs() {
    cmd::checking(&format!("bpffs at {BPFFS}"));
    if bpffs_mounted() {
        println!("ok");
        return;
    }
    if !cmd::is_root() {
        println!("not mounted");
        println!("xtask: warning: not root, cannot mount it (`mount -t bpf bpf {BPFFS}` as root)");
        return;
    }
    println!("not mounted, mounting");
    match cmd::run(cmd::new("mount").args(["-t", "bpf", "bpf", BPFFS])) {
        Ok(()) if bpffs_mounted() => println!("xtask: mounted bpffs at {BPFFS}"),
        Ok(()) => println!("xtask: warning: mount succeeded but {BPFFS} is still not bpffs"),
        Err(err) => println!("xtask: warning: {err:#}"),
    }
}

/// Where Debian's `golang-github-gorilla-websocket-dev` puts its source: the Go example
/// builds against it in GOPATH mode, offline.
const GORILLA_WEBSOCKET: &str = "/usr/share/gocode/src/github.com/gorilla/websocket";

/// What the tests run besides the test peers: Go (and the Go example's WebSocket library),
/// Redis for the chat room, Chromium for its browser test, tmux, the terminal that
/// `wsedge top`'s test reads its screen from, and bpftool and bpftrace. Only `test` asks: the demo runs none of them.
pub fn test_tools() -> Result<()> {
    debian_tool(
        "go and gorilla/websocket",
        // `go` has no `--version`: `go version` is its probe.
        || {
            cmd::output(cmd::new("go").arg("version")).is_some()
                && Path::new(GORILLA_WEBSOCKET).join("go.mod").is_file()
        },
        &["golang-go", "golang-github-gorilla-websocket-dev"],
    )?;
    debian_tool(
        "redis-server",
        || cmd::exists("redis-server"),
        &["redis-server"],
    )?;
    debian_tool("chromium", || cmd::exists("chromium"), &["chromium"])?;
    // tmux answers `-V`, not `--version`.
    debian_tool(
        "tmux",
        || cmd::output(cmd::new("tmux").arg("-V")).is_some(),
        &["tmux"],
    )?;
    // The tests read wsedge's pinned maps with bpftool and run the README's bpftrace
    // recipes.
    debian_tool(
        "bpftool",
        || cmd::output(cmd::new("bpftool").arg("version")).is_some(),
        &["bpftool"],
    )?;
    debian_tool(
        "bpftrace",
        || cmd::output(cmd::new("bpftrace").arg("--version")).is_some(),
        &["bpftrace"],
    )
}

/// One `checking WHAT` line: `present` or else apt-get installs `packages`.
fn debian_tool(what: &str, present: impl Fn() -> bool, packages: &[&str]) -> Result<()> {
    cmd::checking(what);
    if present() {
        println!("ok");
        return Ok(());
    }
    println!("missing");
    apt_install(packages, what)?;
    if !present() {
        bail!(
            "apt-get installed {} but {what} is still missing",
            packages.join(" ")
        );
    }
    Ok(())
}

/// `network = "egress"` instances are NATed and fenced off with an nftables table that wsedge
/// loads with `nft -f -`; the egress tests fail without it.
fn nftables() -> Result<()> {
    cmd::checking("nft (nftables)");
    if let Some(version) = cmd::output(cmd::new("nft").arg("--version")) {
        println!("ok ({})", version.trim());
        return Ok(());
    }
    println!("missing");
    apt_install(&["nftables"], "nft (for network = \"egress\")")
}

/// A line `bpf /sys/fs/bpf bpf ...` (source, mount point, type) in /proc/mounts.
fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace().skip(1);
            fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
        })
    })
}

/// Installs Debian `packages` with apt-get (as root on Debian), or fails saying how to.
pub fn apt_install(packages: &[&str], what: &str) -> Result<()> {
    let list = packages.join(" ");
    if !(Path::new("/etc/debian_version").exists() && cmd::is_root()) {
        bail!(
            "{what} is missing; install it, on Debian as root with:\n  \
             apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {list}"
        );
    }
    println!("xtask: installing {list} with apt-get");
    cmd::run(
        cmd::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        cmd::new("apt-get")
            .args(["install", "-y"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("installing {what} with apt-get"))
}
