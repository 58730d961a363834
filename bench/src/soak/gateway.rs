//! The gateway under soak: a real `tollgate` process on a temp SQLite file, restartable.

use super::*;

/// The gateway process: one config, one SQLite file, restarted on the same file.
pub(super) struct Gateway {
    pub(super) bin: PathBuf,
    pub(super) config: PathBuf,
    pub(super) log: PathBuf,
    pub(super) admin_port: u16,
    pub(super) token: String,
    pub(super) child: Option<Child>,
}

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Gateway {
    pub(super) fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("gateway log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub(super) async fn wait_healthy(&mut self, http: &reqwest::Client) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let r = http
                .get(format!("http://127.0.0.1:{}/healthz", self.admin_port))
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("gateway exited with {st}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("gateway did not become healthy within 30 s".into())
    }

    /// Sends `sig` and waits (bounded) for the exit; returns the exit status text.
    pub(super) async fn signal_and_wait(&mut self, sig: &str, limit: Duration) -> String {
        let Some(mut child) = self.child.take() else {
            return "not running".into();
        };
        if sig == "KILL" {
            let _ = child.kill();
        } else {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.to_string();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return format!("did not exit within {limit:?}; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
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
