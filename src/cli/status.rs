//! Talking to a running gateway's admin listener: one request (`tollgate status`, the
//! key-cache notice after a revoke), and the status screen.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One request to an admin listener (`Connection: close`; the admin answers with a
/// `Content-Length` body): its status and body. An unspecified listen address
/// (`0.0.0.0:8081`) is reached on loopback.
pub(super) fn admin_request(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
) -> Result<(u16, Vec<u8>), String> {
    let mut addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("admin address `{addr}`: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("cannot reach the admin listener at {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {token}\r\n")
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = memchr::memmem::find(&raw, b"\r\n\r\n").ok_or("truncated admin answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or("unreadable admin answer")?;
    Ok((code, raw[split + 4..].to_vec()))
}

/// `tollgate status`: one screen from `GET /admin/status`.
pub(super) fn render_status(addr: &str, v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let num = |f: &str| v[f].as_f64();
    let ms = |f: &str| num(f).map_or("-".to_string(), |x| format!("{x:.1} ms"));
    let uptime = v["uptime_s"].as_u64().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tollgate {} ({}) at {addr}: {}",
        v["version"].as_str().unwrap_or("?"),
        v["commit"].as_str().unwrap_or("?"),
        v["ready"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "uptime      {}d {:02}h {:02}m {:02}s",
        uptime / 86_400,
        uptime % 86_400 / 3600,
        uptime % 3600 / 60,
        uptime % 60
    );
    let _ = writeln!(
        out,
        "traffic     {:.1} req/s over the last {} s ({} requests), {} in flight",
        num("requests_per_s").unwrap_or(0.0),
        v["window_s"].as_u64().unwrap_or(0),
        v["requests_in_window"].as_u64().unwrap_or(0),
        v["in_flight"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "latency     p99 {}, gateway overhead p99 {}",
        ms("p99_ms"),
        ms("overhead_p99_ms")
    );
    let channels = v["channels"].as_array().cloned().unwrap_or_default();
    let up = channels.iter().filter(|c| c["up"] == true).count();
    let _ = writeln!(out, "channels    {up}/{} up", channels.len());
    for c in &channels {
        let _ = writeln!(
            out,
            "  {:<24} {:<5} {}/{} slots in use",
            c["name"].as_str().unwrap_or("?"),
            if c["up"] == true { "up" } else { "DOWN" },
            c["in_use"].as_u64().unwrap_or(0),
            c["max_concurrency"].as_u64().unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "ledger lag  {} rows not yet committed",
        v["ledger_lag_rows"].as_u64().unwrap_or(0)
    );
    out
}
