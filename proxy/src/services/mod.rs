//! The services wsedge runs: the WebSocket proxy and the admin API.

pub mod admin;
pub mod proxy;
