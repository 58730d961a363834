//! A real `redis-server` of the test's own, on a free loopback port, so a test can kill it,
//! pause it (`DEBUG SLEEP`) and start it again on the same port. Nothing is persisted.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, Gateway};

pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut r = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs one command with `redis-cli`; its output (empty when Redis is down).
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli is installed (scripts/deps.sh)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills the server (SIGKILL): connections drop, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Pauses the server for `secs` (it accepts connections and answers nothing), in the
    /// background.
    pub fn pause(&self, secs: f64) -> std::thread::JoinHandle<()> {
        let (port, arg) = (self.port, format!("{secs}"));
        std::thread::spawn(move || {
            let _ = Command::new("redis-cli")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "DEBUG",
                    "SLEEP",
                    &arg,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` gateways on the first one's SQLite file and on `redis` (namespace `t{port}`, node ids
/// `node0`…), each with `channels_yaml` and `extra` YAML.
pub fn fleet(channels_yaml: &str, redis: &RedisServer, n: usize, extra: &str) -> Vec<Gateway> {
    fleet_on(channels_yaml, redis, n, extra, None)
}

/// [`fleet`] on the PostgreSQL database at `pg_url` (or, with `None`, one SQLite file).
pub fn fleet_on(
    channels_yaml: &str,
    redis: &RedisServer,
    n: usize,
    extra: &str,
    pg_url: Option<&str>,
) -> Vec<Gateway> {
    let mut nodes: Vec<Gateway> = Vec::new();
    for i in 0..n {
        let redis_yaml = format!(
            "redis: {{ url: \"{}\", timeout_ms: 50, namespace: \"t{}\", node_id: node{i} }}\n{extra}",
            redis.url(),
            redis.port
        );
        let gw = match pg_url {
            Some(url) => Gateway::configure_on_postgres(channels_yaml, &redis_yaml, url),
            None => Gateway::configure(channels_yaml, &redis_yaml),
        };
        if let (Some(first), None) = (nodes.first(), pg_url) {
            let db = first.db_path();
            let yaml = std::fs::read_to_string(&gw.config).unwrap();
            let yaml = yaml.replace(
                &gw.db_path().display().to_string(),
                &db.display().to_string(),
            );
            std::fs::write(&gw.config, yaml).unwrap();
        }
        nodes.push(gw.launch());
    }
    nodes
}
