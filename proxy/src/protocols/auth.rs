//! HMAC authentication of upgrades (SPEC.md "Hmac auth"):
//! `Authorization: WSEDGE-HMAC-SHA256 Signature=<base64(hmac_sha256(key, "GET\n<path>\n<Date>"))>`
//! with an RFC 7231 `Date` no more than 15 minutes away from the proxy's clock.
//!
//! `<path>` is the request target as sent, query included; a signature over the path without
//! its query is accepted too (the query is then not covered), for clients that sign the path
//! only. Comparison is constant-time (`Mac::verify_slice`).

use std::time::{Duration, SystemTime};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{error_response::HandshakeError, handshake::UpgradeRequest};

const SCHEME: &str = "WSEDGE-HMAC-SHA256";
/// Largest accepted difference between the request's `Date` and the proxy's clock.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// Checks the signature of `request` with `key` at time `now`.
pub fn verify(request: &UpgradeRequest, key: &[u8], now: SystemTime) -> Result<(), HandshakeError> {
    let text = |name| {
        request
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    let (Some(date), Some(authorization)) = (text("date"), text("authorization")) else {
        return Err(HandshakeError::new(
            400,
            "missing_auth",
            "this function needs Date and Authorization headers",
        ));
    };
    let sent_at = httpdate::parse_http_date(date).map_err(|_| {
        HandshakeError::new(
            400,
            "malformed_date",
            format!("Date {date:?} is not an RFC 7231 date"),
        )
    })?;
    let skew = now.duration_since(sent_at).unwrap_or_else(|e| e.duration());
    if skew > MAX_CLOCK_SKEW {
        return Err(HandshakeError::new(
            403,
            "stale_date",
            format!(
                "Date is {}s away from the proxy's clock (limit 900s)",
                skew.as_secs()
            ),
        ));
    }
    let bad = || HandshakeError::new(403, "bad_signature", "the signature does not match");
    let signature = authorization
        .strip_prefix(SCHEME)
        .map(str::trim_start)
        .and_then(|rest| rest.strip_prefix("Signature="))
        .and_then(|b64| BASE64.decode(b64.trim()).ok())
        .ok_or_else(bad)?;
    let path_only = request.path.split('?').next().unwrap_or(&request.path);
    let mut targets = vec![request.path.as_str()];
    if path_only != request.path {
        targets.push(path_only);
    }
    let verified = targets.iter().fold(false, |ok, target| {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(format!("{}\n{target}\n{date}", request.method).as_bytes());
        // Both candidates are always computed: timing does not tell which one matched.
        mac.verify_slice(&signature).is_ok() | ok
    });
    if verified { Ok(()) } else { Err(bad()) }
}

/// The `Authorization` value for `path` and `date` (clients, tests and examples use it).
pub fn sign(key: &[u8], path: &str, date: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("GET\n{path}\n{date}").as_bytes());
    format!(
        "{SCHEME} Signature={}",
        BASE64.encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::handshake::parse_upgrade;

    fn request(path: &str, extra: &str) -> UpgradeRequest {
        let head = format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        parse_upgrade(head.as_bytes()).unwrap()
    }

    #[test]
    fn signed_requests_pass_and_every_defect_gets_its_status() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let good = sign(b"k", "/echo?room=1", &date);
        let ok = request(
            "/echo?room=1",
            &format!("Date: {date}\r\nAuthorization: {good}\r\n"),
        );
        assert_eq!(verify(&ok, b"k", now), Ok(()));
        let path_only = sign(b"k", "/echo", &date);
        let r = request(
            "/echo?room=1",
            &format!("Date: {date}\r\nAuthorization: {path_only}\r\n"),
        );
        assert_eq!(verify(&r, b"k", now), Ok(()));

        let status = |r: &UpgradeRequest, key: &[u8]| verify(r, key, now).unwrap_err().status;
        assert_eq!(status(&ok, b"other key"), 403);
        assert_eq!(
            status(&request("/echo", &format!("Date: {date}\r\n")), b"k"),
            400
        );
        assert_eq!(
            status(
                &request("/echo", &format!("Authorization: {good}\r\n")),
                b"k"
            ),
            400
        );
        let old = httpdate::fmt_http_date(now - Duration::from_secs(16 * 60));
        let stale = sign(b"k", "/echo", &old);
        let r = request(
            "/echo",
            &format!("Date: {old}\r\nAuthorization: {stale}\r\n"),
        );
        assert_eq!(verify(&r, b"k", now).unwrap_err().error_type, "stale_date");
        let wrong_path = request(
            "/other",
            &format!("Date: {date}\r\nAuthorization: {path_only}\r\n"),
        );
        assert_eq!(
            verify(&wrong_path, b"k", now).unwrap_err().error_type,
            "bad_signature"
        );
    }
}
