//! The official `openai` and `anthropic` Python SDKs talk to tollgate: chat, stream,
//! embeddings, models and the error classes; messages, streams, tool use, count_tokens, and
//! each SDK reaching the other's models through translation. The test command
//! (`scripts/test.sh`) installs the SDKs.

mod support;

use support::certs::TestCa;
use support::{Gateway, MockServer};

/// Runs the openai SDK script against `base_url` with `env`.
async fn run_sdk(gw: &Gateway, base_url: String, key: String, env: Vec<(&'static str, String)>) {
    run_script(gw, "openai_sdk.py", base_url, key, env).await;
}

/// Runs `tests/compat/{script}` against `base_url` with `env`; panics with its output on
/// failure.
async fn run_script(
    gw: &Gateway,
    script: &str,
    base_url: String,
    key: String,
    env: Vec<(&'static str, String)>,
) {
    let script = format!("{}/tests/compat/{script}", env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("TOLLGATE_BASE_URL", base_url)
            .env("TOLLGATE_KEY", key)
            .envs(env)
            .output()
            .expect("python3 must be installed (scripts/test.sh installs it and the SDK packages)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "SDK script failed:\nstdout: {}\nstderr: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_python_sdk_works_over_https_and_over_http2() {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1, m2, emb] }}\n",
        mock.base_url()
    );
    let ca = TestCa::new("tollgate test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server("gateway", 30).write(dir.path(), "server");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = format!(
        "  tls: {{ cert: \"{}\", key: \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start_with_server(&ch, &server, ""))
        .await
        .unwrap();
    let secret = gw.new_key("acme", &["--models", "m1,emb"]);
    let ca_env = ca_file.display().to_string();
    // HTTPS over HTTP/1.1, then HTTP/2 chosen by ALPN: chat, stream, embeddings, errors.
    run_sdk(
        &gw,
        gw.https_url("/v1"),
        secret.clone(),
        vec![("SSL_CERT_FILE", ca_env.clone())],
    )
    .await;
    run_sdk(
        &gw,
        gw.https_url("/v1"),
        secret,
        vec![("SSL_CERT_FILE", ca_env), ("TOLLGATE_HTTP2", "1".into())],
    )
    .await;
}

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
    run_sdk(&gw, gw.url("/v1"), key, vec![]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_anthropic_python_sdk_works_natively_and_through_translation() {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: claude, kind: anthropic, base_url: \"{0}\", api_key: sk-ant-up, models: [claude-x] }}\n  - {{ name: main, base_url: \"{0}\", api_key: sk-up, models: [gpt-x] }}\n",
        mock.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    run_script(&gw, "anthropic_sdk.py", gw.url(""), key, vec![]).await;
}
