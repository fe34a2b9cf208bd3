//! Wire protocols: the client's stream (TCP or TLS), the HTTP/1.1 upgrade handshake, its
//! authentication, the admin API's bearer token, error responses and WebSocket framing.

pub mod auth;
pub mod bearer;
pub mod error_response;
pub mod frames;
pub mod handshake;
pub mod head;
pub mod stream;
pub mod tls;
