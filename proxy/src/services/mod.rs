//! The services wsedge runs: the WebSocket proxy, the admin API and the connection supervisor
//! (timers, shutdown).

pub mod admin;
pub mod proxy;
pub mod supervisor;
