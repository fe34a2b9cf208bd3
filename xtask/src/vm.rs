//! Running things on another kernel: a qemu guest (TCG: no KVM on the development VM) that
//! boots a distribution's kernel and sees this machine's whole filesystem, so test binaries
//! built here find their peers (python3, node, the built `wsedge` and `bench`, cargo) at the
//! same paths as on the host.
//!
//! The cloud kernels have no 9p, so the host root is shared with virtiofs (virtiofsd, a
//! vhost-user device: needs shared guest memory), mounted read-only under an overlay whose
//! upper layer is guest tmpfs: tests may write anywhere (target/, /tmp) and nothing reaches
//! the host. A tiny initramfs (static busybox, the virtio/fuse modules) builds that root,
//! loads the kernel modules the tests need, mounts bpffs and cgroup2, and chroots into it to
//! run `xtask vm-guest PLAN`, which runs the plan's commands and reports each outcome on the
//! serial console as an `xtask-vm: outcome {json}` line the host reads.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{cmd, setup};

/// The kernels `--kernel` knows: name and the apt package (the newest ABI that matches).
const KERNELS: [(&str, &str); 1] = [(
    "debian-6.1",
    r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
)];

/// What the initramfs loads before it can see the host: virtio PCI and virtiofs, with their
/// dependencies (from modules.dep).
const BOOT_MODULES: [&str; 2] = ["virtio_pci", "virtiofs"];

/// Loaded from the shared root once it is mounted: overlay builds the root; the rest are what
/// the tests need (kTLS and the AEAD it asks the crypto API for).
const ROOT_MODULES: [&str; 1] = ["overlay"];
pub const TEST_MODULES: [&str; 6] = [
    "tls",
    "gcm",
    "ctr",
    "ghash-generic",
    "aesni-intel",
    "ghash-clmulni-intel",
];

const GUEST_MEMORY_MB: u64 = 6144;
const GUEST_CPUS: u32 = 2;
const VIRTIOFS_TAG: &str = "hostroot";

/// A line the guest prints for each finished command.
const OUTCOME_PREFIX: &str = "xtask-vm: outcome ";
/// The guest's last line before it powers off.
const DONE_LINE: &str = "xtask-vm: done";

/// How long a booted guest may take beyond the commands' own time limits.
const BOOT_MARGIN: Duration = Duration::from_secs(300);

/// A kernel ready to boot: its image and its unpacked modules.
pub struct Kernel {
    pub package: String,
    pub release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

/// The apt package for `name` (or `package` when given).
fn kernel_package(name: &str, package: Option<&str>) -> Result<String> {
    let Some((_, pattern)) = KERNELS.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = KERNELS.iter().map(|(n, _)| *n).collect();
        bail!("unknown kernel {name:?}; known: {}", known.join(", "));
    };
    if let Some(p) = package {
        return Ok(p.to_owned());
    }
    let found = cmd::output(cmd::new("apt-cache").args(["search", "--names-only", pattern]))
        .unwrap_or_default();
    let mut names: Vec<String> = found
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    // The ABI number after 6.1.0- orders them (apt-cache lists them by name).
    names.sort_by_key(|n| abi_number(n));
    names
        .pop()
        .with_context(|| format!("no apt package matches {pattern} (run `apt-get update` first?)"))
}

fn abi_number(package: &str) -> u32 {
    package
        .split('-')
        .find_map(|part| part.parse().ok())
        .unwrap_or(0)
}

/// Downloads (once) and unpacks `name`'s kernel package under target/kernels/.
pub fn prepare_kernel(name: &str, package: Option<&str>) -> Result<Kernel> {
    let package = kernel_package(name, package)?;
    let dir = cmd::root().join("target/kernels").join(&package);
    let unpacked = dir.join("root");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = || {
        std::fs::read_dir(&dir).ok().and_then(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        })
    };
    cmd::checking(&format!("kernel package {package}"));
    if deb().is_none() {
        println!("downloading");
        cmd::run(
            cmd::new("apt-get")
                .args(["download", &package])
                .current_dir(&dir),
        )?;
    } else {
        println!("ok");
    }
    let deb = deb().context("apt-get download left no .deb")?;
    let modules_root = unpacked.join("lib/modules");
    if !modules_root.is_dir() {
        let _ = std::fs::remove_dir_all(&unpacked);
        cmd::run(cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let release = std::fs::read_dir(&modules_root)
        .with_context(|| format!("reading {}", modules_root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules/<release>")?;
    let modules = modules_root.join(&release);
    // Debian generates modules.dep at install time; busybox's depmod does it here, and its
    // modprobe (in the guest) reads it.
    if !modules.join("modules.dep").is_file() {
        cmd::run(
            cmd::new(busybox())
                .args(["depmod", "-b"])
                .arg(&unpacked)
                .arg(&release),
        )?;
    }
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing", vmlinuz.display());
    }
    Ok(Kernel {
        package,
        release,
        vmlinuz,
        modules,
    })
}

fn busybox() -> &'static str {
    "/bin/busybox"
}

/// The virtiofsd binary: qemu's C one (Debian 12, in qemu-system-common) or the Rust one
/// (its own package from Debian 13 on).
fn virtiofsd() -> Option<PathBuf> {
    ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether `path` is a statically linked executable (no ELF interpreter to name), as the
/// initramfs has no libraries.
fn is_static(path: &str) -> bool {
    std::fs::read(path)
        .is_ok_and(|bytes| !bytes.windows(b"/ld-linux".len()).any(|w| w == b"/ld-linux"))
}

/// Installs what booting a guest needs: qemu, virtiofsd, a static busybox.
pub fn tools() -> Result<()> {
    cmd::checking("qemu-system-x86_64, virtiofsd and a static busybox");
    let mut missing = Vec::new();
    if !cmd::exists("qemu-system-x86_64") {
        missing.push("qemu-system-x86");
    }
    if !is_static(busybox()) {
        missing.push("busybox-static");
    }
    if virtiofsd().is_none() && !missing.contains(&"qemu-system-x86") {
        missing.push("virtiofsd");
    }
    if missing.is_empty() {
        println!("ok");
        return Ok(());
    }
    println!("missing {}", missing.join(", "));
    setup::apt_install(&missing, "the VM tools")?;
    if virtiofsd().is_none() {
        setup::apt_install(&["virtiofsd"], "virtiofsd")?;
    }
    if !is_static(busybox()) {
        bail!("{} is still not a static busybox", busybox());
    }
    Ok(())
}

/// One command for the guest to run.
pub struct GuestCommand {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
    /// Read its output as libtest's (an outcome with counts), or only its exit status.
    pub libtest: bool,
}

impl GuestCommand {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "program": self.program,
            "args": self.args,
            "cwd": self.cwd,
            "env": self.env,
            "timeout_s": self.timeout.as_secs(),
            "libtest": self.libtest,
        })
    }
}

/// The environment a command gets in the guest: what it would have here (PATH with the cargo
/// bin directory, HOME for rustup's and pyenv's shims), since the chroot starts with busybox
/// init's.
pub fn host_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in [
        "PATH",
        "HOME",
        "USER",
        "LANG",
        "RUSTUP_HOME",
        "CARGO_HOME",
        "PYENV_ROOT",
    ] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_owned(), v);
        }
    }
    if let Some(path) = cmd::new("true")
        .get_envs()
        .find(|(k, _)| *k == "PATH")
        .and_then(|(_, v)| v)
    {
        let mut path = path.to_string_lossy().into_owned();
        // The interpreter itself ahead of any shim: pyenv's python3 shim starts several
        // processes before Python, which under TCG took 5-8 s of a test instance's 10 s
        // start budget (Python itself about 3 s). Same interpreter, found sooner.
        let script = "import os, sys; print(os.path.dirname(sys.executable))";
        if let Some(dir) = cmd::output(cmd::new("python3").args(["-c", script])) {
            path = format!("{}:{path}", dir.trim());
        }
        env.insert("PATH".into(), path);
    }
    env
}

/// What the guest reported for one command: the JSON of its outcome line.
pub type Reports = BTreeMap<String, Value>;

/// Boots `kernel` and runs `commands` in it; returns each command's report (a command missing
/// from the map never reported: the guest died, hung or ran out of time).
pub fn run(kernel: &Kernel, commands: &[GuestCommand]) -> Result<Reports> {
    let work = cmd::root().join("target/vm");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let plan = work.join("plan.json");
    let plan_json =
        json!({ "commands": commands.iter().map(GuestCommand::to_json).collect::<Vec<_>>() });
    std::fs::write(&plan, serde_json::to_vec_pretty(&plan_json)?)
        .with_context(|| format!("writing {}", plan.display()))?;
    // A copy of this very executable: the workspace build may have replaced (and cargo
    // deleted) the file it was started from, and guest and host must speak the same plan.
    let xtask = work.join("xtask-guest");
    std::fs::copy("/proc/self/exe", &xtask)
        .with_context(|| format!("copying /proc/self/exe to {}", xtask.display()))?;
    let initrd = work.join("initramfs.cpio");
    write_initramfs(kernel, &initrd, &xtask, &plan)?;

    let socket = work.join("virtiofsd.sock");
    let _ = std::fs::remove_file(&socket);
    let virtiofsd = virtiofsd().context("virtiofsd is missing")?;
    let mut fsd = Command::new(&virtiofsd);
    if virtiofsd.ends_with("qemu/virtiofsd") {
        // The namespace sandbox's pivot_root fails when the shared directory is `/`.
        fsd.arg(format!("--socket-path={}", socket.display()))
            .args([
                "-o",
                "source=/",
                "-o",
                "cache=always",
                "-o",
                "sandbox=chroot",
            ]);
    } else {
        fsd.arg(format!("--socket-path={}", socket.display()))
            .args(["--shared-dir=/", "--cache=always", "--sandbox=chroot"]);
    }
    let fsd_log = work.join("virtiofsd.log");
    let mut fsd = Guard(
        fsd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&fsd_log)?)
            .stderr(std::fs::File::create(&fsd_log)?.try_clone()?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", virtiofsd.display()))?,
    );
    let started = Instant::now();
    while !socket.exists() {
        if started.elapsed() > Duration::from_secs(10) || fsd.0.try_wait()?.is_some() {
            bail!(
                "virtiofsd did not create its socket; see {}",
                fsd_log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let console = work.join("console.log");
    let mem = format!("{GUEST_MEMORY_MB}M");
    let mut qemu = cmd::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", &mem])
        .args(["-smp", &GUEST_CPUS.to_string()])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-chardev"])
        .arg(format!(
            "stdio,id=console,signal=off,logfile={}",
            console.display()
        ))
        .args(["-serial", "chardev:console"])
        // vhost-user needs the guest's memory shared with virtiofsd.
        .args(["-object"])
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .args(["-numa", "node,memdev=mem"])
        .args(["-chardev"])
        .arg(format!("socket,id=fs,path={}", socket.display()))
        .args(["-device"])
        .arg(format!("vhost-user-fs-pci,chardev=fs,tag={VIRTIOFS_TAG}"))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 loglevel=4 panic=-1"]);
    println!("xtask: running `{}`", cmd::display(&qemu));
    let limit = commands.iter().map(|c| c.timeout).sum::<Duration>() + BOOT_MARGIN;
    let booted = Instant::now();
    let mut child = Guard(
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .context("starting qemu-system-x86_64")?,
    );
    let (tx, lines) = mpsc::channel();
    let stdout = child.0.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        // The console is bytes (firmware escape sequences, CRLF), not always UTF-8.
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut reports = Reports::new();
    let mut done = false;
    loop {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(report) = line.strip_prefix(OUTCOME_PREFIX) {
                    match serde_json::from_str::<Value>(report) {
                        Ok(v) => {
                            let name = v["name"].as_str().unwrap_or("?").to_owned();
                            reports.insert(name, v);
                        }
                        Err(err) => println!("xtask: unreadable guest report ({err}): {report}"),
                    }
                } else {
                    done |= line.trim() == DONE_LINE;
                    println!("vm| {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if booted.elapsed() > limit {
            println!(
                "xtask: the guest ran past {}s; stopping it",
                limit.as_secs()
            );
            break;
        }
    }
    // The console closes as qemu shuts down; let it finish on its own before the kill.
    let exiting = Instant::now();
    while child.0.try_wait()?.is_none() && exiting.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.0.kill();
    let status = child.0.wait()?;
    println!(
        "xtask: the guest ran {:.0}s (qemu {status}); console log: {}",
        booted.elapsed().as_secs_f64(),
        console.display()
    );
    if !done {
        println!("xtask: the guest never said it was done");
    }
    drop(fsd);
    Ok(reports)
}

/// Kills the process group of a child when dropped (qemu, virtiofsd), also on errors.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        use nix::{sys::signal, unistd::Pid};
        let _ = signal::killpg(Pid::from_raw(self.0.id() as i32), signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Modules from `modules.dep` to load `targets`, dependencies first (paths relative to the
/// modules directory); a built-in target is skipped.
fn load_order(modules_dep: &str, targets: &[&str]) -> Result<Vec<String>> {
    let deps: BTreeMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m.trim(), d.split_whitespace().collect()))
        .collect();
    let by_name = |name: &str| -> Option<&str> {
        let want = name.replace('-', "_");
        deps.keys().copied().find(|path| {
            let file = path.rsplit('/').next().unwrap_or(path);
            let stem = file.split(".ko").next().unwrap_or(file);
            stem.replace('-', "_") == want
        })
    };
    fn visit<'a>(m: &'a str, deps: &BTreeMap<&'a str, Vec<&'a str>>, out: &mut Vec<String>) {
        if out.iter().any(|o| o == m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, out);
        }
        out.push(m.to_owned());
    }
    let mut out = Vec::new();
    for t in targets {
        match by_name(t) {
            Some(path) => visit(path, &deps, &mut out),
            None => println!("xtask: {t} is not a module of this kernel (built in?)"),
        }
    }
    Ok(out)
}

/// The guest's /init: load the boot modules, mount the host's root (read-only) under a tmpfs
/// overlay, give it what the tests need, chroot into it to run `xtask vm-guest`, power off.
fn init_script(kernel: &Kernel, boot_modules: &[String], xtask: &Path, plan: &Path) -> String {
    let release = &kernel.release;
    let modules = kernel.modules.display();
    let insmods: String = boot_modules
        .iter()
        .map(|m| {
            let file = m.rsplit('/').next().unwrap_or(m);
            format!("insmod /boot-modules/{file} || fail \"insmod {file}\"\n")
        })
        .collect();
    let modprobes: String =
        ROOT_MODULES
            .iter()
            .map(|m| format!("modprobe {m} || fail \"modprobe {m}\"\n"))
            .chain(TEST_MODULES.iter().map(|m| {
                format!("modprobe {m} || echo \"xtask-vm: warning: modprobe {m} failed\"\n")
            }))
            .collect();
    format!(
        r#"#!/bin/sh
export PATH=/bin
fail() {{ echo "xtask-vm: boot failed: $1"; poweroff -f; sleep 10; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "xtask-vm: kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime)s"
{insmods}mount -t virtiofs -o ro {VIRTIOFS_TAG} /host || fail "mounting the host root"
mkdir -p /lib/modules/{release}
# modprobe here, and the kernel's own module requests (/sbin/modprobe of this root), use the
# kernel package's modules.
mount --bind /host{modules} /lib/modules/{release} || fail "binding the modules"
{modprobes}mount -t tmpfs -o size=50% tmpfs /rw || fail "tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail "overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/run
mount -t bpf bpf $R/sys/fs/bpf || fail "bpffs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || fail "cgroup2"
mkdir -p $R/lib/modules/{release}
mount --bind /lib/modules/{release} $R/lib/modules/{release}
ip link set lo up
ulimit -n 65536
echo "xtask-vm: root ready after $(cut -d' ' -f1 /proc/uptime)s; loaded: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
chroot $R '{xtask}' vm-guest '{plan}'
echo "xtask-vm: vm-guest exited with $? after $(cut -d' ' -f1 /proc/uptime)s"
echo "{DONE_LINE}"
poweroff -f
sleep 10
"#,
        xtask = xtask.display(),
        plan = plan.display(),
    )
}

fn write_initramfs(kernel: &Kernel, out: &Path, xtask: &Path, plan: &Path) -> Result<()> {
    let dep = std::fs::read_to_string(kernel.modules.join("modules.dep"))?;
    let boot = load_order(&dep, &BOOT_MODULES)?;
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "sbin", "proc", "sys", "dev", "host", "rw", "newroot", "lib",
    ] {
        cpio.dir(dir);
    }
    cpio.dir("lib/modules");
    cpio.dir("boot-modules");
    cpio.file("bin/busybox", 0o755, &std::fs::read(busybox())?);
    for applet in [
        "sh", "mount", "mkdir", "insmod", "modprobe", "chroot", "poweroff", "echo", "cut", "tr",
        "uname", "ip", "sleep", "cat",
    ] {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    // The kernel runs /sbin/modprobe for module requests (e.g. a cipher kTLS asks for).
    cpio.symlink("sbin/modprobe", "../bin/busybox");
    for m in &boot {
        let file = m.rsplit('/').next().unwrap_or(m);
        cpio.file(
            &format!("boot-modules/{file}"),
            0o644,
            &std::fs::read(kernel.modules.join(m))?,
        );
    }
    cpio.file(
        "init",
        0o755,
        init_script(kernel, &boot, xtask, plan).as_bytes(),
    );
    std::fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))
}

/// A newc cpio archive (what the kernel unpacks as initramfs; uncompressed is fine).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// `xtask vm-guest PLAN`: runs in the guest, each command of the plan in turn, and prints an
/// outcome line for each (the host reads them from the console).
pub fn guest(plan: &Path) -> Result<()> {
    let plan: Value = serde_json::from_slice(
        &std::fs::read(plan).with_context(|| format!("reading {}", plan.display()))?,
    )?;
    let commands = plan["commands"].as_array().cloned().unwrap_or_default();
    for c in commands {
        let name = c["name"].as_str().unwrap_or("?").to_owned();
        let mut command = Command::new(c["program"].as_str().unwrap_or_default());
        command.env_clear();
        for (k, v) in c["env"].as_object().into_iter().flatten() {
            command.env(k, v.as_str().unwrap_or_default());
        }
        for a in c["args"].as_array().into_iter().flatten() {
            command.arg(a.as_str().unwrap_or_default());
        }
        command.current_dir(c["cwd"].as_str().unwrap_or("/"));
        let timeout = Duration::from_secs(c["timeout_s"].as_u64().unwrap_or(600));
        let started = Instant::now();
        let report = if c["libtest"].as_bool().unwrap_or(false) {
            let o = crate::test::run_one(&name, command, timeout)?;
            json!({
                "name": name,
                "passed": o.passed,
                "failed": o.failed,
                "ignored": o.ignored,
                "summaries": o.summaries,
                "failed_tests": o.failed_tests,
                "broken": o.broken,
            })
        } else {
            println!("xtask-vm: running {name}: `{}`", cmd::display(&command));
            let status = command
                .stdin(Stdio::null())
                .status()
                .with_context(|| format!("starting {name}"))?;
            json!({ "name": name, "exit": status.code() })
        };
        let mut report = report;
        report["seconds"] = json!(started.elapsed().as_secs_f64());
        println!("{OUTCOME_PREFIX}{report}");
    }
    Ok(())
}

/// `cargo xtask vm`: `command` in a guest, from the workspace root; fails unless it exits 0.
pub fn run_command(
    kernel: &str,
    package: Option<&str>,
    command: &[String],
    timeout: Duration,
) -> Result<()> {
    tools()?;
    let kernel = prepare_kernel(kernel, package)?;
    let (program, args) = command.split_first().context("no command given")?;
    // A relative path is the workspace's, as the guest starts elsewhere.
    let program = match cmd::root().join(program) {
        p if p.exists() => p,
        _ => PathBuf::from(program),
    };
    let reports = run(
        &kernel,
        &[GuestCommand {
            name: "command".into(),
            program,
            args: args.to_vec(),
            cwd: cmd::root().to_owned(),
            env: host_env(),
            timeout,
            libtest: false,
        }],
    )?;
    match reports.get("command").map(|r| r["exit"].as_i64()) {
        Some(Some(0)) => Ok(()),
        Some(Some(code)) => bail!("the command exited with {code} on {}", kernel.release),
        Some(None) => bail!("the command was killed by a signal on {}", kernel.release),
        None => bail!("the guest never reported the command's end"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies_and_builtins_are_skipped() {
        let dep = "kernel/drivers/virtio/virtio_ring.ko:\n\
                   kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/fs/fuse/fuse.ko:\n\
                   kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
                   kernel/arch/x86/crypto/aesni-intel.ko: kernel/crypto/cryptd.ko\n\
                   kernel/crypto/cryptd.ko:\n";
        let order = load_order(dep, &["virtiofs", "aesni_intel", "not_a_module"]).unwrap();
        let names: Vec<&str> = order
            .iter()
            .map(|p| p.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "fuse.ko",
                "virtio_ring.ko",
                "virtio.ko",
                "virtiofs.ko",
                "cryptd.ko",
                "aesni-intel.ko"
            ]
        );
    }

    #[test]
    fn the_newest_abi_is_the_largest_number() {
        let mut names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-10-cloud-amd64-unsigned",
        ];
        names.sort_by_key(|n| abi_number(n));
        assert_eq!(
            names.last().unwrap(),
            &"linux-image-6.1.0-57-cloud-amd64-unsigned"
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
