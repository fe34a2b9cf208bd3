//! HMAC authentication of upgrades, in one of two forms (README, "Functions and their instances").
//!
//! * Header: `Authorization: WSEDGE-HMAC-SHA256 Signature=<base64(hmac_sha256(key,
//!   "GET\n<host>\n<path and query>\n<Date>"))>` with an RFC 7231 `Date` no more than 15
//!   minutes away from the proxy's clock.
//! * Signed URL (browsers cannot set headers on a WebSocket): `?wsedge-date=<unix seconds>
//!   &wsedge-expires=<seconds, at most 3600>&wsedge-signature=<base64url, no padding, of
//!   hmac_sha256(key, "GET\n<host>\n<path>\n<other query>\n<date>\n<expires>")>`, valid
//!   from 15 minutes before `date` until `date + expires`.
//!
//! `<host>` is the `Host` header lowercased (port included), `<path and query>` the request
//! target as sent, `<path>` its path as sent, `<other query>` its parameters other than
//! `wsedge-*` (the ones the function receives), as sent, sorted by name (stably: repeated
//! names keep their order) and joined with `&`, empty without any; `<date>` and
//! `<expires>` as sent. A request with `Authorization` uses the header form; one without it
//! but with a `wsedge-date`, `wsedge-expires` or `wsedge-signature` parameter, the URL form.
//! Comparison is constant-time (`Mac::verify_slice`).

use std::time::{Duration, SystemTime};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL},
};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    error_response::HandshakeError,
    handshake::{RequestHead, WSEDGE_PARAM_PREFIX, param_name, query_params, split_target},
};

const SCHEME: &str = "WSEDGE-HMAC-SHA256";
/// Largest accepted difference between the request's `Date` and the proxy's clock; also how
/// long before its `wsedge-date` a signed URL is valid.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
/// Largest accepted `wsedge-expires`.
pub const MAX_URL_EXPIRES: Duration = Duration::from_secs(3600);

const DATE_PARAM: &str = "wsedge-date";
const EXPIRES_PARAM: &str = "wsedge-expires";
const SIGNATURE_PARAM: &str = "wsedge-signature";

/// Checks the signature of `request` with `key` at time `now`.
pub fn verify(request: &RequestHead, key: &[u8], now: SystemTime) -> Result<(), HandshakeError> {
    let text = |name| {
        request
            .header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    let host = text("host").unwrap_or_default().to_ascii_lowercase();
    if let Some(authorization) = text("authorization") {
        let Some(date) = text("date") else {
            return Err(missing_auth());
        };
        return verify_header(request, &host, date, authorization, key, now);
    }
    match SignedUrl::of(request)? {
        Some(url) => url.verify(request, &host, key, now),
        None => Err(missing_auth()),
    }
}

fn missing_auth() -> HandshakeError {
    HandshakeError::new(
        400,
        "missing_auth",
        "this function needs Date and Authorization headers, or a signed URL \
         (wsedge-date, wsedge-expires and wsedge-signature)",
    )
}

fn bad_signature() -> HandshakeError {
    HandshakeError::new(403, "bad_signature", "the signature does not match")
}

fn malformed_date(message: String) -> HandshakeError {
    HandshakeError::new(400, "malformed_date", message)
}

fn stale(message: String) -> HandshakeError {
    HandshakeError::new(403, "stale_date", message)
}

/// Whether `signature` is the HMAC of `signed` under `key`, compared in constant time.
fn mac_matches(key: &[u8], signed: &str, signature: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    mac.verify_slice(signature).is_ok()
}

fn mac_of(key: &[u8], signed: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn verify_header(
    request: &RequestHead,
    host: &str,
    date: &str,
    authorization: &str,
    key: &[u8],
    now: SystemTime,
) -> Result<(), HandshakeError> {
    let sent_at = httpdate::parse_http_date(date)
        .map_err(|_| malformed_date(format!("Date {date:?} is not an RFC 7231 date")))?;
    let skew = now.duration_since(sent_at).unwrap_or_else(|e| e.duration());
    if skew > MAX_CLOCK_SKEW {
        return Err(stale(format!(
            "Date is {}s away from the proxy's clock (limit 900s)",
            skew.as_secs()
        )));
    }
    let signature = authorization
        .strip_prefix(SCHEME)
        .map(str::trim_start)
        .and_then(|rest| rest.strip_prefix("Signature="))
        .and_then(|b64| BASE64.decode(b64.trim()).ok())
        .ok_or_else(bad_signature)?;
    let signed = format!("{}\n{host}\n{}\n{date}", request.method, request.path);
    if mac_matches(key, &signed, &signature) {
        Ok(())
    } else {
        Err(bad_signature())
    }
}

/// The `wsedge-date`, `wsedge-expires` and `wsedge-signature` values of a signed URL, as sent.
struct SignedUrl<'a> {
    date: &'a str,
    expires: &'a str,
    signature: &'a str,
}

impl<'a> SignedUrl<'a> {
    /// `None` when the target has none of the three; 400 when it lacks or repeats one.
    fn of(request: &'a RequestHead) -> Result<Option<Self>, HandshakeError> {
        let mut values: [Option<&str>; 3] = [None; 3];
        for param in query_params(request.query().unwrap_or_default()) {
            let name = param_name(param);
            let Some(i) = [DATE_PARAM, EXPIRES_PARAM, SIGNATURE_PARAM]
                .iter()
                .position(|n| *n == name)
            else {
                continue;
            };
            if values[i].is_some() {
                return Err(HandshakeError::malformed(format!(
                    "the query has {name} more than once"
                )));
            }
            values[i] = Some(param.get(name.len() + 1..).unwrap_or_default());
        }
        match values {
            [None, None, None] => Ok(None),
            [Some(date), Some(expires), Some(signature)] => Ok(Some(SignedUrl {
                date,
                expires,
                signature,
            })),
            _ => Err(missing_auth()),
        }
    }

    fn verify(
        &self,
        request: &RequestHead,
        host: &str,
        key: &[u8],
        now: SystemTime,
    ) -> Result<(), HandshakeError> {
        // The URL's signing string has no method ("GET" always, as upgrades are): a URL
        // signed for a page must not also authorize a POST to the same function.
        if !matches!(request.method.as_str(), "GET" | "HEAD") {
            return Err(HandshakeError::new(
                403,
                "method_not_signed",
                format!(
                    "a signed URL authorizes GET and HEAD only; {} needs the Authorization header, which signs the method",
                    request.method
                ),
            ));
        }
        let seconds = |name: &str, value: &str| {
            (!value.is_empty() && value.len() <= 19 && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| Duration::from_secs(value.parse().expect("at most 19 digits")))
                .ok_or_else(|| {
                    malformed_date(format!("{name} {value:?} is not a number of seconds"))
                })
        };
        let date = seconds(DATE_PARAM, self.date)?;
        let expires = seconds(EXPIRES_PARAM, self.expires)?;
        if expires > MAX_URL_EXPIRES {
            return Err(stale(format!(
                "wsedge-expires is {}s, more than the limit of 3600s",
                expires.as_secs()
            )));
        }
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        if now + MAX_CLOCK_SKEW < date {
            return Err(stale(format!(
                "the signed URL is valid from {}s from now (15 minutes before wsedge-date)",
                (date - MAX_CLOCK_SKEW - now).as_secs()
            )));
        }
        if now > date + expires {
            return Err(stale(format!(
                "the signed URL expired {}s ago",
                (now - date - expires).as_secs()
            )));
        }
        let signature = BASE64URL
            .decode(self.signature)
            .map_err(|_| bad_signature())?;
        let signed = url_signing_string(
            host,
            request.path_only(),
            request.query().unwrap_or_default(),
            self.date,
            self.expires,
        );
        if mac_matches(key, &signed, &signature) {
            Ok(())
        } else {
            Err(bad_signature())
        }
    }
}

/// "GET\n<host>\n<path>\n<other query>\n<date>\n<expires>" for `query` (as sent,
/// `wsedge-*` parameters included: they are left out here).
fn url_signing_string(host: &str, path: &str, query: &str, date: &str, expires: &str) -> String {
    let mut other: Vec<&str> = query_params(query)
        .filter(|p| !param_name(p).starts_with(WSEDGE_PARAM_PREFIX))
        .collect();
    other.sort_by_key(|p| param_name(p));
    format!(
        "GET\n{host}\n{path}\n{}\n{date}\n{expires}",
        other.join("&")
    )
}

/// The `Authorization` value for an upgrade of `target` (path and query, as it will be sent)
/// on `host` (the `Host` header) with `date` (the `Date` header). Clients, tests and
/// examples use it.
pub fn sign(key: &[u8], host: &str, target: &str, date: &str) -> String {
    let signed = format!("GET\n{}\n{target}\n{date}", host.to_ascii_lowercase());
    format!("{SCHEME} Signature={}", BASE64.encode(mac_of(key, &signed)))
}

/// `target` (path and query) as a signed URL for `host` (the `Host` header): with
/// `wsedge-date=<date>&wsedge-expires=<expires>&wsedge-signature=...` appended to its query.
/// `date` is in Unix seconds; the URL is valid from 15 minutes before it until `date +
/// expires` (`expires` at most 3600).
pub fn signed_url(key: &[u8], host: &str, target: &str, date: u64, expires: u64) -> String {
    let (path, query) = split_target(target);
    let (date, expires) = (date.to_string(), expires.to_string());
    let signed = url_signing_string(
        &host.to_ascii_lowercase(),
        path,
        query.unwrap_or_default(),
        &date,
        &expires,
    );
    let signature = BASE64URL.encode(mac_of(key, &signed));
    let separator = match query {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    format!(
        "{target}{separator}{DATE_PARAM}={date}&{EXPIRES_PARAM}={expires}&{SIGNATURE_PARAM}={signature}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::handshake::{UpgradeRequest, parse_upgrade};

    fn request_on(host: &str, target: &str, extra: &str) -> UpgradeRequest {
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        parse_upgrade(head.as_bytes()).unwrap()
    }

    fn request(target: &str, extra: &str) -> UpgradeRequest {
        request_on("a", target, extra)
    }

    fn refusal(r: &UpgradeRequest, key: &[u8], now: SystemTime) -> (u16, &'static str) {
        let e = verify(r, key, now).unwrap_err();
        (e.status, e.error_type)
    }

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn header_signed_requests_pass_and_every_defect_gets_its_status() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let good = sign(b"k", "a", "/echo?room=1", &date);
        let ok = request(
            "/echo?room=1",
            &format!("Date: {date}\r\nAuthorization: {good}\r\n"),
        );
        assert_eq!(verify(&ok, b"k", now), Ok(()));
        assert_eq!(refusal(&ok, b"other key", now), (403, "bad_signature"));

        // The signature covers the query: one over the path alone is refused.
        let path_only = sign(b"k", "a", "/echo", &date);
        let r = request(
            "/echo?room=1",
            &format!("Date: {date}\r\nAuthorization: {path_only}\r\n"),
        );
        assert_eq!(refusal(&r, b"k", now), (403, "bad_signature"));
        // ...and the host: the same request to another host is refused.
        let r = request_on(
            "b",
            "/echo?room=1",
            &format!("Date: {date}\r\nAuthorization: {good}\r\n"),
        );
        assert_eq!(refusal(&r, b"k", now), (403, "bad_signature"));
        // The host is signed lowercased, its port included.
        let r = request_on(
            "Example.COM:8443",
            "/echo",
            &format!(
                "Date: {date}\r\nAuthorization: {}\r\n",
                sign(b"k", "example.com:8443", "/echo", &date)
            ),
        );
        assert_eq!(verify(&r, b"k", now), Ok(()));
        let r = request_on(
            "example.com",
            "/echo",
            &format!(
                "Date: {date}\r\nAuthorization: {}\r\n",
                sign(b"k", "example.com:8443", "/echo", &date)
            ),
        );
        assert_eq!(refusal(&r, b"k", now), (403, "bad_signature"));

        assert_eq!(
            refusal(&request("/echo", &format!("Date: {date}\r\n")), b"k", now),
            (400, "missing_auth")
        );
        assert_eq!(
            refusal(
                &request("/echo", &format!("Authorization: {good}\r\n")),
                b"k",
                now
            ),
            (400, "missing_auth")
        );
        assert_eq!(
            refusal(&request("/echo", ""), b"k", now),
            (400, "missing_auth")
        );
        for minutes in [16, -16] {
            let at = if minutes > 0 {
                now - Duration::from_secs(16 * 60)
            } else {
                now + Duration::from_secs(16 * 60)
            };
            let old = httpdate::fmt_http_date(at);
            let stale = sign(b"k", "a", "/echo", &old);
            let r = request(
                "/echo",
                &format!("Date: {old}\r\nAuthorization: {stale}\r\n"),
            );
            assert_eq!(refusal(&r, b"k", now), (403, "stale_date"), "{minutes}");
        }
    }

    #[test]
    fn url_signed_requests_are_valid_from_15_minutes_before_date_until_date_plus_expires() {
        let date = 1_796_486_400;
        let at = |unix: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
        let url = signed_url(b"k", "a", "/echo?room=1", date, 60);
        let r = request(&url, "");
        for now in [date - 900, date, date + 60] {
            assert_eq!(verify(&r, b"k", at(now)), Ok(()), "at {now}");
        }
        for now in [date - 901, date + 61] {
            assert_eq!(refusal(&r, b"k", at(now)), (403, "stale_date"), "at {now}");
        }
        // The longest validity is 3600 s; a longer one is refused even when signed.
        let r = request(&signed_url(b"k", "a", "/echo", date, 3600), "");
        assert_eq!(verify(&r, b"k", at(date + 3600)), Ok(()));
        let r = request(&signed_url(b"k", "a", "/echo", date, 3601), "");
        assert_eq!(refusal(&r, b"k", at(date)), (403, "stale_date"));
        // A Date header does not make it the header form: without Authorization it is the URL.
        let r = request(&url, "Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n");
        assert_eq!(verify(&r, b"k", at(date)), Ok(()));
    }

    #[test]
    fn url_signatures_cover_host_path_and_other_query_in_any_order() {
        let now = SystemTime::now();
        let date = unix(now);
        let url = signed_url(b"k", "a", "/echo?room=1&user=ann", date, 300);
        assert_eq!(verify(&request(&url, ""), b"k", now), Ok(()));
        assert_eq!(
            refusal(&request(&url, ""), b"other", now),
            (403, "bad_signature")
        );
        // The parameters may come in another order: they are signed sorted by name.
        let (_, params) = url.split_once('?').unwrap();
        let mut reordered: Vec<&str> = params.split('&').collect();
        reordered.reverse();
        let r = request(&format!("/echo?{}", reordered.join("&")), "");
        assert_eq!(verify(&r, b"k", now), Ok(()));
        for tampered in [
            url.replace("/echo?", "/echo/x?"),
            url.replace("room=1", "room=2"),
            url.replace("room=1&", ""),
            url.replace("room=1", "room=1&admin=1"),
            url.replace("wsedge-expires=300", "wsedge-expires=301"),
            url.replace(
                &format!("wsedge-date={date}"),
                &format!("wsedge-date=0{date}"),
            ),
        ] {
            assert_eq!(
                refusal(&request(&tampered, ""), b"k", now),
                (403, "bad_signature"),
                "{tampered}"
            );
        }
        let other_host = request_on("b", &url, "");
        assert_eq!(refusal(&other_host, b"k", now), (403, "bad_signature"));
    }

    #[test]
    fn a_signed_url_authorizes_get_and_head_but_not_another_method() {
        let now = SystemTime::now();
        let url = signed_url(b"k", "a", "/echo", unix(now), 60);
        let mut r = request(&url, "");
        for method in ["GET", "HEAD"] {
            r.head.method = method.into();
            assert!(verify(&r, b"k", now).is_ok(), "{method}");
        }
        r.head.method = "POST".into();
        assert_eq!(refusal(&r, b"k", now), (403, "method_not_signed"));
    }

    #[test]
    fn incomplete_or_unreadable_signed_urls_get_400() {
        let now = SystemTime::now();
        let url = signed_url(b"k", "a", "/echo", unix(now), 300);
        let (path, params) = url.split_once('?').unwrap();
        let params: Vec<&str> = params.split('&').collect();
        for left_out in 0..3 {
            let mut some = params.clone();
            some.remove(left_out);
            let r = request(&format!("{path}?{}", some.join("&")), "");
            assert_eq!(refusal(&r, b"k", now), (400, "missing_auth"), "{some:?}");
        }
        for (from, to) in [
            ("wsedge-date=", "wsedge-date=x"),
            ("wsedge-expires=300", "wsedge-expires=-300"),
            ("wsedge-expires=300", "wsedge-expires=+300"),
            ("wsedge-expires=300", "wsedge-expires"),
        ] {
            let r = request(&url.replacen(from, to, 1), "");
            assert_eq!(refusal(&r, b"k", now), (400, "malformed_date"), "{to}");
        }
        let twice = format!("{url}&wsedge-expires=300");
        assert_eq!(
            refusal(&request(&twice, ""), b"k", now),
            (400, "malformed_upgrade")
        );
        // A signature that is not base64url without padding is a bad signature.
        let padded = format!("{url}=");
        assert_eq!(
            refusal(&request(&padded, ""), b"k", now),
            (403, "bad_signature")
        );
    }

    // --- Known answers ---------------------------------------------------------------------
    //
    // The expected signatures below were computed outside this crate, with Python's standard
    // library (and the first checked again with `openssl dgst -sha256 -hmac`):
    //
    //   python3 -c 'import hmac, hashlib, base64
    //   key = b"wsedge known-answer key"
    //   msg = "GET\n/echo?room=7&user=ann\nSat, 05 Dec 2026 16:00:00 GMT"
    //   print(base64.b64encode(hmac.new(key, msg.encode(), hashlib.sha256).digest()).decode())'
    //
    // with `msg` as named above each constant. For the signed-URL form the last line is
    //
    //   print(base64.urlsafe_b64encode(hmac.new(key, msg.encode(), hashlib.sha256).digest())
    //         .decode().rstrip("="))
    //
    // and the sorted other query was computed in Python as well:
    // "&".join(sorted("b=2&a=1&b=1".split("&"), key=lambda p: p.split("=")[0])), which is
    // "a=1&b=2&b=1" (a stable sort: the two b keep their order).

    const KAT_KEY: &[u8] = b"wsedge known-answer key";
    const KAT_DATE: &str = "Sat, 05 Dec 2026 16:00:00 GMT";
    /// KAT_DATE in Unix seconds.
    const KAT_UNIX: u64 = 1_796_486_400;

    /// The header form, the documented rule:
    /// msg = "GET\na\n/echo?room=7&user=ann\nSat, 05 Dec 2026 16:00:00 GMT" (Host "a")
    const KAT_SPEC_HEADER: &str = "sefVHXmSPC9/BXRf38trWLOWdgCJ2MYQ0KL5r/Kvwwo=";
    /// msg = "GET\nexample.com:8443\n/chat/room?b=2&a=1&b=1\nSat, 05 Dec 2026 16:00:00 GMT"
    /// (Host "Example.COM:8443")
    const KAT_SPEC_HEADER_PORT: &str = "bLjUdMYthTJ26SjwM3ON+0sufBSv64EyhaLsWHcOUPk=";
    /// The signed-URL form, base64url without padding:
    /// msg = "GET\na\n/echo\nroom=7&user=ann\n1796486400\n300"
    const KAT_SPEC_URL: &str = "1iIImPswwWQctbTx7Tx4z84Ifzwe5NAMDKHowQZIl88";
    /// msg = "GET\nexample.com:8443\n/echo\n\n1796486400\n3600" (no other query)
    const KAT_SPEC_URL_NO_QUERY: &str = "pnKo-e8eSdOe_wPlRmNXjTs4uGvvTaCFF4DlSupie_w";
    /// msg = "GET\nexample.com:8443\n/chat/room\na=1&b=2&b=1\n1796486400\n60"
    const KAT_SPEC_URL_SORTED: &str = "xEoitJ06ttiLVPbMpxxO-IQafVqON9segif67mgu4Rs";

    /// The old rule (no host), which wsedge no longer accepts:
    /// msg = "GET\n/echo?room=7&user=ann\nSat, 05 Dec 2026 16:00:00 GMT"
    const KAT_OLD_FULL_TARGET: &str = "VPx/05u5uT30UGs8FGYf0KHyHTYTOpUMtqcVtNI4Baw=";
    /// The old rule over the path alone: msg = "GET\n/echo\nSat, 05 Dec 2026 16:00:00 GMT"
    const KAT_OLD_PATH_ONLY: &str = "R5pFtiODdwVME+ka9DG6baD5kMfVEIpwN0PdLX15Ay8=";

    fn kat_now() -> SystemTime {
        httpdate::parse_http_date(KAT_DATE).unwrap()
    }

    fn kat_request(signature: &str, date: &str) -> UpgradeRequest {
        request(
            "/echo?room=7&user=ann",
            &format!("Date: {date}\r\nAuthorization: WSEDGE-HMAC-SHA256 Signature={signature}\r\n"),
        )
    }

    #[test]
    fn kat_unix_is_kat_date() {
        assert_eq!(unix(kat_now()), KAT_UNIX);
    }

    #[test]
    fn sign_and_signed_url_give_the_independently_computed_signatures() {
        assert_eq!(
            sign(KAT_KEY, "a", "/echo?room=7&user=ann", KAT_DATE),
            format!("WSEDGE-HMAC-SHA256 Signature={KAT_SPEC_HEADER}")
        );
        assert_eq!(
            sign(
                KAT_KEY,
                "Example.COM:8443",
                "/chat/room?b=2&a=1&b=1",
                KAT_DATE
            ),
            format!("WSEDGE-HMAC-SHA256 Signature={KAT_SPEC_HEADER_PORT}")
        );
        assert_eq!(
            signed_url(KAT_KEY, "a", "/echo?room=7&user=ann", KAT_UNIX, 300),
            format!(
                "/echo?room=7&user=ann&wsedge-date=1796486400&wsedge-expires=300\
                 &wsedge-signature={KAT_SPEC_URL}"
            )
        );
        assert_eq!(
            signed_url(KAT_KEY, "Example.COM:8443", "/echo", KAT_UNIX, 3600),
            format!(
                "/echo?wsedge-date=1796486400&wsedge-expires=3600\
                 &wsedge-signature={KAT_SPEC_URL_NO_QUERY}"
            )
        );
        assert_eq!(
            signed_url(
                KAT_KEY,
                "example.com:8443",
                "/chat/room?b=2&a=1&b=1",
                KAT_UNIX,
                60
            ),
            format!(
                "/chat/room?b=2&a=1&b=1&wsedge-date=1796486400&wsedge-expires=60\
                 &wsedge-signature={KAT_SPEC_URL_SORTED}"
            )
        );
    }

    #[test]
    fn spec_header_form_signs_the_host() {
        let r = kat_request(KAT_SPEC_HEADER, KAT_DATE);
        assert_eq!(verify(&r, KAT_KEY, kat_now()), Ok(()));
        let r = request_on(
            "Example.COM:8443",
            "/chat/room?b=2&a=1&b=1",
            &format!(
                "Date: {KAT_DATE}\r\nAuthorization: WSEDGE-HMAC-SHA256 \
                 Signature={KAT_SPEC_HEADER_PORT}\r\n"
            ),
        );
        assert_eq!(verify(&r, KAT_KEY, kat_now()), Ok(()));
    }

    #[test]
    fn spec_signed_url_form_is_accepted() {
        let r = request(
            &format!(
                "/echo?user=ann&wsedge-date=1796486400&wsedge-expires=300&room=7\
                 &wsedge-signature={KAT_SPEC_URL}"
            ),
            "",
        );
        assert_eq!(verify(&r, KAT_KEY, kat_now()), Ok(()));
        let r = request_on(
            "Example.COM:8443",
            &format!(
                "/echo?wsedge-signature={KAT_SPEC_URL_NO_QUERY}&wsedge-expires=3600\
                 &wsedge-date=1796486400"
            ),
            "",
        );
        assert_eq!(verify(&r, KAT_KEY, kat_now()), Ok(()));
        let r = request_on(
            "example.com:8443",
            &format!(
                "/chat/room?wsedge-date=1796486400&b=2&wsedge-expires=60&a=1&b=1\
                 &wsedge-signature={KAT_SPEC_URL_SORTED}"
            ),
            "",
        );
        assert_eq!(verify(&r, KAT_KEY, kat_now()), Ok(()));
        // The two b swapped: the other query sorts stably, so this is another message.
        let r = request_on(
            "example.com:8443",
            &format!(
                "/chat/room?b=1&a=1&b=2&wsedge-date=1796486400&wsedge-expires=60\
                 &wsedge-signature={KAT_SPEC_URL_SORTED}"
            ),
            "",
        );
        assert_eq!(refusal(&r, KAT_KEY, kat_now()), (403, "bad_signature"));
    }

    #[test]
    fn verify_refuses_the_known_answers_one_bit_off_or_under_another_key() {
        let now = kat_now();
        // The first character 's' (44) becomes 't' (45): one bit of the MAC flipped.
        let flipped = format!("t{}", &KAT_SPEC_HEADER[1..]);
        assert_eq!(
            refusal(&kat_request(&flipped, KAT_DATE), KAT_KEY, now),
            (403, "bad_signature")
        );
        assert_eq!(
            refusal(&kat_request(KAT_SPEC_HEADER, KAT_DATE), b"other key", now),
            (403, "bad_signature")
        );
        // '1' (53) becomes '0' (52) in the URL form.
        let flipped = format!(
            "/echo?room=7&user=ann&wsedge-date=1796486400&wsedge-expires=300\
             &wsedge-signature=0{}",
            &KAT_SPEC_URL[1..]
        );
        assert_eq!(
            refusal(&request(&flipped, ""), KAT_KEY, now),
            (403, "bad_signature")
        );
    }

    #[test]
    fn signatures_without_the_host_or_over_the_path_alone_are_refused() {
        for signature in [KAT_OLD_FULL_TARGET, KAT_OLD_PATH_ONLY] {
            assert_eq!(
                refusal(&kat_request(signature, KAT_DATE), KAT_KEY, kat_now()),
                (403, "bad_signature"),
                "{signature}"
            );
        }
    }

    #[test]
    fn a_date_that_is_not_rfc_7231_gets_400_malformed_date() {
        let now = kat_now();
        for date in [
            "2026-12-05T16:00:00Z",
            "1796486400",
            "Sat, 05 Dec 2026 16:00:00",
            "yesterday",
        ] {
            assert_eq!(
                refusal(&kat_request(KAT_SPEC_HEADER, date), KAT_KEY, now),
                (400, "malformed_date"),
                "{date:?}"
            );
        }
    }
}
