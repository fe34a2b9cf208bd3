//! `wsedge trace`: prints a running wsedge's data-plane events as they happen, from its admin
//! API's `GET /trace` (one JSON object per line), as they are (`--json`) or as aligned text.

use std::{io::Write, net::SocketAddr};

use anyhow::Context;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use wsedge::{config::Config, tracer::TraceEvent};

pub struct Options {
    pub admin: SocketAddr,
    pub function: Option<String>,
    pub json: bool,
}

/// Streams until wsedge stops or the output is closed (a pipe into `head`).
#[tokio::main(flavor = "current_thread")]
pub async fn run(config: &Config, options: Options) -> anyhow::Result<()> {
    let addr = options.admin;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("admin API at {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .with_context(|| format!("admin API at {addr}"))?;
    tokio::spawn(connection);
    let path = match &options.function {
        Some(f) => format!("/trace?function={}", percent_encode(f)),
        None => "/trace".to_string(),
    };
    let mut request = hyper::Request::get(&path).header(hyper::header::HOST, "wsedge");
    if let Some(token) = crate::admin_token(config)? {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(http_body_util::Empty::<hyper::body::Bytes>::new())?)
        .await
        .with_context(|| format!("admin API at {addr}: GET {path}"))?;
    let status = response.status();
    let mut body = response.into_body();
    if status != hyper::StatusCode::OK {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        anyhow::bail!(
            "admin API at {addr}: GET {path} answered {status}: {}",
            String::from_utf8_lossy(&text)
        );
    }
    let mut pending = Vec::new();
    let mut out = std::io::stdout().lock();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("admin API at {addr}: the trace stream"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = &line[..end];
            // Empty lines are the stream's heartbeat.
            if line.is_empty() {
                continue;
            }
            let printed = if options.json {
                out.write_all(line).and_then(|()| out.write_all(b"\n"))
            } else {
                match serde_json::from_slice::<TraceEvent>(line) {
                    Ok(event) => writeln!(out, "{}", text_line(&event)),
                    Err(e) => anyhow::bail!(
                        "unreadable trace event ({e}): {}",
                        String::from_utf8_lossy(line)
                    ),
                }
            };
            if printed.and_then(|()| out.flush()).is_err() {
                // The reader went away (`| head`): done.
                return Ok(());
            }
        }
    }
    anyhow::bail!("wsedge closed the trace stream (it stopped)")
}

/// `TIME CONNECTION FUNCTION DIR EVENT details`.
fn text_line(e: &TraceEvent) -> String {
    let mut details = Vec::new();
    if let Some(code) = e.code {
        details.push(format!("code={code}"));
    }
    if let Some(status) = e.status {
        details.push(format!("status={status}"));
    }
    if let Some(plane) = &e.data_plane {
        details.push(format!("data_plane={plane}"));
    }
    if let Some(reason) = &e.reason {
        details.push(format!("reason={reason}"));
    }
    if let Some(count) = e.count {
        details.push(format!("count={count}"));
    }
    details.push(format!("({})", e.source));
    format!(
        "{:<27} {:<20} {:<12} {:<3} {:<20} {}",
        e.time,
        if e.id.is_empty() { "-" } else { &e.id },
        if e.function.is_empty() {
            "-"
        } else {
            &e.function
        },
        e.direction.as_deref().unwrap_or("-"),
        e.event,
        details.join(" ")
    )
}

/// A function name as a query value.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_line_has_time_connection_function_direction_event_and_details() {
        let event: TraceEvent = serde_json::from_str(
            r#"{"time":"2026-12-06T01:02:03.000004Z","id":"1a2b-7","function":"echo",
                "direction":"in","event":"close_frame","source":"kernel","code":1000}"#,
        )
        .unwrap();
        let line = text_line(&event);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "2026-12-06T01:02:03.000004Z",
                "1a2b-7",
                "echo",
                "in",
                "close_frame",
                "code=1000",
                "(kernel)"
            ]
        );
        let lost: TraceEvent = serde_json::from_str(
            r#"{"time":"t","id":"","function":"","event":"lost","source":"proxy","count":3}"#,
        )
        .unwrap();
        assert!(
            text_line(&lost)
                .split_whitespace()
                .eq(["t", "-", "-", "-", "lost", "count=3", "(proxy)"])
        );
    }

    #[test]
    fn a_function_name_is_escaped_for_the_query() {
        assert_eq!(percent_encode("chat room/1"), "chat%20room%2F1");
        assert_eq!(percent_encode("echo-fn_2.v~"), "echo-fn_2.v~");
    }
}
