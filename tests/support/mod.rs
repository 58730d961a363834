//! Integration-test harness: the real `tollgate` binary, a real SQLite file in a temp dir
//! (or a fresh PostgreSQL database: [`pg::TestDb`], [`Gateway::start_on_postgres`]), and the
//! in-repo mock upstream (`tollgate_bench::mock`). Only 127.0.0.1 is used, and every wait is
//! bounded.

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports, reason = "not every test file uses both")]
pub use tollgate_bench::mock::{Behaviour, ConnectionStats, MockProtocols, MockServer};

pub mod certs;
pub mod pg;
pub mod redis;

/// The binary under test: this build's, or `TOLLGATE_BIN` (to show a test fails against
/// an older build).
pub fn tollgate_bin() -> String {
    std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").to_string())
}

/// A free loopback port (bound, then released for the gateway to take). The kernel may hand
/// a just-released port out again, so a port this test process was already given is never
/// returned twice (two calls in a row once gave one gateway the same listen and admin port).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no fresh loopback port after 1000 tries");
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    /// Unique per gateway, so a probe can never be answered by another test's process.
    pub admin_token: String,
    pub config: PathBuf,
    pub port: u16,
    pub admin_port: u16,
    pub child: Option<Child>,
}

/// One channel line for the YAML.
pub fn channel(
    name: &str,
    base_url: &str,
    api_key: &str,
    models: &[&str],
    priority: i32,
) -> String {
    format!(
        "  - {{ name: {name}, base_url: \"{base_url}\", api_key: \"{api_key}\", models: [{}], priority: {priority}, connect_timeout_ms: 1000, read_timeout_ms: 10000 }}\n",
        models.join(", ")
    )
}

impl Gateway {
    /// Writes a config with `channels_yaml` (list items) and `extra_yaml` (more top-level
    /// sections), creates the database, and starts `tollgate serve`.
    pub fn start(channels_yaml: &str, extra_yaml: &str) -> Gateway {
        let gw = Gateway::configure(channels_yaml, extra_yaml);
        gw.launch()
    }

    /// Like [`Gateway::start`], on the PostgreSQL database at `url` (`database: { url }`).
    pub fn start_on_postgres(channels_yaml: &str, extra_yaml: &str, url: &str) -> Gateway {
        let gw = Gateway::configure_on_postgres(channels_yaml, extra_yaml, url);
        gw.launch()
    }

    /// Like [`Gateway::configure`], with `database: { url }` instead of the SQLite file.
    pub fn configure_on_postgres(channels_yaml: &str, extra_yaml: &str, url: &str) -> Gateway {
        let gw = Gateway::configure(channels_yaml, extra_yaml);
        let yaml = std::fs::read_to_string(&gw.config).unwrap();
        let sqlite = format!("database:\n  path: \"{}\"\n", gw.db_path().display());
        assert!(yaml.contains(&sqlite));
        let yaml = yaml.replacen(
            &sqlite,
            &format!("database:\n  url: \"{url}\"\n  pool_size: 4\n"),
            1,
        );
        std::fs::write(&gw.config, yaml).unwrap();
        gw
    }

    /// The SQLite file of a gateway configured with one.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("tollgate.db")
    }

    pub fn configure(channels_yaml: &str, extra_yaml: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let db = dir.path().join("tollgate.db");
        let admin_token = format!("test-admin-{port}-{admin_port}");
        let yaml = format!(
            "server:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin_port}\"\n  threads: 2\n  admin_token: {admin_token}\n  max_body_bytes: 2097152\n  grace_period_s: 10\n  log_level: info\ndatabase:\n  path: \"{}\"\nchannels:\n{channels_yaml}{extra_yaml}",
            db.display()
        );
        // Relay tests use unpriced models; billing tests bring their own price table.
        let yaml = if extra_yaml.contains("pricing:") {
            yaml
        } else {
            format!("{yaml}pricing: {{ unpriced: free }}\n")
        };
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, yaml).unwrap();
        Gateway {
            dir,
            admin_token,
            config,
            port,
            admin_port,
            child: None,
        }
    }

    /// Like [`Gateway::start`], with `server_yaml` (lines indented by two spaces, e.g.
    /// `"  connections: { head_timeout_ms: 3000 }\n"`) added to the `server:` section.
    pub fn start_with_server(channels_yaml: &str, server_yaml: &str, extra_yaml: &str) -> Gateway {
        let gw = Gateway::configure(channels_yaml, extra_yaml);
        let yaml = std::fs::read_to_string(&gw.config).unwrap();
        let yaml = yaml.replacen("server:\n", &format!("server:\n{server_yaml}"), 1);
        std::fs::write(&gw.config, yaml).unwrap();
        gw.launch()
    }

    pub fn launch(mut self) -> Gateway {
        let log = std::fs::File::create(self.dir.path().join("gateway.log")).unwrap();
        let child = Command::new(tollgate_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tollgate");
        self.child = Some(child);
        self.wait_ready();
        self
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        // An admin listener behind TLS cannot be probed in plain text: the main listener
        // answering anything (it is up last) says the gateway is serving.
        let admin_tls = std::fs::read_to_string(&self.config)
            .unwrap_or_default()
            .contains("admin_tls:");
        while Instant::now() < deadline {
            let up = match admin_tls {
                false => probe(self.admin_port, "/healthz", &self.admin_token) == Some(200),
                true => std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if up {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("gateway exited with {status}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("gateway did not become healthy; log:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The main listener over TLS, by the name the test certificates carry.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Runs a CLI command against this gateway's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(tollgate_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("run tollgate")
    }

    /// A new account with `usd` and a key on it (with `key_flags`); returns the secret.
    pub fn account_with_key(&self, account: &str, usd: &str, key_flags: &[&str]) -> String {
        let out = self.cli(&["accounts", "create", account, "--balance-usd", usd]);
        assert!(
            out.status.success(),
            "accounts create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.key_on(account, key_flags)
    }

    /// `accounts create` (100 USD; an account that exists is kept) + `keys create`; returns
    /// the secret (the last stdout line).
    pub fn new_key(&self, account: &str, key_flags: &[&str]) -> String {
        let _ = self.cli(&["accounts", "create", account, "--balance-usd", "100"]);
        self.key_on(account, key_flags)
    }

    fn key_on(&self, account: &str, key_flags: &[&str]) -> String {
        let mut args = vec!["keys", "create", "--account", account];
        args.extend_from_slice(key_flags);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let secret = stdout.lines().last().unwrap().trim().to_string();
        assert!(secret.starts_with("sk-tg-"), "{stdout}");
        secret
    }

    /// Sends SIGTERM and returns the child, to be waited on by the test.
    pub fn sigterm(&mut self) -> Child {
        let child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        child
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a child to exit, bounded; returns its exit status and how long it took.
pub fn wait_exit(
    child: &mut Child,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return (Some(s), start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    (None, start.elapsed())
}

/// `POST` a JSON body to the gateway with a bearer key.
pub async fn post(
    gw: &Gateway,
    key: &str,
    path: &str,
    body: &serde_json::Value,
) -> ::reqwest::Response {
    ::reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(gw.url(path))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("gateway answers")
}

/// `POST` a JSON body to the gateway with the given headers (credentials included).
pub async fn post_with(
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> ::reqwest::Response {
    let mut req = ::reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(gw.url(path))
        .json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().await.expect("gateway answers")
}

/// One GET over a fresh std TcpStream, returning the status code; enough for a probe.
pub fn probe(port: u16, path: &str, token: &str) -> Option<u16> {
    raw_status(port, "GET", path, token, "")
}

/// One request written byte for byte (no client-side path normalisation), returning the
/// status code.
pub fn raw_status(port: u16, method: &str, path: &str, token: &str, body: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

/// `(column, cost_nano)` of every ledger row in `order`, once there are `n` (waiting up to
/// 10 s for the writer's commits); panics with the rows if there are not exactly `n`.
pub async fn ledger_rows(gw: &Gateway, column: &str, order: &str, n: usize) -> Vec<(String, i64)> {
    let sql = format!("SELECT {column}, cost_nano FROM usage_ledger ORDER BY {order}");
    let read = || {
        let db = rusqlite::Connection::open(gw.db_path()).unwrap();
        let mut st = db.prepare(&sql).unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<(String, i64)>>()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rows = read();
    while rows.len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        rows = read();
    }
    assert_eq!(rows.len(), n, "ledger rows: {rows:?}");
    rows
}

/// The gateway's `/metrics` text.
pub async fn metrics_text(gw: &Gateway) -> String {
    ::reqwest::Client::new()
        .get(gw.admin_url("/metrics"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .expect("admin answers")
        .text()
        .await
        .unwrap_or_default()
}

/// The value of the first series whose line starts with `line_start` (0 when absent).
pub async fn metric(gw: &Gateway, line_start: &str) -> f64 {
    metrics_text(gw)
        .await
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum over every series of the family `name`.
pub async fn metric_sum(gw: &Gateway, name: &str) -> f64 {
    metrics_text(gw)
        .await
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
