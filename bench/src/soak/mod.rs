//! The soak: the real `tollgate` binary on a temp SQLite file, the in-process mock upstream,
//! traffic at a fixed rate with upstream, client and process faults, then a reconciliation
//! of the ledger against what the mock served. See the README's "Soak" section.
//!
//! Correlation: tollgate does not send its request id upstream, so every request carries a
//! unique marker in the body's `user` field (`soak-N`), which the mock records with each
//! request and each usage it served. The client learns tollgate's request id from the
//! `x-request-id` response header; a client that left before the head never learns it, and
//! its row is matched by key and token counts instead.

mod gateway;
mod plan;
mod reconcile;
mod report;
mod traffic;

use gateway::{free_port, Gateway};
use plan::*;
pub use plan::{price, Fault, Options};
use traffic::{admin_get, admin_post, build_body, send_one, tail};

use report::sample;
pub use report::{Report, Sample};

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::mock::{Behaviour, MockServer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// A 200 read to its end.
    Complete,
    /// A 200 whose body broke off (as a cut stream must).
    Broken,
    /// Any other status, body read.
    Refused,
    /// No response: connection refused or reset (gateway restarting, killed).
    Transport,
    /// The client left on purpose.
    Left,
}

#[derive(Clone, Debug)]
struct Sent {
    key: usize,
    fault: Fault,
    stream: bool,
    body_len: usize,
    started: Instant,
    finished: Option<Instant>,
    status: Option<u16>,
    rid: Option<String>,
    outcome: Option<Outcome>,
}

struct KeyInfo {
    id: i64,
    secret: String,
    account: usize,
}

/// Tally of what the mock saw, drained from it every second.
#[derive(Default)]
struct MockSeen {
    /// marker → attempts that reached the provider
    reached: HashMap<u64, u32>,
    /// marker → (model, prompt, completion, cached), at most one each
    served: HashMap<u64, (String, u64, u64, u64)>,
    served_twice: Vec<u64>,
}

fn marker_of(user: Option<&str>) -> Option<u64> {
    user?.strip_prefix("soak-")?.parse().ok()
}

impl MockSeen {
    fn drain(&mut self, mock: &MockServer) {
        #[derive(serde::Deserialize)]
        struct UserOnly {
            user: Option<String>,
        }
        for r in mock.take_requests() {
            let user = serde_json::from_slice::<UserOnly>(&r.body)
                .ok()
                .and_then(|u| u.user);
            if let Some(m) = marker_of(user.as_deref()) {
                *self.reached.entry(m).or_default() += 1;
            }
        }
        for s in mock.take_served() {
            if let Some(m) = marker_of(s.user.as_deref()) {
                let v = (
                    s.model,
                    s.prompt_tokens,
                    s.completion_tokens,
                    s.cached_tokens,
                );
                if self.served.insert(m, v).is_some() {
                    self.served_twice.push(m);
                }
            }
        }
    }
}

struct Shared {
    http: reqwest::Client,
    url: String,
    keys: Vec<KeyInfo>,
    sent: Mutex<Vec<Sent>>,
    in_flight: AtomicUsize,
    started: AtomicU64,
}

fn config_yaml(
    port: u16,
    admin_port: u16,
    token: &str,
    db: &Path,
    mock: &str,
    flush: u64,
) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin_port}\"\n  threads: 2\n  admin_token: {token}\n  max_body_bytes: 2097152\n  grace_period_s: 10\n  log_level: warn\n\
database:\n  path: \"{db}\"\n\
channels:\n  - {{ name: a, base_url: \"{mock}\", api_key: sk-soak-upstream-a, models: [m1, emb], priority: 2, connect_timeout_ms: 1000, read_timeout_ms: 10000 }}\n  - {{ name: b, base_url: \"{mock}\", api_key: sk-soak-upstream-b, models: [m1, emb], priority: 1, connect_timeout_ms: 1000, read_timeout_ms: 10000 }}\n\
pricing:\n  models:\n    m1: {{ input: 2.00, output: 8.00, cached_input: 1.00 }}\n    emb: {{ input: 0.02 }}\n  unpriced: reject\n  groups: {{ default: 1.0, vip: 0.5 }}\n\
accounting: {{ flush_interval_ms: {flush} }}\n",
        db = db.display()
    )
}

/// Runs the soak and reconciles; `Report::failures` is empty when everything holds.
pub async fn run(opts: Options) -> Report {
    let mut report = Report::default();
    let dir = match tempfile::Builder::new().prefix("tollgate-soak-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            report.fail(format!("temp dir: {e}"));
            return report;
        }
    };
    let mock = MockServer::start_with(Behaviour::default()).await;
    let port = free_port();
    let admin_port = free_port();
    let token = format!("soak-admin-token-{port}-{admin_port}-0123456789abcdef");
    let db = dir.path().join("tollgate.db");
    let config = dir.path().join("tollgate.yaml");
    let yaml = config_yaml(
        port,
        admin_port,
        &token,
        &db,
        &mock.base_url(),
        opts.flush_interval_ms,
    );
    if let Err(e) = std::fs::write(&config, yaml) {
        report.fail(format!("write config: {e}"));
        return report;
    }
    let mut gw = Gateway {
        bin: opts.tollgate_bin.clone(),
        config,
        log: dir.path().join("gateway.log"),
        admin_port,
        token: token.clone(),
        child: None,
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(256)
        .build()
        .expect("http client");
    if let Err(e) = gw.spawn() {
        report.fail(e);
        return report;
    }
    if let Err(e) = gw.wait_healthy(&http).await {
        report.fail(format!("{e}; log:\n{}", tail(&gw.log)));
        return report;
    }

    // Accounts and keys, through the admin API.
    let mut keys = Vec::new();
    let mut weights = Vec::new();
    let mut initial: Vec<i64> = Vec::new();
    let mut group_of_account: HashMap<i64, &'static str> = HashMap::new();
    for (ai, a) in ACCOUNTS.iter().enumerate() {
        let r = admin_post(
            &http,
            &gw,
            "/admin/accounts",
            json!({"name": a.name, "group": a.group, "balance_usd": a.balance_usd}),
        )
        .await;
        let Some(acc) = r else {
            report.fail(format!("create account {}", a.name));
            return report;
        };
        initial.push(acc["balance_nano"].as_i64().unwrap_or(-1));
        group_of_account.insert(acc["id"].as_i64().unwrap_or(-1), a.group);
        for (name, extra, share) in a.keys {
            let mut body: Value = serde_json::from_str(extra).expect("key fields");
            body["account"] = json!(a.name);
            body["name"] = json!(name);
            let Some(k) = admin_post(&http, &gw, "/admin/keys", body).await else {
                report.fail(format!("create key {name}"));
                return report;
            };
            keys.push(KeyInfo {
                id: k["id"].as_i64().unwrap_or(-1),
                secret: k["key"].as_str().unwrap_or_default().to_string(),
                account: ai,
            });
            weights.push(*share);
        }
    }

    let shared = Arc::new(Shared {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(512)
            .build()
            .expect("http client"),
        url: format!("http://127.0.0.1:{port}"),
        keys,
        sent: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        started: AtomicU64::new(0),
    });

    let mut seen = MockSeen::default();
    let t0 = Instant::now();
    let end = t0 + opts.duration;
    let sigterm_at = t0 + opts.duration.mul_f64(0.4);
    let sigkill_at = t0 + opts.duration.mul_f64(0.7);
    let mut term_done = false;
    let mut kill_done = false;
    let mut killed_at: Option<Instant> = None;
    let mut restarts = Vec::new();
    let mut topups = vec![0i64; ACCOUNTS.len()];
    let mut next_topup = t0 + Duration::from_secs(15);
    let mut next_sample = t0;
    let mut shed = 0u64;
    let mut rng = Rng(opts.seed);
    let total_weight: u32 = weights.iter().sum();
    let period = Duration::from_secs_f64(1.0 / f64::from(opts.rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last_drain = Instant::now();
    let mut marker = 0u64;

    // The traffic loop: bounded by `end` (the interval fires rate × duration times).
    while Instant::now() < end {
        tick.tick().await;
        let now = Instant::now();
        if now.duration_since(last_drain) >= Duration::from_secs(1) {
            seen.drain(&mock);
            last_drain = now;
        }
        if now >= next_sample {
            if let Some(pid) = gw.pid() {
                if let Some(s) = sample(
                    pid,
                    now.duration_since(t0).as_secs_f64(),
                    shared.in_flight.load(Ordering::Relaxed),
                    shared.started.load(Ordering::Relaxed),
                ) {
                    report.samples.push(s);
                }
            }
            next_sample = now + opts.sample_every;
        }
        if now >= next_topup {
            for (ai, a) in ACCOUNTS.iter().enumerate() {
                if a.topup_nano > 0 {
                    let usd = format!("0.{:09}", a.topup_nano);
                    let path = format!("/admin/accounts/{}/topup", a.name);
                    if admin_post(&http, &gw, &path, json!({"usd": usd}))
                        .await
                        .is_some()
                    {
                        topups[ai] += a.topup_nano;
                    }
                }
            }
            next_topup = now + Duration::from_secs(15);
        }
        if !term_done && now >= sigterm_at {
            term_done = true;
            let t = Instant::now();
            let st = gw.signal_and_wait("TERM", Duration::from_secs(40)).await;
            let stopped = t.elapsed();
            let up = gw.spawn().map(|_| ());
            let up = match up {
                Ok(()) => gw.wait_healthy(&http).await,
                Err(e) => Err(e),
            };
            restarts.push(format!(
                "SIGTERM at {:.1} s: exited ({st}) in {:.2} s, restarted: {}",
                t.duration_since(t0).as_secs_f64(),
                stopped.as_secs_f64(),
                up.as_ref().map_or_else(|e| e.clone(), |_| "ok".into())
            ));
            if let Err(e) = up {
                report.fail(format!(
                    "restart after SIGTERM: {e}; log:\n{}",
                    tail(&gw.log)
                ));
                break;
            }
            continue;
        }
        if !kill_done && now >= sigkill_at {
            kill_done = true;
            let t = Instant::now();
            killed_at = Some(t);
            let st = gw.signal_and_wait("KILL", Duration::from_secs(10)).await;
            let up = gw.spawn().map(|_| ());
            let up = match up {
                Ok(()) => gw.wait_healthy(&http).await,
                Err(e) => Err(e),
            };
            restarts.push(format!(
                "SIGKILL at {:.1} s: {st}, restarted: {}",
                t.duration_since(t0).as_secs_f64(),
                up.as_ref().map_or_else(|e| e.clone(), |_| "ok".into())
            ));
            if let Err(e) = up {
                report.fail(format!(
                    "restart after SIGKILL: {e}; log:\n{}",
                    tail(&gw.log)
                ));
                break;
            }
            continue;
        }
        if shared.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            shed += 1;
            continue;
        }
        // One request.
        let mut pick = rng.below(u64::from(total_weight)) as u32;
        let mut key = 0;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                key = i;
                break;
            }
            pick -= w;
        }
        let fault = Fault::pick(rng.below(1000) as u32);
        let embeddings = fault == Fault::None && rng.below(100) < 5;
        let stream = !embeddings && fault.needs_stream().unwrap_or_else(|| rng.below(100) < 70);
        let include_usage =
            ACCOUNTS[shared.keys[key].account].always_include_usage || rng.below(2) == 0;
        let chunks = 1 + rng.below(16) as u32;
        let m = marker;
        marker += 1;
        let (path, body) = build_body(
            m,
            fault,
            stream,
            embeddings,
            include_usage,
            chunks,
            &mut rng,
        );
        let body = serde_json::to_vec(&body).expect("body");
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        shared.started.fetch_add(1, Ordering::Relaxed);
        let idx = {
            let mut sent = shared.sent.lock().unwrap();
            sent.push(Sent {
                key,
                fault,
                stream,
                body_len: body.len(),
                started: Instant::now(),
                finished: None,
                status: None,
                rid: None,
                outcome: None,
            });
            sent.len() - 1
        };
        debug_assert_eq!(idx as u64, m);
        tokio::spawn(send_one(shared.clone(), idx, path, body));
    }
    drop(tick);

    // Let everything in flight finish (each request is bounded by the client's 30 s).
    let quiet = Instant::now() + Duration::from_secs(45);
    while shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left_in_flight = shared.in_flight.load(Ordering::Relaxed);
    if left_in_flight > 0 {
        report.fail(format!(
            "{left_in_flight} requests still in flight 45 s after the end"
        ));
    }
    // Drains after the client left end within 0.5 s; give the writer a few flushes.
    tokio::time::sleep(Duration::from_millis(1500 + 3 * opts.flush_interval_ms)).await;
    seen.drain(&mock);
    if let Some(pid) = gw.pid() {
        if let Some(s) = sample(
            pid,
            t0.elapsed().as_secs_f64(),
            0,
            shared.started.load(Ordering::Relaxed),
        ) {
            report.samples.push(s);
        }
    }

    // At rest: no reservation held, no channel slot taken.
    let mut at_rest = Vec::new();
    for a in ACCOUNTS {
        let v = admin_get(&http, &gw, &format!("/admin/accounts/{}", a.name)).await;
        let (bal, avail) = v
            .as_ref()
            .map(|v| (v["balance_usd"].clone(), v["available_usd"].clone()))
            .unwrap_or_default();
        if v.is_none() || bal != avail {
            report.fail(format!(
                "account {} at rest: balance {bal} but available {avail}",
                a.name
            ));
        }
        at_rest.push(format!("{}={}", a.name, bal.as_str().unwrap_or("?")));
    }
    let ready = admin_get(&http, &gw, "/readyz").await;
    let mut slots = 0;
    if let Some(ch) = ready.as_ref().and_then(|r| r["channels"].as_object()) {
        for (name, c) in ch {
            let n = c["in_use"].as_u64().unwrap_or(u64::MAX);
            slots += n;
            if n != 0 {
                report.fail(format!("channel {name} has {n} slots in use at rest"));
            }
        }
    } else {
        report.fail(format!("/readyz at rest: {ready:?}"));
    }

    let st = gw.signal_and_wait("TERM", Duration::from_secs(40)).await;
    restarts.push(format!("final SIGTERM: {st}"));
    seen.drain(&mock);

    let sent = shared.sent.lock().unwrap().clone();
    reconcile::reconcile(
        &mut report,
        &opts,
        &db,
        &sent,
        &shared.keys,
        &seen,
        &initial,
        &topups,
        &group_of_account,
        killed_at,
    );
    report.line(
        "duration",
        format!(
            "{:.1} s at {} req/s",
            opts.duration.as_secs_f64(),
            opts.rate
        ),
    );
    report.line("process faults", restarts.join("; "));
    report.line("shed (over the in-flight cap)", shed);
    report.line("balances at rest", at_rest.join(" "));
    report.line("channel slots in use at rest", slots);
    for s in &sent {
        *report.faults.entry(format!("{:?}", s.fault)).or_default() += 1;
    }
    if let Some(p) = &opts.svg {
        if let Err(e) = std::fs::write(p, report.svg()) {
            report.fail(format!("write {}: {e}", p.display()));
        }
    }
    if opts.keep_dir || !report.failures.is_empty() {
        report.dir = Some(dir.keep());
    }
    report
}
