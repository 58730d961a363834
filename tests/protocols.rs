//! TLS and HTTP/2 at the edge, HTTP/2 to providers: the real binary, a real SQLite file,
//! the in-repo mock (HTTP/1.1, h2c, TLS with or without ALPN `h2`) and certificates made
//! in the test. curl drives the HTTP/2 and TLS listeners as a client would; the `h2` crate
//! drives HTTP/2 streams one by one (resets included).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use support::certs::TestCa;
use support::{Behaviour, Gateway, MockProtocols, MockServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: &str = "limits:\n  default: { rpm: 1000000, tpm: 1000000000, concurrency: 4000 }\n";

/// A gateway in front of `mock` with `server_yaml` added to `server:` and `channel_yaml`
/// added to the channel's flow mapping.
async fn gateway(mock: &MockServer, channel_yaml: &str, server_yaml: &str) -> Gateway {
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1, emb], max_concurrency: 4000, connect_timeout_ms: 2000, read_timeout_ms: 20000{channel_yaml} }}\n",
        mock.base_url()
    );
    let server = server_yaml.to_string();
    tokio::task::spawn_blocking(move || Gateway::start_with_server(&ch, &server, LIMITS))
        .await
        .unwrap()
}

/// Writes a CA, a server certificate it signs (`cn`) and its key into `dir`.
fn tls_files(dir: &Path, ca: &TestCa, cn: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = ca.server(cn, 30).write(dir, "server");
    (ca_file, cert, key)
}

fn tls_yaml(field: &str, cert: &Path, key: &Path, more: &str) -> String {
    format!(
        "  {field}: {{ cert: \"{}\", key: \"{}\"{more} }}\n",
        cert.display(),
        key.display()
    )
}

/// Runs curl (bounded by `--max-time`) and returns (exit ok, stdout, stderr).
fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl must be installed (scripts/deps.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chat(stream: bool) -> String {
    json!({"model": "m1", "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
        .to_string()
}

// ---------------------------------------------------------------------------------------
// An HTTP/2 client on the `h2` crate: prior knowledge over TCP (h2c) or ALPN over TLS.

type H2 = h2::client::SendRequest<Bytes>;

async fn h2c(port: u16) -> H2 {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // Hundreds of streams each buffering small SSE frames: a window and a small-frame
    // budget (h2's guard against floods of tiny DATA frames) to match, as a real client
    // multiplexing streams would set.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .data_frame_budget(16 << 20)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends one POST on a new stream; returns the response head and the stream's two ends.
async fn h2_post(
    h2: &H2,
    port: u16,
    path: &str,
    key: &str,
    body: &Value,
) -> (http::response::Parts, h2::RecvStream, h2::SendStream<Bytes>) {
    let mut send = h2.clone().ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{port}{path}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream
        .send_data(Bytes::from(body.to_string()), true)
        .unwrap();
    let (head, body) = resp.await.unwrap().into_parts();
    (head, body, stream)
}

/// Reads a response body to its end (bounded), releasing flow-control capacity as it goes.
async fn h2_text(body: &mut h2::RecvStream) -> Result<String, h2::Error> {
    let mut text = Vec::new();
    let read = async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            text.extend_from_slice(&chunk);
        }
        Ok::<(), h2::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("body within 60 s")?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

async fn readyz(gw: &Gateway) -> Value {
    reqwest::Client::new()
        .get(gw.admin_url("/readyz"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (bounded) until nothing is held: slots, places, tokens, money.
async fn idle(gw: &Gateway) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = readyz(gw).await;
        let a = &v["admission"];
        if v["channels"]["main"]["in_use"] == 0
            && a["queue"]["concurrency_held"] == 0
            && a["tokens_held"] == 0
            && a["reserved_nano"] == 0
        {
            return v;
        }
        assert!(Instant::now() < deadline, "still held: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The listeners.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http2_by_alpn_and_http11_to_the_tls_listener_and_h2c_to_the_plain_one() {
    let mock = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (ca_file, cert, key) = tls_files(dir.path(), &ca, "gateway");
    let tls = gateway(&mock, "", &tls_yaml("tls", &cert, &key, "")).await;
    let h2c_gw = gateway(&mock, "", "  h2c: true\n").await;
    let secret = tls.new_key("acme", &[]);
    let secret2 = h2c_gw.new_key("acme", &[]);
    let ca_arg = ca_file.to_str().unwrap();
    let body = chat(true);
    let auth = format!("Authorization: Bearer {secret}");
    let url = tls.https_url("/v1/chat/completions");
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (ok, out, err) = curl(&[
            flag,
            "--cacert",
            ca_arg,
            "-N",
            "-H",
            &auth,
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ]);
        assert!(ok, "curl {flag}: {err}\n{}", tls.log());
        assert!(out.ends_with(&format!("\n{version} 200")), "{flag}: {out}");
        assert!(
            out.contains("tok2 ") && out.contains("data: [DONE]"),
            "{out}"
        );
    }
    // No plain text on the TLS port.
    let (ok, _, _) = curl(&[&format!("http://127.0.0.1:{}/v1/models", tls.port)]);
    assert!(!ok, "the TLS listener answered plain HTTP");

    // h2c: prior knowledge, and HTTP/1.1 still served on the same port.
    let auth2 = format!("Authorization: Bearer {secret2}");
    let url2 = h2c_gw.url("/v1/chat/completions");
    for flag in ["--http2-prior-knowledge", "--http1.1"] {
        let (ok, out, err) = curl(&[
            flag,
            "-N",
            "-H",
            &auth2,
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            "-w",
            "\n%{http_version} %{http_code}",
            &url2,
        ]);
        assert!(ok, "curl {flag}: {err}\n{}", h2c_gw.log());
        let version = if flag == "--http1.1" { "1.1" } else { "2" };
        assert!(out.ends_with(&format!("\n{version} 200")), "{flag}: {out}");
        assert!(out.contains("data: [DONE]"), "{out}");
    }
    // Without h2c, prior-knowledge HTTP/2 is not understood.
    let plain = gateway(&mock, "", "").await;
    let (ok, out, _) = curl(&[
        "--http2-prior-knowledge",
        "-w",
        "%{http_version}",
        &plain.url("/v1/models"),
    ]);
    assert!(
        !ok || !out.ends_with('2'),
        "h2c answered without server.h2c: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_over_tls_requires_a_client_certificate_signed_by_client_ca() {
    let mock = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("server CA");
    let (ca_file, cert, key) = tls_files(dir.path(), &ca, "admin");
    let client_ca = TestCa::new("client CA");
    let client_ca_file = dir.path().join("client-ca.pem");
    std::fs::write(&client_ca_file, client_ca.pem()).unwrap();
    let (ccert, ckey) = client_ca.client("operator").write(dir.path(), "operator");
    let (rcert, rkey) = TestCa::new("rogue CA")
        .client("rogue")
        .write(dir.path(), "rogue");
    let more = format!(", client_ca: \"{}\"", client_ca_file.display());
    let gw = gateway(&mock, "", &tls_yaml("admin_tls", &cert, &key, &more)).await;
    let url = format!("https://localhost:{}/healthz", gw.admin_port);
    let auth = format!("Authorization: Bearer {}", gw.admin_token);
    let ca_arg = ca_file.to_str().unwrap();
    let (ok, out, err) = curl(&[
        "--cacert",
        ca_arg,
        "--cert",
        ccert.to_str().unwrap(),
        "--key",
        ckey.to_str().unwrap(),
        "-H",
        &auth,
        "-w",
        "%{http_code}",
        &url,
    ]);
    assert!(ok && out.ends_with("200"), "{out} {err}\n{}", gw.log());
    let (ok, _, _) = curl(&["--cacert", ca_arg, "-H", &auth, &url]);
    assert!(!ok, "served without a client certificate");
    let (ok, _, _) = curl(&[
        "--cacert",
        ca_arg,
        "--cert",
        rcert.to_str().unwrap(),
        "--key",
        rkey.to_str().unwrap(),
        "-H",
        &auth,
        &url,
    ]);
    assert!(!ok, "served a client certificate from another CA");
    // TLS 1.2 and 1.3 only.
    let (ok, _, _) = curl(&[
        "--cacert",
        ca_arg,
        "--cert",
        ccert.to_str().unwrap(),
        "--key",
        ckey.to_str().unwrap(),
        "--tlsv1.1",
        "--tls-max",
        "1.1",
        &url,
    ]);
    assert!(!ok, "TLS 1.1 was accepted");
}

// ---------------------------------------------------------------------------------------
// Certificates swapped while serving.

/// One HTTPS request on a new connection (so a new handshake): the status and the
/// common name of the certificate the gateway presented.
async fn https_once(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    key: &str,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let cn = {
        let (_, conn) = s.get_ref();
        let der = conn.peer_certificates().ok_or("no certificate")?[0].clone();
        common_name(der.as_ref())
    };
    let body = chat(false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status = text
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))?;
    Ok((status, cn))
}

/// The subject's common name, found by its OID (2.5.4.3) followed by a string.
fn common_name(der: &[u8]) -> String {
    let oid = [0x06, 0x03, 0x55, 0x04, 0x03];
    let mut found = String::new();
    for i in 0..der.len().saturating_sub(oid.len() + 2) {
        if der[i..i + oid.len()] == oid {
            let len = der[i + oid.len() + 1] as usize;
            let start = i + oid.len() + 2;
            found = String::from_utf8_lossy(&der[start..(start + len).min(der.len())]).into_owned();
        }
    }
    found // the last one: the subject follows the issuer
}

fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // Every connection a full handshake: a resumed session shows the certificate of the
    // session it resumes, not the one served now.
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Replaces a file the way deploy tools do: write beside it, then rename over it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits (bounded) until a new connection is served the certificate named `cn`.
async fn wait_for_cert(tls: &tokio_rustls::TlsConnector, gw: &Gateway, key: &str, cn: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((_, seen)) = https_once(tls, gw.port, key).await {
            if seen == cn {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "`{cn}` never served\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_swapped_under_load_fail_no_request_and_a_bad_one_is_refused() {
    let mock = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (_, cert, key) = tls_files(dir.path(), &ca, "first");
    let gw = gateway(
        &mock,
        "",
        &tls_yaml("tls", &cert, &key, ", reload_interval_s: 1"),
    )
    .await;
    let secret = gw.new_key("acme", &[]);
    let client = tls_client(&ca.pem());
    assert_eq!(
        https_once(&client, gw.port, &secret).await.unwrap(),
        (200, "first".to_string())
    );

    // Load: 4 clients, a new connection per request, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        let (client, port, secret) = (client.clone(), gw.port, secret.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 5000 {
                n += 1;
                match https_once(&client, port, &secret).await {
                    Ok((200, cn)) => served.lock().unwrap().push((Instant::now(), cn)),
                    Ok((status, _)) => failures.lock().unwrap().push(format!("status {status}")),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A new pair (both files replaced), picked up by the poll.
    let second = ca.server("second", 30);
    replace(&key, &second.key);
    replace(&cert, &second.cert);
    wait_for_cert(&client, &gw, &secret, "second").await;
    // Handshakes that began before the swap may finish just after it.
    let swapped = Instant::now() + Duration::from_millis(200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A certificate whose key does not match it, then an expired one: refused, logged,
    // and "second" keeps serving.
    let other = ca.server("mismatched", 30);
    replace(&cert, &other.cert);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expired = ca.server("expired", -1);
    replace(&key, &expired.key);
    replace(&cert, &expired.cert);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let served = served.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served.len() > 20, "too little load: {}", served.len());
    let names: std::collections::BTreeSet<&str> = served.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        names,
        ["first", "second"].into(),
        "only the good certificates were ever served (the bad pairs were refused)"
    );
    let late: Vec<&str> = served
        .iter()
        .filter(|(t, _)| *t > swapped)
        .map(|(_, c)| c.as_str())
        .collect();
    assert!(
        late.len() > 10,
        "too little load after the swap: {}",
        late.len()
    );
    assert!(
        late.iter().all(|c| *c == "second"),
        "after the swap only `second` is served"
    );
    assert_eq!(
        https_once(&client, gw.port, &secret).await.unwrap().1,
        "second"
    );
    let log = gw.log();
    assert!(log.contains("does not match the certificate"), "{log}");
    assert!(log.contains("expired on"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "key material in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_when_polling_is_off() {
    let mock = MockServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let (_, cert, key) = tls_files(dir.path(), &ca, "before");
    let gw = gateway(
        &mock,
        "",
        &tls_yaml("tls", &cert, &key, ", reload_interval_s: 0"),
    )
    .await;
    let secret = gw.new_key("acme", &[]);
    let client = tls_client(&ca.pem());
    let after = ca.server("after", 30);
    replace(&key, &after.key);
    replace(&cert, &after.cert);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        https_once(&client, gw.port, &secret).await.unwrap(),
        (200, "before".to_string()),
        "nothing polls"
    );
    let pid = gw.child.as_ref().unwrap().id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_for_cert(&client, &gw, &secret, "after").await;
    assert!(
        https_once(&client, gw.port, &secret).await.is_ok(),
        "still running"
    );
}

// ---------------------------------------------------------------------------------------
// HTTP/2 clients: cancellation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_stream_reset_mid_answer_is_billed_the_real_usage_and_frees_what_it_held() {
    let mock = MockServer::start().await;
    let gw = {
        let ch = format!(
            "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1] }}\n",
            mock.base_url()
        );
        let pricing =
            "pricing:\n  models:\n    m1: { input: 2.00, output: 8.00 }\n  unpriced: reject\n";
        tokio::task::spawn_blocking(move || {
            Gateway::start_with_server(
                &ch,
                "  h2c: true\n  h2: { max_concurrent_streams: 7, max_header_list_bytes: 8192 }\n",
                pricing,
            )
        })
        .await
        .unwrap()
    };
    let _ = gw.cli(&["accounts", "create", "acme", "--balance-usd", "10"]);
    let secret = gw.new_key("acme", &[]);
    let h2 = h2c(gw.port).await;
    let body = json!({"model": "m1", "stream": true, "messages": [{"role": "user", "content": "hi"}], "x_mock": {"chunks": 60, "delay_ms": 10}});
    let (head, mut recv, mut send) =
        h2_post(&h2, gw.port, "/v1/chat/completions", &secret, &body).await;
    assert_eq!(head.status, 200);
    let rid = head.headers["x-request-id"].to_str().unwrap().to_string();
    let mut text = String::new();
    while !text.contains("tok4 ") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), recv.data())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    send.send_reset(h2::Reason::CANCEL);
    drop(recv);

    // The ledger row: the provider's own usage, read on after the reset.
    let db = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let row = loop {
        let row = db.query_row(
            "SELECT prompt_tokens, completion_tokens, estimated, cost_nano FROM usage_ledger WHERE request_id = ?1",
            [&rid],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)),
        );
        if let Ok(row) = row {
            break row;
        }
        assert!(Instant::now() < deadline, "no ledger row\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (prompt, completion, estimated, cost) = row;
    assert_eq!(
        (completion, estimated),
        (60, 0),
        "billed the provider's usage"
    );
    assert_eq!(mock.chunks_sent(), 60);
    let served = &mock.served()[0];
    assert_eq!(prompt as u64, served.prompt_tokens);
    assert_eq!(cost, prompt * 2000 + 60 * 8000);
    // Slots, places, tokens and the reservation are all given back.
    idle(&gw).await;
    let balance: i64 = db
        .query_row(
            "SELECT balance_nano FROM accounts WHERE name = 'acme'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        balance,
        10_000_000_000 - cost,
        "only the real cost was taken"
    );
    // The connection itself lives on: another stream on it is served.
    let (head, mut recv, _send) = h2_post(
        &h2,
        gw.port,
        "/v1/chat/completions",
        &secret,
        &json!({"model": "m1", "messages": []}),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(h2_text(&mut recv)
        .await
        .unwrap()
        .contains("chat.completion"));
    // `server.h2` reached the client in the gateway's SETTINGS, and is enforced.
    assert_eq!(h2.current_max_send_streams(), 7);
    let mut send = h2.clone().ready().await.unwrap();
    let big = http::Request::builder()
        .method("GET")
        .uri(format!("http://127.0.0.1:{}/v1/models", gw.port))
        .header("authorization", format!("Bearer {secret}"))
        .header("x-big", "x".repeat(16 * 1024))
        .body(())
        .unwrap();
    let refused = match send.send_request(big, true) {
        Err(_) => true,
        Ok((resp, _)) => match tokio::time::timeout(Duration::from_secs(10), resp).await {
            Ok(Ok(r)) => r.status() != 200,
            Ok(Err(_)) => true,
            Err(_) => panic!("no answer to an oversized header list"),
        },
    };
    assert!(
        refused,
        "a 16 KiB header passed a max_header_list_bytes of 8192"
    );
    let log = gw.log();
    assert!(
        log.contains("client_gone=true") || log.contains("\"client_gone\":true"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_stops_reading_is_held_by_flow_control_then_let_go_and_billed() {
    let mock = MockServer::start().await;
    let gw = {
        let ch = format!(
            "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1] }}\n",
            mock.base_url()
        );
        let pricing =
            "pricing:\n  models:\n    m1: { input: 2.00, output: 8.00 }\n  unpriced: reject\n";
        tokio::task::spawn_blocking(move || {
            Gateway::start_with_server(
                &ch,
                "  h2c: true\n  client_write_timeout_ms: 1000\n",
                pricing,
            )
        })
        .await
        .unwrap()
    };
    let _ = gw.cli(&["accounts", "create", "acme", "--balance-usd", "10"]);
    let secret = gw.new_key("acme", &[]);
    // A plain client: the default 64 KiB stream window, never released below.
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // About 300 KB of events: far more than the window lets through.
    let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"chunks": 2000}});
    let (head, recv, _send) = h2_post(&h2, gw.port, "/v1/chat/completions", &secret, &body).await;
    assert_eq!(head.status, 200);
    let rid = head.headers["x-request-id"].to_str().unwrap().to_string();
    let db = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (completion, estimated) = loop {
        let row = db.query_row(
            "SELECT completion_tokens, estimated FROM usage_ledger WHERE request_id = ?1",
            [&rid],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        );
        if let Ok(row) = row {
            break row;
        }
        assert!(Instant::now() < deadline, "no ledger row\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (completion, estimated),
        (2000, 0),
        "the gateway read the provider to its usage while the client's window stayed shut"
    );
    assert_eq!(mock.chunks_sent(), 2000);
    idle(&gw).await;
    let log = gw.log();
    assert!(log.contains("client_gone=true"), "{log}");
    drop(recv);
}

// ---------------------------------------------------------------------------------------
// HTTP/2 to providers.

/// Opens `n` gated streams through the gateway (over `clients` h2c connections), waits
/// until the mock holds all of them, returns the mock's connection counts, then opens the
/// gate and checks every stream finishes whole.
async fn concurrent_streams(
    gw: &Gateway,
    mock: &MockServer,
    n: usize,
    clients: usize,
) -> support::ConnectionStats {
    let secret = gw.new_key("acme", &[]);
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(h2c(gw.port).await);
    }
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let h2 = conns[i % clients].clone();
        let (port, secret, done) = (gw.port, secret.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"gate": true, "chunks": 3}});
            let (head, mut recv, _send) = h2_post(&h2, port, "/v1/chat/completions", &secret, &body).await;
            let text = h2_text(&mut recv)
                .await
                .unwrap_or_else(|e| format!("broken stream: {e:?}"));
            done.fetch_add(1, Ordering::SeqCst);
            (head.status.as_u16(), text)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while mock.requests().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} streams reached the mock\n{}",
            mock.requests().len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = mock.connections();
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "a stream ended before the gate opened"
    );
    mock.open_gate();
    for t in tasks {
        let (status, text) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "{text}");
        assert!(
            text.contains("tok2 ") && text.ends_with("data: [DONE]\n\n"),
            "{text}"
        );
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_streams_share_ceil_n_over_max_h2_streams_h2c_connections() {
    let mock = MockServer::start_protocols(
        Behaviour::default(),
        MockProtocols {
            tls: false,
            h2: true,
        },
    )
    .await;
    let gw = gateway(
        &mock,
        ", http2: on, max_h2_streams: 100",
        "  h2c: true\n  h2: { max_concurrent_streams: 500 }\n",
    )
    .await;
    let stats = concurrent_streams(&gw, &mock, 1000, 4).await;
    println!("1000 concurrent streams over h2c: {stats:?}");
    assert!(
        stats.accepted <= 10,
        "{stats:?}: more than ceil(1000 / 100) connections"
    );
    assert_eq!(stats.h2, stats.accepted, "every connection spoke HTTP/2");
    idle(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_providers_get_h2_by_alpn_and_one_that_refuses_it_gets_http11() {
    // A provider offering h2: 200 streams over at most ceil(200 / 64) connections.
    let mock = MockServer::start_protocols(
        Behaviour::default(),
        MockProtocols {
            tls: true,
            h2: true,
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("mock-ca.pem");
    std::fs::write(&ca, mock.ca_pem().unwrap()).unwrap();
    let extra = format!(", max_h2_streams: 64, ca_file: \"{}\"", ca.display());
    let gw = gateway(&mock, &extra, "  h2c: true\n").await;
    let stats = concurrent_streams(&gw, &mock, 200, 2).await;
    assert!(stats.accepted <= 4, "{stats:?}");
    assert_eq!(stats.h2, stats.accepted, "{stats:?}");

    // A provider that answers ALPN with http/1.1 only: the same channel config falls back.
    let old = MockServer::start_protocols(
        Behaviour::default(),
        MockProtocols {
            tls: true,
            h2: false,
        },
    )
    .await;
    let ca = dir.path().join("old-ca.pem");
    std::fs::write(&ca, old.ca_pem().unwrap()).unwrap();
    let extra = format!(", max_h2_streams: 64, ca_file: \"{}\"", ca.display());
    let gw = gateway(&old, &extra, "  h2c: true\n").await;
    let stats = concurrent_streams(&gw, &old, 20, 1).await;
    assert_eq!(stats.h2, 0, "{stats:?}");
    assert!(
        stats.accepted >= 2,
        "HTTP/1.1 needs a connection per stream: {stats:?}"
    );
    assert!(gw.log().contains("chose HTTP/1.1"), "{}", gw.log());
    // `off` never offers h2, even to a provider that speaks it.
    let mock = MockServer::start_protocols(
        Behaviour::default(),
        MockProtocols {
            tls: true,
            h2: true,
        },
    )
    .await;
    let ca = dir.path().join("off-ca.pem");
    std::fs::write(&ca, mock.ca_pem().unwrap()).unwrap();
    let extra = format!(", http2: off, ca_file: \"{}\"", ca.display());
    let gw = gateway(&mock, &extra, "").await;
    let secret = gw.new_key("acme", &[]);
    let r = support::post(
        &gw,
        &secret,
        "/v1/chat/completions",
        &json!({"model": "m1", "messages": []}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.connections().h2, 0);
}

// ---------------------------------------------------------------------------------------
// check-config.

#[test]
fn check_config_refuses_a_mismatched_key_and_an_expired_certificate_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test CA");
    let good = ca.server("good", 30);
    let (cert, _) = good.write(dir.path(), "good");
    let (_, other_key) = ca.server("other", 30).write(dir.path(), "other");
    let (old_cert, old_key) = ca.server("old", -2).write(dir.path(), "old");
    let base = |server: String| {
        let path = dir.path().join(format!("c{}.yaml", server.len()));
        std::fs::write(
            &path,
            format!("server:\n  listen: 127.0.0.1:18080\n  admin_listen: 127.0.0.1:18081\n{server}database:\n  path: \"{}\"\n", dir.path().join("t.db").display()),
        )
        .unwrap();
        let out = Command::new(support::tollgate_bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = base(tls_yaml("tls", &cert, &other_key, ""));
    assert!(!ok, "{out}");
    assert!(
        out.contains("server.tls.key") && out.contains("does not match"),
        "{out}"
    );
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    let (ok, out) = base(tls_yaml("admin_tls", &old_cert, &old_key, ""));
    assert!(!ok, "{out}");
    assert!(
        out.contains("server.admin_tls.cert") && out.contains("expired on"),
        "{out}"
    );
    let (ok, out) = base(tls_yaml(
        "tls",
        &dir.path().join("missing.crt"),
        &other_key,
        "",
    ));
    assert!(
        !ok && out.contains("server.tls.cert") && out.contains("cannot read"),
        "{out}"
    );
    let (_, good_key) = good.write(dir.path(), "good");
    let (ok, out) = base(tls_yaml("tls", &cert, &good_key, ""));
    assert!(ok, "{out}");
}
