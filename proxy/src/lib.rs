//! wsedge: a WebSocket edge proxy whose frames, after the handshake, are carried by eBPF
//! programs in the kernel. See SPEC.md for the contract and README.md for a tour.
//!
//! Layout: `config` (the TOML contract), `protocols` (handshake, error responses, framing),
//! `routing`, `instances` (spawned function instances), `data_plane` (kernel splice and
//! userspace relay), `services` (proxy, admin), `registry` (open connections), `metrics`,
//! `server` (the main loop).

pub mod config;
pub mod data_plane;
pub mod instances;
pub mod metrics;
pub mod protocols;
pub mod registry;
pub mod routing;
pub mod server;
pub mod services;

pub use config::Config;
pub use server::Server;
