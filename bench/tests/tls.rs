//! The mock's TLS mode: the same behaviours as plain HTTP, behind a
//! self-signed certificate a client trusts through `ca_pem()`. A raw HTTP/1.1
//! client over tokio-rustls keeps the wire visible, as in tests/mock.rs.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tollgate_bench::mock::{Behaviour, MockServer};

const T: Duration = Duration::from_secs(10);

fn client_config(ca_pem: &str, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("PEM certificate")).unwrap();
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

async fn connect_as(
    server: &MockServer,
    name: &str,
    alpn: &[&[u8]],
) -> io::Result<TlsStream<TcpStream>> {
    let cfg = client_config(&server.ca_pem().expect("TLS mock has a CA"), alpn);
    let tcp = timeout(T, TcpStream::connect(server.addr())).await??;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    timeout(T, TlsConnector::from(cfg).connect(name, tcp)).await?
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn line(r: &mut BufReader<TlsStream<TcpStream>>) -> io::Result<String> {
    let mut l = String::new();
    if r.read_line(&mut l).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(l.trim_end_matches(['\r', '\n']).to_owned())
}

/// One request, then the response read by content-length or chunked framing.
async fn exchange(stream: TlsStream<TcpStream>, path: &str, body: &Value) -> io::Result<Resp> {
    let body = serde_json::to_vec(body).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let mut r = BufReader::new(stream);
    r.get_mut().write_all(&req).await?;
    r.get_mut().flush().await?;

    let status_line = line(&mut r).await?;
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let l = line(&mut r).await?;
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(len) = resp.header("content-length") {
        resp.body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut resp.body).await?;
    } else {
        assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
        loop {
            let size = usize::from_str_radix(&line(&mut r).await?, 16).unwrap();
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..size]);
        }
    }
    Ok(resp)
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn json_chat_completion_over_tls() {
    let server = MockServer::start_tls(Behaviour::default()).await;
    let port = server.addr().port();
    assert_eq!(server.base_url(), format!("https://localhost:{port}"));

    let stream = connect_as(&server, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let body = json!({"model": "m", "messages": []});
    let resp = timeout(T, exchange(stream, CHAT, &body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status, 200);
    let v = resp.json();
    assert_eq!(v["object"], "chat.completion");
    let usage = &v["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    assert_eq!(usage["completion_tokens"], 3);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + 3);

    // Recording works the same as over plain HTTP.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, CHAT);
    assert_eq!(reqs[0].json().unwrap()["model"], "m");
    let served = server.served();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].prompt_tokens, prompt);
    assert!(!served[0].stream);
}

#[tokio::test]
async fn sse_stream_over_tls() {
    let server = MockServer::start_tls(Behaviour::default()).await;
    let stream = connect_as(&server, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    let body = json!({
        "model": "m",
        "messages": [],
        "stream": true,
        "stream_options": {"include_usage": true},
        "x_mock": {"chunks": 2},
    });
    let resp = timeout(T, exchange(stream, CHAT, &body))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let text = String::from_utf8(resp.body).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let usage: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert_eq!(server.chunks_sent(), 2);
    assert!(server.served()[0].stream);
}

#[tokio::test]
async fn reset_over_tls_gives_no_response() {
    let server = MockServer::start_tls(Behaviour::default()).await;
    let stream = connect_as(&server, "localhost", &[b"http/1.1"])
        .await
        .unwrap();
    let body = json!({"model": "m", "messages": [], "x_mock": {"reset": true}});
    let got = timeout(T, exchange(stream, CHAT, &body)).await.unwrap();
    assert!(got.is_err(), "expected no response");
}

#[tokio::test]
async fn certificate_covers_the_ip_address_too() {
    let server = MockServer::start_tls(Behaviour::default()).await;
    connect_as(&server, "127.0.0.1", &[b"http/1.1"])
        .await
        .unwrap();
}

#[tokio::test]
async fn h2_only_client_is_refused() {
    let server = MockServer::start_tls(Behaviour::default()).await;
    assert!(connect_as(&server, "localhost", &[b"h2"]).await.is_err());
}

#[tokio::test]
async fn untrusted_or_wrong_name_is_refused() {
    let server = MockServer::start_tls(Behaviour::default()).await;
    assert!(connect_as(&server, "example.com", &[b"http/1.1"])
        .await
        .is_err());
    // A fresh certificate per server: another mock's CA does not vouch for it.
    let other = MockServer::start_tls(Behaviour::default()).await;
    let cfg = client_config(&other.ca_pem().unwrap(), &[b"http/1.1"]);
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let hs = timeout(T, TlsConnector::from(cfg).connect(name, tcp)).await;
    assert!(hs.unwrap().is_err());
}

#[tokio::test]
async fn plain_server_has_no_ca() {
    let server = MockServer::start().await;
    assert!(server.ca_pem().is_none());
    assert!(server.base_url().starts_with("http://127.0.0.1:"));
}
