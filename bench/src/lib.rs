//! Benchmark tools for wsedge: a WebSocket echo backend and a load generator, both on plain
//! mio so the tools' own overhead is small and predictable next to the proxy's.

pub mod echo;
pub mod load;
pub mod slow;
pub mod sys;
pub mod tls;
pub mod ws;

pub use echo::run_echo;
pub use load::{LoadConfig, Report, Workload, run_load, run_load_with};
