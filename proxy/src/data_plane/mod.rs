//! The two data planes that carry frames after the handshake, and how one is chosen.

pub mod btf;
pub mod hangup;
pub mod kernel;
pub mod relay;
pub mod socket;

use std::sync::Arc;

pub use kernel::{KernelDataPlane, LoadError};

use crate::config::DataPlaneMode;

#[derive(Clone)]
pub enum DataPlane {
    Kernel(Arc<KernelDataPlane>),
    Userspace,
}

impl DataPlane {
    /// Picks the data plane for `mode`; `kernel` fails when the programs cannot load, `auto`
    /// falls back to the userspace relay and logs why, once.
    pub fn select(mode: DataPlaneMode) -> Result<DataPlane, LoadError> {
        match mode {
            DataPlaneMode::Userspace => Ok(DataPlane::Userspace),
            DataPlaneMode::Kernel => Ok(DataPlane::Kernel(Arc::new(KernelDataPlane::load()?))),
            DataPlaneMode::Auto => match KernelDataPlane::load() {
                Ok(kernel) => Ok(DataPlane::Kernel(Arc::new(kernel))),
                Err(e) => {
                    tracing::warn!(reason = %e, "kernel data plane unavailable; using the userspace relay");
                    Ok(DataPlane::Userspace)
                }
            },
        }
    }

    /// The name `/connections` and the ledger use.
    pub fn name(&self) -> &'static str {
        match self {
            DataPlane::Kernel(_) => "kernel",
            DataPlane::Userspace => "userspace",
        }
    }
}
