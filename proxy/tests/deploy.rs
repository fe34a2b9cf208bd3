//! deploy/: the systemd unit passes `systemd-analyze verify`, install.sh installs into a tree
//! and as root on a copy of this host (mount and network namespaces), and wsedge runs there
//! under the unit's capability bounding set and no_new_privs: a sandboxed egress instance as
//! wsedge-fn, SIGHUP, SIGTERM, the ledger (deploy/tests/check.sh, under a second).

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_wsedge");

#[test]
fn the_unit_and_install_script_work_under_the_units_capabilities() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/tests/check.sh");
    let out = Command::new("sh")
        .arg(script)
        .arg(BIN)
        .arg(common::echo_fn())
        // The client in the script uses the `websockets` that `cargo xtask test` installs.
        .env("PYTHONPATH", common::python_peers_path())
        .output()
        .expect("sh runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "deploy/tests/check.sh failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.matches("check: ok:").count(), 7, "{stdout}");
}
