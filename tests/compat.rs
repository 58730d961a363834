//! The official `openai` Python SDK talks to tollgate: chat, stream, embeddings, models and
//! its error classes. The test command (`scripts/test.sh`) installs the SDK.

mod support;

use support::{Gateway, MockServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_sdk_works_against_tollgate() {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1, m2, emb] }}\n",
        mock.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &["--models", "m1,emb"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/openai_sdk.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tokio::task::spawn_blocking({
        let url = gw.url("/v1");
        move || {
            std::process::Command::new(python)
                .arg(script)
                .env("TOLLGATE_BASE_URL", url)
                .env("TOLLGATE_KEY", key)
                .output()
                .expect("python3 must be installed (scripts/test.sh installs it and the openai package)")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai SDK script failed:\nstdout: {}\nstderr: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
}
