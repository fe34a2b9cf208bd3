//! Builds `proxy-ebpf` for the BPF target and leaves the object in OUT_DIR.
//!
//! Without bpf-linker the userspace crates must still check, build and run (with the userspace
//! data plane), so the eBPF build is skipped with a warning and the loader reports why at
//! run time. `cargo xtask demo` / `cargo xtask test` install bpf-linker first.
//!
//! `WSEDGE_SKIP_EBPF=1` skips it on purpose: the fuzz crate (`proxy/fuzz`) links the library
//! with sanitizer flags and never loads the programs, so building them there only costs time.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out_dir.join("proxy-ebpf");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=WSEDGE_SKIP_EBPF");
    if env::var_os("WSEDGE_SKIP_EBPF").is_some_and(|v| v == "1") {
        fs::write(&object, [])?;
        return Ok(());
    }
    let have_linker = which::which("bpf-linker").is_ok();
    if !have_linker {
        println!(
            "cargo:warning=bpf-linker not found: building without the kernel data plane \
             (run `cargo xtask test` or `cargo xtask demo` to install it)"
        );
        // An empty object: the loader turns it into a clear "built without eBPF" error.
        fs::write(&object, [])?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proxy-ebpf");
    let root = root.canonicalize()?;
    let root = root.to_str().expect("utf-8 path");
    // The eBPF crate needs `-Z build-std=core`; RUSTC_BOOTSTRAP lets the stable toolchain
    // accept it for this inner build only.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )?;
    println!("cargo:rerun-if-changed={root}/../proxy-common/src");
    Ok(())
}
