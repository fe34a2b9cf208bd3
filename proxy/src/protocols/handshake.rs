//! The WebSocket opening handshake (RFC 6455 section 4): validating the client's upgrade
//! request (4.2.1), rewriting it for the instance, and checking the instance's 101 (4.1).

use std::net::IpAddr;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use sha1::{Digest, Sha1};

use super::error_response::HandshakeError;

const MAX_HEADERS: usize = 128;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A validated upgrade request.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    pub method: String,
    pub path: String,
    /// Host header without the port, lower-cased.
    pub host: String,
    pub key: String,
    /// Headers in their original order and spelling.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl UpgradeRequest {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }

    /// The request to send to the instance: the client's, with `X-Forwarded-For` extended by
    /// the client's address and `X-Forwarded-Proto` set (a client cannot spoof either).
    pub fn forwarded(&self, client_ip: IpAddr, tls: bool) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        let mut forwarded_for = None;
        for (name, value) in &self.headers {
            if name.eq_ignore_ascii_case("x-forwarded-for") {
                forwarded_for = Some(String::from_utf8_lossy(value).into_owned());
                continue;
            }
            if name.eq_ignore_ascii_case("x-forwarded-proto") {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let xff = match forwarded_for {
            Some(prev) => format!("{prev}, {client_ip}"),
            None => client_ip.to_string(),
        };
        let proto = if tls { "https" } else { "http" };
        out.extend_from_slice(format!("X-Forwarded-For: {xff}\r\n").as_bytes());
        out.extend_from_slice(format!("X-Forwarded-Proto: {proto}\r\n\r\n").as_bytes());
        out
    }

    /// The `Sec-WebSocket-Accept` value a correct server answers with.
    pub fn expected_accept(&self) -> String {
        accept_for(&self.key)
    }
}

pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// True when a comma-separated header value lists `token` (case-insensitive).
fn has_token(value: Option<&[u8]>, token: &str) -> bool {
    value.is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Parses and validates a complete request head.
pub fn parse_upgrade(head: &[u8]) -> Result<UpgradeRequest, HandshakeError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(HandshakeError::malformed("incomplete request"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::new(
                431,
                "headers_too_large",
                "too many headers",
            ));
        }
        Err(e) => {
            return Err(HandshakeError::malformed(format!(
                "not an HTTP request: {e}"
            )));
        }
    }
    let method = req.method.unwrap_or_default().to_string();
    let path = req.path.unwrap_or_default().to_string();
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    if req.version != Some(1) {
        return Err(HandshakeError::malformed("the upgrade needs HTTP/1.1"));
    }
    if method != "GET" {
        return Err(HandshakeError::method_not_allowed(&method));
    }
    if !path.starts_with('/') {
        return Err(HandshakeError::malformed(
            "request target must be an absolute path",
        ));
    }
    let host = header(&headers, "host")
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| HandshakeError::malformed("missing Host header"))?;
    let host = strip_port(host).to_ascii_lowercase();
    if !has_token(header(&headers, "upgrade"), "websocket") {
        return Err(HandshakeError::malformed("missing Upgrade: websocket"));
    }
    if !has_token(header(&headers, "connection"), "upgrade") {
        return Err(HandshakeError::malformed("missing Connection: Upgrade"));
    }
    let key = header(&headers, "sec-websocket-key")
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::trim)
        .ok_or_else(|| HandshakeError::malformed("missing Sec-WebSocket-Key"))?;
    if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(HandshakeError::malformed(
            "Sec-WebSocket-Key is not 16 base64 bytes",
        ));
    }
    let key = key.to_string();
    match header(&headers, "sec-websocket-version") {
        Some(v) if v.trim_ascii() == b"13" => {}
        Some(v) => {
            return Err(HandshakeError::unsupported_version(
                &String::from_utf8_lossy(v),
            ));
        }
        None => return Err(HandshakeError::unsupported_version("")),
    }
    Ok(UpgradeRequest {
        method,
        path,
        host,
        key,
        headers,
    })
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

/// Checks that an instance's response head is a valid 101 for `request` (RFC 6455 4.1).
pub fn validate_response(head: &[u8], request: &UpgradeRequest) -> Result<(), HandshakeError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(HandshakeError::bad_gateway(
                "instance sent an invalid HTTP response",
            ));
        }
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(HandshakeError::bad_gateway(format!(
            "instance answered {code}, not 101"
        )));
    }
    let headers: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    if !has_token(header(&headers, "upgrade"), "websocket")
        || !has_token(header(&headers, "connection"), "upgrade")
    {
        return Err(HandshakeError::bad_gateway(
            "instance's 101 lacks Upgrade/Connection",
        ));
    }
    let accept = header(&headers, "sec-websocket-accept").map(<[u8]>::trim_ascii);
    if accept != Some(request.expected_accept().as_bytes()) {
        return Err(HandshakeError::bad_gateway(
            "instance's Sec-WebSocket-Accept is wrong",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /echo/x?y=1 HTTP/1.1\r\nHost: Example.com:8080\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\n\r\n";

    #[test]
    fn accepts_a_valid_upgrade_and_computes_the_rfc_accept() {
        let r = parse_upgrade(GOOD.as_bytes()).unwrap();
        assert_eq!(
            (r.path.as_str(), r.host.as_str()),
            ("/echo/x?y=1", "example.com")
        );
        // The example from RFC 6455 section 1.3.
        assert_eq!(r.expected_accept(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn forwarded_request_extends_xff_and_replaces_proto() {
        let r = parse_upgrade(GOOD.as_bytes()).unwrap();
        let out = String::from_utf8(r.forwarded("192.0.2.7".parse().unwrap(), false)).unwrap();
        assert!(out.starts_with("GET /echo/x?y=1 HTTP/1.1\r\n"));
        assert!(
            out.contains("X-Forwarded-For: 10.1.1.1, 192.0.2.7\r\n"),
            "{out}"
        );
        assert!(
            out.contains("X-Forwarded-Proto: http\r\n") && !out.contains("https"),
            "{out}"
        );
        assert!(out.ends_with("\r\n\r\n"));
    }

    #[test]
    fn rejections_carry_the_spec_status() {
        let status = |req: String| parse_upgrade(req.as_bytes()).unwrap_err().status;
        assert_eq!(status(GOOD.replace("GET", "POST")), 403);
        assert_eq!(status(GOOD.replace("Version: 13", "Version: 8")), 426);
        assert_eq!(status(GOOD.replace("Upgrade: websocket\r\n", "")), 400);
        assert_eq!(
            status(GOOD.replace("keep-alive, Upgrade", "keep-alive")),
            400
        );
        assert_eq!(
            status(GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")),
            400
        );
        assert_eq!(status(GOOD.replace("HTTP/1.1", "HTTP/1.0")), 400);
        assert_eq!(status("\x16\x03\x01garbage\r\n\r\n".into()), 400);
    }

    #[test]
    fn instance_response_must_be_a_matching_101() {
        let r = parse_upgrade(GOOD.as_bytes()).unwrap();
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        validate_response(ok.as_bytes(), &r).unwrap();
        let wrong = ok.replace("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", "AAAA");
        assert_eq!(
            validate_response(wrong.as_bytes(), &r).unwrap_err().status,
            502
        );
        let not101 = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            validate_response(not101.as_bytes(), &r).unwrap_err().status,
            502
        );
    }
}
