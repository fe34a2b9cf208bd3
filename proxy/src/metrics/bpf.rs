//! The eBPF programs' run counters. The kernel counts runs and their time only while BPF
//! stats are on: while someone holds a `BPF_ENABLE_STATS` descriptor (wsedge does with
//! `[server] bpf_stats = true`) or `kernel.bpf_stats_enabled` is 1.

use std::os::fd::OwnedFd;

use aya::sys::{Stats, enable_stats};
use tracing::{info, warn};

use super::ProgramStats;
use crate::data_plane::DataPlane;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Keeps the kernel's BPF stats on for as long as it lives (when asked to).
pub struct BpfStats {
    _held: Option<OwnedFd>,
}

impl BpfStats {
    /// Turns the stats on when `wanted` and the kernel data plane runs. Failing to is no
    /// reason not to serve: the series are then missing and a warning says why.
    pub fn start(wanted: bool, data_plane: &DataPlane) -> BpfStats {
        let held = match (wanted, data_plane) {
            (true, DataPlane::Kernel(_)) => match enable_stats(Stats::RunTime) {
                Ok(fd) => {
                    info!(
                        "BPF stats on: the kernel times every eBPF program run on this host while wsedge runs"
                    );
                    Some(fd)
                }
                Err(e) => {
                    warn!(error = %e, "server.bpf_stats: the kernel refused to turn BPF stats on (it needs Linux 5.8 and CAP_SYS_ADMIN); wsedge_bpf_program_* are not exported");
                    None
                }
            },
            (true, _) => {
                info!("server.bpf_stats: no eBPF programs run with the userspace data plane");
                None
            }
            (false, _) => None,
        };
        BpfStats { _held: held }
    }

    /// The loaded programs' counters, when the kernel counts them (or did: counters a past
    /// stats period left are still the programs' to report).
    pub fn programs(&self, data_plane: &DataPlane) -> Option<Vec<ProgramStats>> {
        let DataPlane::Kernel(kernel) = data_plane else {
            return None;
        };
        let stats: Vec<ProgramStats> = kernel
            .program_stats()
            .into_iter()
            .map(|(name, runs, run_time)| ProgramStats {
                name,
                runs,
                run_time,
            })
            .collect();
        let counting = self._held.is_some()
            || std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1")
            || stats.iter().any(|s| s.runs > 0);
        counting.then_some(stats)
    }
}
