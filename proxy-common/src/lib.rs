//! Types and logic shared by the kernel data plane (`proxy-ebpf`) and userspace (`proxy`).
//!
//! Everything here is `no_std`, allocation-free and written so the BPF verifier accepts it:
//! fixed-size arrays, constant indexes, no panicking paths, no unbounded loops. The same code
//! decides frame boundaries, message accounting and quota verdicts on both data planes, so the
//! kernel path and the userspace relay cannot disagree.
#![no_std]

pub mod frame;
pub mod maps;
pub mod message;
pub mod offsets;
pub mod policy;
pub mod rate;
pub mod trace;

pub use frame::{FrameHeader, HeaderParse, MAX_HEADER_LEN, parse_header};
pub use maps::SideState;
pub use message::{FrameKind, MessageTracker};
