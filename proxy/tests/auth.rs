//! HMAC-authenticated functions (SPEC.md "Hmac auth"): a signed upgrade passes; a missing
//! `Date` or `Authorization` gets 400; a bad signature or a `Date` more than 15 minutes off
//! gets 403; the function never sees the key. One test in this binary: it sets the key's
//! environment variable before anything else runs.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wsedge::protocols::auth::sign;

const KEY: &str = "correct horse battery staple";

#[tokio::test]
async fn signed_upgrades_pass_and_missing_bad_or_stale_signatures_are_refused() {
    // SAFETY: the only test in this binary sets it before starting any other thread.
    unsafe { std::env::set_var("WSEDGE_TEST_ECHO_KEY", KEY) };
    let echo = start_echo().await;
    let p = start_proxy(function_config(
        "kernel",
        "",
        &format!(
            "name = \"echo\"\nroute = \"/echo\"\nupstreams = [\"{echo}\"]\n\
             auth = {{ hmac_key_env = \"WSEDGE_TEST_ECHO_KEY\" }}\n"
        ),
    ))
    .await;
    let now = httpdate::fmt_http_date(SystemTime::now());
    let signed = |path: &str, date: &str, key: &str| {
        format!(
            "Date: {date}\r\nAuthorization: {}\r\n",
            sign(key.as_bytes(), path, date)
        )
    };

    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            p.url("/echo?room=7"),
        )
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("Date", now.parse().unwrap());
    headers.insert(
        "Authorization",
        sign(KEY.as_bytes(), "/echo?room=7", &now).parse().unwrap(),
    );
    let mut ws = connect(request).await.expect("a signed upgrade passes");
    ws.send(Message::text("signed")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("signed"));

    let cases = [
        (String::new(), 400, "missing_auth"),
        (format!("Date: {now}\r\n"), 400, "missing_auth"),
        (
            format!("Authorization: {}\r\n", sign(KEY.as_bytes(), "/echo", &now)),
            400,
            "missing_auth",
        ),
        (signed("/echo", &now, "wrong key"), 403, "bad_signature"),
        (signed("/other", &now, KEY), 403, "bad_signature"),
        (
            format!("Date: {now}\r\nAuthorization: Bearer abc\r\n"),
            403,
            "bad_signature",
        ),
        // Not an RFC 7231 date (ISO 8601), signed correctly all the same.
        (
            signed("/echo", "2026-12-05T16:00:00Z", KEY),
            400,
            "malformed_date",
        ),
    ];
    for (headers, status, error_type) in &cases {
        let (got, got_type, body) = exchange(p.addr, &upgrade_request("/echo", headers)).await;
        assert_eq!(
            (got, got_type.as_str()),
            (*status, *error_type),
            "{headers:?}: {body}"
        );
    }
    for minutes in [16i64, -16] {
        let at = if minutes > 0 {
            SystemTime::now() - Duration::from_secs(16 * 60)
        } else {
            SystemTime::now() + Duration::from_secs(16 * 60)
        };
        let date = httpdate::fmt_http_date(at);
        let (got, got_type, _) = exchange(
            p.addr,
            &upgrade_request("/echo", &signed("/echo", &date, KEY)),
        )
        .await;
        assert_eq!(
            (got, got_type.as_str()),
            (403, "stale_date"),
            "{minutes} minutes off"
        );
    }
    let recent = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(14 * 60));
    let head = raw_upgrade(
        p.addr,
        &upgrade_request("/echo", &signed("/echo", &recent, KEY)),
    )
    .await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "14 minutes off is within the window: {head}"
    );
    let metrics = p.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wsedge_handshake_errors_total{function=\"echo\",status=\"403\",error_type=\"stale_date\"}"
        ),
        Some(2),
        "{metrics}"
    );
    p.stop().await;

    // A spawned instance's environment has $PORT but not the key.
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let command = format!(
        "printf '%s %s' \"${{WSEDGE_TEST_ECHO_KEY-unset}}\" \"$PORT\" > {}; exec {}",
        seen.display(),
        echo_fn().display()
    );
    let p = start_proxy(function_config(
        "kernel",
        "",
        &format!(
            "name = \"echo\"\nroute = \"/echo\"\ncommand = [\"sh\", \"-c\", {command:?}]\n\
             auth = {{ hmac_key_env = \"WSEDGE_TEST_ECHO_KEY\" }}\n"
        ),
    ))
    .await;
    let head = raw_upgrade(
        p.addr,
        &upgrade_request("/echo", &signed("/echo", &now, KEY)),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "unset 9000");
    p.stop().await;
}
