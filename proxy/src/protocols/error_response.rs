//! Errors that end a connection before the upgrade completes, and the HTTP responses
//! the contract prescribes for them: a JSON body and the `X-Wsedge-Error-Type` header.

/// A handshake failure: an HTTP status, a stable machine-readable type, and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {error_type}: {message}")]
pub struct HandshakeError {
    pub status: u16,
    pub error_type: &'static str,
    pub message: String,
}

impl HandshakeError {
    pub fn new(status: u16, error_type: &'static str, message: impl Into<String>) -> Self {
        HandshakeError {
            status,
            error_type,
            message: message.into(),
        }
    }
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(400, "malformed_upgrade", message)
    }
    pub fn headers_too_large(limit: usize) -> Self {
        Self::new(
            431,
            "headers_too_large",
            format!("request head exceeds {limit} bytes"),
        )
    }
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            403,
            "method_not_allowed",
            format!("method {method} is not GET"),
        )
    }
    pub fn no_route(host: &str, path: &str) -> Self {
        Self::new(
            404,
            "no_function",
            format!("no function for host {host:?} path {path:?}"),
        )
    }
    pub fn unsupported_version(version: &str) -> Self {
        Self::new(
            426,
            "unsupported_version",
            format!("Sec-WebSocket-Version {version:?} is not 13"),
        )
    }
    pub fn handshake_timeout() -> Self {
        Self::new(
            408,
            "handshake_timeout",
            "the upgrade request did not arrive in time",
        )
    }
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, "bad_instance_response", message)
    }
    pub fn instance_unreachable(message: impl Into<String>) -> Self {
        Self::new(502, "instance_unreachable", message)
    }
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, "instance_timeout", message)
    }
    pub fn draining() -> Self {
        Self::new(503, "draining", "the proxy is shutting down")
    }
    pub fn at_capacity(max: u32) -> Self {
        Self::new(
            503,
            "at_capacity",
            format!("the proxy has its maximum of {max} open connections"),
        )
    }
    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            413,
            "body_too_large",
            format!("the request body exceeds {limit} bytes"),
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "internal", message)
    }

    /// The complete HTTP/1.1 response; the connection is closed after it.
    pub fn to_response(&self) -> Vec<u8> {
        let body = serde_json::json!({ "error_type": self.error_type, "message": self.message })
            .to_string();
        let extra = if self.status == 426 {
            "Sec-WebSocket-Version: 13\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             X-Wsedge-Error-Type: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            self.status,
            reason(self.status),
            body.len(),
            self.error_type,
        )
        .into_bytes()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_carries_status_json_body_and_type_header() {
        let text =
            String::from_utf8(HandshakeError::unsupported_version("8").to_response()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nX-Wsedge-Error-Type: unsupported_version\r\n"));
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error_type"], "unsupported_version");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
    }
}
