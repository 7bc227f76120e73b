//! The `token-sidecar status` subcommand: fetches the admin listener's `/status` and prints it
//! as tables an operator can read at a glance (routes, keys by client hash, calls in progress,
//! cool-downs, limits, the shared tier's breaker). Like `healthcheck`, it needs no shell or curl
//! in the image.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::status::{CooldownStatus, KeyStatus, RouteStatus, Status};

/// `GET path` on the admin address; the body of a 200 answer. A wildcard bind address is asked
/// on loopback.
pub fn admin_get(mut admin: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    if admin.ip().is_unspecified() {
        admin.set_ip(if admin.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let fail = |e: std::io::Error| format!("{admin}: {e}");
    let mut stream = TcpStream::connect_timeout(&admin, timeout).map_err(fail)?;
    stream.set_read_timeout(Some(timeout)).map_err(fail)?;
    stream.set_write_timeout(Some(timeout)).map_err(fail)?;
    stream
        .write_all(
            // HTTP/1.0: the answer is the rest of the stream, never chunked.
            format!("GET {path} HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes(),
        )
        .map_err(fail)?;
    let mut answer = Vec::new();
    // The admin listener's answers are small; a megabyte bounds a confused peer.
    stream
        .take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(fail)?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{admin}{path}: no complete answer"))?;
    let status_line = head.lines().next().unwrap_or("");
    if status_line.split(' ').nth(1) != Some("200") {
        return Err(format!("{admin}{path}: {status_line}"));
    }
    Ok(body.to_owned())
}

/// The subcommand: `/status` of the sidecar at `admin`, as tables or (`json`) as it came.
pub fn command(admin: SocketAddr, timeout: Duration, json: bool) -> Result<String, String> {
    let body = admin_get(admin, "/status", timeout)?;
    if json {
        return Ok(body);
    }
    let document: Status = serde_json::from_str(&body)
        .map_err(|e| format!("/status is not a status document: {e}"))?;
    Ok(render(&document))
}

/// The `/status` document as text tables.
pub fn render(document: &Status) -> String {
    let mut out = String::new();
    let ready = if document.ready {
        "yes"
    } else {
        "no (draining or starting)"
    };
    let _ = writeln!(out, "ready: {ready}");
    match &document.shared {
        Some(fleet) => {
            let connected = if fleet.connected {
                ""
            } else {
                ", not connected"
            };
            let _ = writeln!(
                out,
                "shared tier: {} ({}, breaker {}{connected})",
                fleet.redis, fleet.mode, fleet.breaker
            );
            if let Some(cause) = &fleet.cause {
                let _ = writeln!(out, "  failing: {cause}");
            }
        }
        None => out.push_str("shared tier: off\n"),
    }
    for route in &document.routes {
        render_route(&mut out, route);
    }
    out
}

fn render_route(out: &mut String, route: &RouteStatus) {
    let limiter = &route.limiter;
    let rate = match limiter.calls_per_second {
        rate if rate > 0.0 => format!(
            ", {rate}/s ({:.1} available)",
            limiter.calls_available.unwrap_or(0.0)
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "\nroute {}: {}, {}, upstream calls {}/{} in progress{rate}{}",
        route.name,
        counted(route.keys_total, "key", "keys"),
        counted(route.cooldowns_total, "cool-down", "cool-downs"),
        limiter.calls_in_progress,
        limiter.max_concurrent_calls,
        if route.shared { ", shared" } else { "" }
    );
    render_keys(out, &route.keys, route.keys_total);
    render_cooldowns(out, &route.cooldowns);
}

fn render_keys(out: &mut String, keys: &[KeyStatus], total: usize) {
    if keys.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<10} {:<10} {:>8} {:>6}  STATE",
        "CLIENT", "KEY", "TTL", "TOKENS"
    );
    for key in keys {
        let ttl = key.ttl_s.map_or("-".to_owned(), |s| format!("{s}s"));
        let state = match (key.calling, key.tokens) {
            (true, 0) => "calling",
            (true, _) => "refreshing",
            (false, 0) => "empty",
            (false, _) => "serving",
        };
        let client = key.client.as_deref().unwrap_or("-");
        let _ = writeln!(
            out,
            "  {client:<10} {:<10} {ttl:>8} {:>6}  {state}",
            key.key, key.tokens
        );
    }
    if total > keys.len() {
        let _ = writeln!(out, "  ... {} of {total} keys listed", keys.len());
    }
}

/// `1 key`, `2 keys`.
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn render_cooldowns(out: &mut String, cooldowns: &[CooldownStatus]) {
    if cooldowns.is_empty() {
        return;
    }
    let _ = writeln!(out, "  {:<10} {:>8}", "COOLING", "LEFT");
    for hold in cooldowns {
        let _ = writeln!(out, "  {:<10} {:>7}s", hold.client, hold.left_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_document_renders_as_tables() {
        let document = serde_json::json!({
            "ready": true,
            "shared": {"redis": "redis://…@r:6379/0", "mode": "single", "breaker": "open",
                       "connected": false, "answered": true,
                       "cause": "no answer within 75 ms"},
            "routes": [{
                "name": "default", "keys_total": 3, "keys_listed": 2, "cooldowns_total": 1,
                "shared": true,
                "keys": [
                    {"key": "0a1b2c3d", "client": "ab12cd34", "ttl_s": 3541, "tokens": 1, "calling": true},
                    {"key": "4e5f6071", "client": null, "ttl_s": null, "tokens": 0, "calling": true}
                ],
                "cooldowns": [{"client": "ef56ab78", "left_s": 12}],
                "limiter": {"calls_in_progress": 1, "max_concurrent_calls": 64,
                            "calls_per_second": 5.0, "calls_available": 4.5}
            }]
        });
        let text = render(&serde_json::from_value(document).unwrap());
        assert!(
            text.contains("shared tier: redis://…@r:6379/0 (single, breaker open, not connected)\n  failing: no answer within 75 ms"),
            "{text}"
        );
        assert!(text.contains("route default: 3 keys, 1 cool-down, upstream calls 1/64 in progress, 5/s (4.5 available), shared"), "{text}");
        assert!(
            text.contains("ab12cd34   0a1b2c3d      3541s      1  refreshing"),
            "{text}"
        );
        assert!(
            text.contains("-          4e5f6071          -      0  calling"),
            "{text}"
        );
        assert!(text.contains("... 2 of 3 keys listed"), "{text}");
        assert!(text.contains("ef56ab78        12s"), "{text}");
    }
}
