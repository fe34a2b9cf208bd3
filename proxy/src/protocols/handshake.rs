//! The WebSocket opening handshake (RFC 6455 section 4): validating the client's upgrade
//! request (4.2.1), rewriting it for the instance, and checking the instance's 101 (4.1).

use std::{borrow::Cow, net::IpAddr};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use sha1::{Digest, Sha1};

use super::error_response::HandshakeError;

/// Most headers a request (or an instance's response) may have; more gets 431 (502 from an
/// instance).
pub const MAX_HEADERS: usize = 128;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Client headers the instance never gets: the credentials wsedge checked, and those wsedge
/// sets itself (a client's would be taken for wsedge's).
pub const NOT_FORWARDED: [&str; 6] = [
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
    "x-wsedge-connection-id",
];

/// Headers a request may carry once at most: a second one could make wsedge and the
/// function read different values.
const SINGLE_HEADERS: [&str; 4] = ["Host", "Sec-WebSocket-Key", "Date", "Authorization"];

/// Query parameters whose name starts with this belong to wsedge (the signed-URL form) and
/// are removed before the request reaches the function.
pub const WSEDGE_PARAM_PREFIX: &str = "wsedge-";

/// What both a WebSocket upgrade and a plain HTTP request are checked by: routing, the
/// signature, Origin, and the target the function receives.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    /// Host header without the port, lower-cased.
    pub host: String,
    /// Headers in their original order and spelling.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A validated upgrade request: its head, and the key its 101 must answer.
#[derive(Debug, Clone)]
pub struct UpgradeRequest {
    pub head: RequestHead,
    pub key: String,
}

impl std::ops::Deref for UpgradeRequest {
    type Target = RequestHead;

    fn deref(&self) -> &RequestHead {
        &self.head
    }
}

impl RequestHead {
    /// Checks what any request on a function's route must satisfy (an absolute path without
    /// dot-segments, one `Host`, no repeated credential headers) and takes its host.
    pub fn new(
        method: String,
        path: String,
        headers: Vec<(String, Vec<u8>)>,
    ) -> Result<RequestHead, HandshakeError> {
        if !path.starts_with('/') {
            return Err(HandshakeError::malformed(
                "request target must be an absolute path",
            ));
        }
        check_unambiguous(&path, &headers)?;
        let host = header(&headers, "host")
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or_else(|| HandshakeError::malformed("missing Host header"))?;
        let host = strip_port(host).to_ascii_lowercase();
        Ok(RequestHead {
            method,
            path,
            host,
            headers,
        })
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        header(&self.headers, name)
    }

    /// The path of the request target, as sent (without its query).
    pub fn path_only(&self) -> &str {
        split_target(&self.path).0
    }

    /// The query of the request target, as sent, without its `?` (`None` without one).
    pub fn query(&self) -> Option<&str> {
        split_target(&self.path).1
    }

    /// The request target the function receives: the client's, without its `wsedge-*`
    /// query parameters (the signed-URL form's). Unchanged when it has none.
    pub fn function_target(&self) -> Cow<'_, str> {
        let (path, Some(query)) = split_target(&self.path) else {
            return Cow::Borrowed(&self.path);
        };
        if !query_params(query).any(is_wsedge_param) {
            return Cow::Borrowed(&self.path);
        }
        let kept: Vec<&str> = query_params(query)
            .filter(|p| !is_wsedge_param(p))
            .collect();
        if kept.is_empty() {
            Cow::Borrowed(path)
        } else {
            Cow::Owned(format!("{path}?{}", kept.join("&")))
        }
    }
}

impl UpgradeRequest {
    /// The request to send to the instance: the client's request line (without `wsedge-*`
    /// query parameters) and headers, without `Authorization`, and with `X-Forwarded-For`
    /// set to the client's address and `X-Forwarded-Proto` to `ws` or `wss`. A client's own
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`, `X-Real-IP` and
    /// `X-Wsedge-Connection-Id` are dropped: the function must be able to trust them. The
    /// proxy's `X-Wsedge-Connection-Id` is the id `/connections` and the logs use.
    pub fn forwarded(&self, client_ip: IpAddr, tls: bool, connection_id: &str) -> Vec<u8> {
        let target = self.function_target();
        let mut out = format!("{} {target} HTTP/1.1\r\n", self.method).into_bytes();
        for (name, value) in &self.headers {
            if NOT_FORWARDED.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                continue;
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let proto = if tls { "wss" } else { "ws" };
        out.extend_from_slice(format!("X-Forwarded-For: {client_ip}\r\n").as_bytes());
        out.extend_from_slice(format!("X-Forwarded-Proto: {proto}\r\n").as_bytes());
        out.extend_from_slice(
            format!("X-Wsedge-Connection-Id: {connection_id}\r\n\r\n").as_bytes(),
        );
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

/// A request target split at its first `?`: the path and the query, both as sent.
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// The `&`-separated parameters of a query, as sent (empty ones left out).
pub fn query_params(query: &str) -> impl Iterator<Item = &str> {
    query.split('&').filter(|p| !p.is_empty())
}

/// A query parameter's name, as sent: what comes before its first `=`.
pub fn param_name(param: &str) -> &str {
    param.split_once('=').map_or(param, |(name, _)| name)
}

fn is_wsedge_param(param: &str) -> bool {
    param_name(param).starts_with(WSEDGE_PARAM_PREFIX)
}

/// True when a path has a `.` or `..` segment, percent-encoded (`%2e`) or not.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

fn named<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Refuses an upgrade with a body: a `Content-Length` other than 0, or any
/// `Transfer-Encoding`.
fn check_no_body(headers: &[(String, Vec<u8>)]) -> Result<(), HandshakeError> {
    let named = |name| named(headers, name);
    if named("transfer-encoding").next().is_some() {
        return Err(HandshakeError::malformed(
            "an upgrade has no body: Transfer-Encoding is not allowed",
        ));
    }
    let zero = |v: &[u8]| {
        let v = v.trim_ascii();
        !v.is_empty() && v.iter().all(|&b| b == b'0')
    };
    if !named("content-length").all(zero) {
        return Err(HandshakeError::malformed(
            "an upgrade has no body: Content-Length must be 0",
        ));
    }
    Ok(())
}

/// Refuses what no request on a function's route may have: a repeated [`SINGLE_HEADERS`]
/// header, dot-segments in its path (either could make wsedge and the function read a
/// different request).
fn check_unambiguous(path: &str, headers: &[(String, Vec<u8>)]) -> Result<(), HandshakeError> {
    let named = |name| named(headers, name);
    if let Some(name) = SINGLE_HEADERS.iter().find(|n| named(n).nth(1).is_some()) {
        return Err(HandshakeError::malformed(format!(
            "more than one {name} header"
        )));
    }
    if has_dot_segment(split_target(path).0) {
        return Err(HandshakeError::malformed(
            "the path has a dot-segment (. or ..)",
        ));
    }
    Ok(())
}

/// Whether a request head asks for a WebSocket: `Upgrade: websocket` or any
/// `Sec-WebSocket-*` header. Such a request follows the upgrade rules (and a flawed one gets
/// their 400); any other request is plain HTTP for the function. A head that does not parse
/// counts as an upgrade too, so it gets the upgrade path's 400 as before.
pub fn is_websocket_request(head: &[u8]) -> bool {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return true;
    }
    req.headers.iter().any(|h| {
        let name = h.name.as_bytes();
        (h.name.eq_ignore_ascii_case("upgrade") && has_token(Some(h.value), "websocket"))
            || (name.len() > 14 && name[..14].eq_ignore_ascii_case(b"sec-websocket-"))
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
    check_no_body(&headers)?;
    let head = RequestHead::new(method, path, headers)?;
    let headers = &head.headers;
    if !has_token(header(headers, "upgrade"), "websocket") {
        return Err(HandshakeError::malformed("missing Upgrade: websocket"));
    }
    if !has_token(header(headers, "connection"), "upgrade") {
        return Err(HandshakeError::malformed("missing Connection: Upgrade"));
    }
    let key = header(headers, "sec-websocket-key")
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::trim)
        .ok_or_else(|| HandshakeError::malformed("missing Sec-WebSocket-Key"))?;
    if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(HandshakeError::malformed(
            "Sec-WebSocket-Key is not 16 base64 bytes",
        ));
    }
    let key = key.to_string();
    match header(headers, "sec-websocket-version") {
        Some(v) if v.trim_ascii() == b"13" => {}
        Some(v) => {
            return Err(HandshakeError::unsupported_version(
                &String::from_utf8_lossy(v),
            ));
        }
        None => return Err(HandshakeError::unsupported_version("")),
    }
    Ok(UpgradeRequest { head, key })
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
    fn the_function_gets_the_request_without_credentials_and_with_wsedges_forwarding_headers() {
        let head = GOOD
            .replace(
                "/echo/x?y=1",
                "/echo/x?wsedge-date=1&y=1&wsedge-expires=2&z&wsedge-signature=abc",
            )
            .replace(
                "X-Forwarded-Proto: https\r\n",
                "X-Forwarded-Proto: https\r\nForwarded: for=10.9.9.9\r\nX-Real-IP: 10.8.8.8\r\n\
             x-wsedge-connection-id: forged\r\nAuthorization: WSEDGE-HMAC-SHA256 Signature=x\r\n\
             Date: Sat, 05 Dec 2026 16:00:00 GMT\r\n",
            );
        let r = parse_upgrade(head.as_bytes()).unwrap();
        let out =
            String::from_utf8(r.forwarded("192.0.2.7".parse().unwrap(), false, "19aee2a1f00-7"))
                .unwrap();
        let expected = "GET /echo/x?y=1&z HTTP/1.1\r\nHost: Example.com:8080\r\nUpgrade: websocket\r\n\
            Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\nDate: Sat, 05 Dec 2026 16:00:00 GMT\r\n\
            X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: ws\r\n\
            X-Wsedge-Connection-Id: 19aee2a1f00-7\r\n\r\n";
        assert_eq!(out, expected);
        let wss =
            String::from_utf8(r.forwarded("2001:db8::1".parse().unwrap(), true, "1-2")).unwrap();
        assert!(
            wss.ends_with(
                "X-Forwarded-For: 2001:db8::1\r\nX-Forwarded-Proto: wss\r\n\
                 X-Wsedge-Connection-Id: 1-2\r\n\r\n"
            ),
            "{wss}"
        );
    }

    #[test]
    fn the_function_target_drops_only_wsedge_params_and_keeps_the_rest_as_sent() {
        let target = |path: &str| {
            let r = parse_upgrade(GOOD.replace("/echo/x?y=1", path).as_bytes()).unwrap();
            r.function_target().into_owned()
        };
        assert_eq!(target("/a?y=%20&b=2&y=1"), "/a?y=%20&b=2&y=1");
        assert_eq!(target("/a"), "/a");
        assert_eq!(target("/a?wsedge-signature=x&wsedge-other"), "/a");
        assert_eq!(target("/a?b=2&wsedge-date=1&a=1"), "/a?b=2&a=1");
        // Not wsedge's: the prefix is matched as sent, case included.
        assert_eq!(
            target("/a?Wsedge-date=1&xwsedge-date=2"),
            "/a?Wsedge-date=1&xwsedge-date=2"
        );
    }

    #[test]
    fn bodies_repeated_headers_and_dot_segments_get_400() {
        let refused = |req: String| {
            let e = parse_upgrade(req.as_bytes()).unwrap_err();
            assert_eq!(
                (e.status, e.error_type),
                (400, "malformed_upgrade"),
                "{req:?}"
            );
            e.message
        };
        let with = |line: &str| GOOD.replace("\r\n\r\n", &format!("\r\n{line}\r\n\r\n"));
        for line in [
            "Content-Length: 5",
            "Content-Length: x",
            "Content-Length: ",
            "Transfer-Encoding: chunked",
            "transfer-encoding: identity",
        ] {
            assert!(refused(with(line)).contains("no body"));
        }
        for line in [
            "host: other.example",
            "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",
            "Date: Sat, 05 Dec 2026 16:00:00 GMT\r\nDATE: Sat, 05 Dec 2026 16:00:01 GMT",
            "Authorization: a\r\nauthorization: b",
        ] {
            assert!(refused(with(line)).contains("more than one"), "{line}");
        }
        for path in [
            "/echo/../admin",
            "/echo/./x",
            "/echo/..",
            "/echo/.",
            "/echo/%2e%2E/x",
            "/echo/%2E?y=1",
            "/echo/.%2e",
        ] {
            assert!(refused(GOOD.replace("/echo/x?y=1", path)).contains("dot-segment"));
        }
        // Allowed: an empty body, dots inside names, dot-segments in the query.
        for ok in [
            with("Content-Length: 0"),
            GOOD.replace("/echo/x?y=1", "/echo/.well-known/a..b/...?p=../x"),
        ] {
            parse_upgrade(ok.as_bytes()).unwrap();
        }
    }

    #[test]
    fn only_requests_that_ask_for_a_websocket_take_the_upgrade_path() {
        assert!(is_websocket_request(GOOD.as_bytes()));
        // Flawed upgrades still get the upgrade rules' 400.
        assert!(is_websocket_request(
            GOOD.replace("Upgrade: websocket\r\n", "").as_bytes()
        ));
        assert!(is_websocket_request(b"\x16\x03\x01garbage\r\n\r\n"));
        let plain = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n";
        assert!(!is_websocket_request(plain));
        let h2c = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
        assert!(!is_websocket_request(h2c));
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
