//! The services wsedge runs: the WebSocket proxy, the admin API, the connection supervisor
//! (timers, shutdown) and the billing ledger's rows.

pub mod admin;
pub mod ledger;
pub mod proxy;
pub mod supervisor;
pub mod trace;
