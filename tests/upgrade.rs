//! Zero-downtime upgrade: a second `tollgate serve --upgrade` takes the listening sockets of
//! a running one over `server.upgrade_sock` when the old one gets SIGQUIT; the old process
//! finishes the stream it was serving, then exits, and the new one answers from then on.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{free_port, tollgate_bin, wait_exit, Gateway, MockServer};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn serving_pid(gw: &Gateway) -> Option<u64> {
    let r = client()
        .get(gw.admin_url("/admin/status"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .ok()?;
    r.json::<Value>().await.ok()?["pid"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_takes_the_sockets_while_the_old_one_finishes_its_stream() {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m] }}\n",
        mock.base_url()
    );
    let sock = format!("/tmp/tollgate-test-upgrade-{}.sock", free_port());
    let server_yaml = format!("  upgrade_sock: \"{sock}\"\n");
    let mut old =
        tokio::task::spawn_blocking(move || Gateway::start_with_server(&ch, &server_yaml, ""))
            .await
            .unwrap();
    let key = old.new_key("acme", &[]);
    let old_pid = u64::from(old.child.as_ref().unwrap().id());
    assert_eq!(serving_pid(&old).await, Some(old_pid));

    // A stream in flight on the old process, held at the mock's gate.
    let stream = {
        let (url, key) = (old.url("/v1/chat/completions"), key.clone());
        tokio::spawn(async move {
            let r = client()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}],
                              "x_mock": {"gate": true, "chunks": 3}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.chunks_sent() == 0 {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The new process waits for the sockets; SIGQUIT makes the old one hand them over.
    let log = std::fs::File::create(old.dir.path().join("new.log")).unwrap();
    let mut new = Command::new(tollgate_bin())
        .args(["serve", "--upgrade", "--config"])
        .arg(&old.config)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let new_pid = u64::from(new.id());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut old_child = old.child.take().unwrap();
    assert!(Command::new("kill")
        .args(["-QUIT", &old_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if serving_pid(&old).await == Some(new_pid) {
            break;
        }
        let new_log = std::fs::read_to_string(old.dir.path().join("new.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "the new process never answered; its log:\n{new_log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New requests are answered (by the new process) while the old one still holds its
    // stream.
    for _ in 0..5 {
        let r = client()
            .post(old.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "after"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    mock.open_gate();
    let text = stream.await.unwrap();
    assert!(
        text.contains("data: [DONE]"),
        "the old process finished its stream: {text}"
    );
    let (status, _) = wait_exit(&mut old_child, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process exits cleanly"
    );
    let _ = new.kill();
    let _ = new.wait();
    let _ = std::fs::remove_file(&sock);
}
