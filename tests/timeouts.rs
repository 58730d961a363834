//! The three upstream deadlines, each set per channel and each tested against a loopback
//! upstream that misbehaves in that one way:
//! - `connect_timeout_ms`: a listener whose accept queue is full (the kernel drops the SYN,
//!   so the connect hangs rather than being refused);
//! - `read_timeout_ms` on the response head (first byte): the mock sleeps before answering;
//! - `read_timeout_ms` per body read (idle between chunks): the mock sleeps between stream
//!   chunks. A stream whose every gap is shorter than the deadline is served whole even when
//!   it lasts longer in total.
//!
//! Loopback only; every wait bounded. Bounds on durations are loose (they prove which
//! deadline acted, not how fast the machine is).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{post, Gateway, MockServer};

const PROVIDER_KEY: &str = "sk-provider-SECRET-0123456789abcdef";

/// A loopback listener that never accepts, with its accept queue filled: a connect to it
/// hangs (the kernel drops the SYN) until the connector's own deadline. Returns the
/// listener (kept open), the connections that fill its queue, and its address.
fn blackhole() -> (OwnedFd, Vec<TcpStream>, SocketAddr) {
    // SAFETY: plain socket calls on a fresh descriptor, with a valid sockaddr_in.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        addr.sin_port = 0;
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(libc::listen(fd, 0), 0);
        OwnedFd::from_raw_fd(fd)
    };
    // SAFETY: getsockname on the descriptor above into a local struct.
    let port = unsafe {
        use std::os::fd::AsRawFd;
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::getsockname(
                fd.as_raw_fd(),
                &mut addr as *mut _ as *mut libc::sockaddr,
                &mut len
            ),
            0
        );
        u16::from_be(addr.sin_port)
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Fill the queue until a connect hangs (bounded: a handful at most).
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => return (fd, fillers, addr),
        }
    }
    panic!("the accept queue of a backlog-0 listener never filled");
}

fn channel_yaml(name: &str, url: &str, model: &str, connect_ms: u64, read_ms: u64) -> String {
    format!(
        "  - {{ name: {name}, base_url: \"{url}\", api_key: \"{PROVIDER_KEY}\", models: [{model}], connect_timeout_ms: {connect_ms}, read_timeout_ms: {read_ms} }}\n"
    )
}

async fn gateway(channels: String) -> Gateway {
    tokio::task::spawn_blocking(move || Gateway::start(&channels, ""))
        .await
        .unwrap()
}

fn chat(model: &str, extra: Value) -> Value {
    let mut b = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_ms_bounds_a_connect_that_hangs_and_the_next_channel_serves() {
    let (_listener, _fillers, addr) = blackhole();
    // The hang is real: a plain connect does not finish within a second.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(1000)).is_err());
    let mock = MockServer::start().await;
    let url = format!("http://{addr}");
    let channels = [
        channel_yaml("hole", &url, "m-hole", 300, 60_000),
        // `m-over` is on both: the black hole first (priority), then the mock.
        channel_yaml("hole2", &url, "m-over", 300, 60_000),
        channel_yaml("mock", &mock.base_url(), "m-over", 300, 60_000)
            .replace("models: [m-over]", "models: [m-over], priority: -1"),
    ]
    .concat();
    let gw = gateway(channels).await;
    let key = gw.new_key("acme", &[]);

    let t = Instant::now();
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        &chat("m-hole", json!({})),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout", "{v}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "the 300 ms connect deadline acted: {took:?}"
    );

    let t = Instant::now();
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        &chat("m-over", json!({})),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(r.status(), 200, "the next channel served");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_timeout_ms_bounds_the_wait_for_the_response_head() {
    let mock = MockServer::start().await;
    let channels = [
        channel_yaml("hasty", &mock.base_url(), "m-hasty", 1000, 400),
        channel_yaml("patient", &mock.base_url(), "m-patient", 1000, 5000),
    ]
    .concat();
    let gw = gateway(channels).await;
    let key = gw.new_key("acme", &[]);
    let slow_head = json!({"x_mock": {"delay_ms": 1200}});

    let t = Instant::now();
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        &chat("m-hasty", slow_head.clone()),
    )
    .await;
    let took = t.elapsed();
    assert_eq!(r.status(), 504);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_timeout", "{v}");
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_millis(1150),
        "the 400 ms head deadline acted, before the 1200 ms answer: {took:?}"
    );
    // The same answer within a longer deadline is served.
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        &chat("m-patient", slow_head),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
}

/// Reads a stream to its end (bounded): its text, whether `[DONE]` came, and whether the
/// body ended in an error (a cut connection).
async fn read_stream(r: reqwest::Response) -> (String, bool, bool) {
    let mut s = r.bytes_stream();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut broken = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.next()).await {
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Err(_))) => {
                broken = true;
                break;
            }
            Ok(None) => break,
            Err(_) => panic!("the stream did not end within 15 s: {text}"),
        }
    }
    let done = text.contains("data: [DONE]");
    (text, done, broken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_timeout_ms_applies_to_each_body_read_not_to_the_whole_stream() {
    let mock = MockServer::start().await;
    let channels = channel_yaml("c", &mock.base_url(), "m1", 1000, 600);
    let gw = gateway(channels).await;
    let key = gw.new_key("acme", &[]);

    // Six gaps of 250 ms: 1.5 s in all, each gap well under the 600 ms deadline.
    let t = Instant::now();
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        &chat(
            "m1",
            json!({"stream": true, "x_mock": {"chunks": 6, "delay_ms": 250}}),
        ),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (text, done, broken) = read_stream(r).await;
    assert!(done && !broken, "served whole: {text}");
    assert!(text.contains("tok5"), "{text}");
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );

    // A gap of 1.5 s after the head: the idle deadline cuts the stream, and the client sees
    // it broken (no `[DONE]`, no clean end) rather than a short answer.
    let t = Instant::now();
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        &chat(
            "m1",
            json!({"stream": true, "x_mock": {"chunks": 3, "delay_ms": 1500}}),
        ),
    )
    .await;
    assert_eq!(r.status(), 200, "the head came at once");
    let (text, done, broken) = read_stream(r).await;
    let took = t.elapsed();
    assert!(!done && broken, "cut, and seen as cut: {text:?}");
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(1450),
        "the 600 ms idle deadline acted before the 1500 ms gap ended: {took:?}"
    );
    // The gateway still serves afterwards.
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1", json!({}))).await;
    assert_eq!(r.status(), 200);
}
