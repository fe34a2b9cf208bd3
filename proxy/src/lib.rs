//! wsedge: a WebSocket edge proxy whose frames, after the handshake, are carried by eBPF
//! programs in the kernel. See README.md for a tour.
//!
//! Layout (lower modules never import higher ones):
//! - `clock`, `config` (the TOML contract), `protocols` (handshake, error responses, framing),
//!   `metrics`;
//! - `ledger` (the billing ledger: SQLite, one writer thread, the queries behind `/billing`);
//! - `conn` (one connection: identity, limits, counters, stop signal), `registry` (the table
//!   of open connections and the admission counts);
//! - `data_plane` (the paths that carry a connection after the upgrade: userspace relay,
//!   kernel splice, zero-hop; their close sequences and copy loop), `instances`, `routing`;
//! - `app` (the state services share), `services` (proxy lifecycle, admin, supervisor),
//!   `server` (the main loop).

pub mod app;
pub mod clock;
pub mod config;
pub mod conn;
pub mod data_plane;
pub mod instances;
pub mod ledger;
pub mod liveness;
pub mod metrics;
pub mod protocols;
pub mod registry;
pub mod routing;
pub mod server;
pub mod services;
pub mod tracer;

pub use config::Config;
pub use server::Server;
