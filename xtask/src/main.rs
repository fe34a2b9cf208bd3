//! `cargo xtask`: the project's tasks (README, "Two commands").
//!
//! - `cargo xtask test [-- ARGS]`: set up what is missing, build everything, run every test.
//! - `cargo xtask demo`: set up, build, run wsedge with `deploy/demo.toml` and the echo function.
//! - `cargo xtask bench [--quick] [--modes M,..] [--workloads W,..] [--repeats N] [--cpus P]`:
//!   wsedge against nginx and HAProxy, side by side.

mod bench;
mod cmd;
mod demo;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "wsedge project tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Set up what is missing, build every target and run every test: each test binary on
    /// its own, killed and counted as failed after 10 minutes (`XTASK_TEST_TIMEOUT_S`).
    Test {
        /// Passed to the test binaries, e.g. `cargo xtask test -- --test-threads=1`.
        #[arg(last = true)]
        harness_args: Vec<String>,
    },
    /// Set up, build, and run wsedge with deploy/demo.toml and the demo echo function.
    Demo,
    /// The side-by-side benchmark: wsedge (kernel, zero-hop, userspace, TLS) against nginx and
    /// HAProxy (plain and TLS).
    Bench {
        /// Only the edge, bulk and push workloads, and handshake through the TLS modes, 5 s
        /// each (about 11 minutes with 3 repeats).
        #[arg(long)]
        quick: bool,
        /// Only these modes (comma-separated: direct, wsedge-kernel, wsedge-zero-hop,
        /// wsedge-userspace, nginx, haproxy, wsedge-tls, nginx-tls, haproxy-tls); "added"
        /// columns need direct among them. The TLS modes run edge, bulk and handshake.
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Only these workloads (comma-separated: edge, bulk, push, handshake, edge-max).
        /// A filtered run writes its results but leaves the README's table alone.
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Runs of every (mode, workload), interleaved in rounds (every mode once per round);
        /// the report gives the median and the min-max.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// CPU of each process: `load=0,proxy=1,backend=0` (the default; backend includes the
        /// zero-hop instance), or `none` to leave placement to the scheduler.
        #[arg(long, default_value_t = bench::DEFAULT_PLACEMENT)]
        cpus: bench::Placement,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Test { harness_args } => test::run(&harness_args),
        Task::Demo => demo::run(),
        Task::Bench {
            quick,
            modes,
            workloads,
            repeats,
            cpus,
        } => bench::run(&bench::Options {
            quick,
            modes,
            workloads,
            repeats,
            placement: cpus,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
