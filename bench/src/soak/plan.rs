//! What a soak sends: its options, the faults, the accounts and keys, and the prices.

use super::*;

/// What a run does; see `tollgate-soak --help`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The gateway binary to run.
    pub tollgate_bin: PathBuf,
    pub duration: Duration,
    /// Requests started per second.
    pub rate: u32,
    pub seed: u64,
    /// `accounting.flush_interval_ms` of the gateway under test.
    pub flush_interval_ms: u64,
    /// A row lost to SIGKILL must belong to a request that finished at most this long
    /// before the kill (the open flush window, plus scheduling slack on a loaded machine),
    /// or was in flight at the kill.
    pub kill_window: Duration,
    /// Resident memory and open descriptors are sampled this often.
    pub sample_every: Duration,
    /// Keep the temp directory (config, SQLite file, gateway log).
    pub keep_dir: bool,
    /// Write the memory/descriptor samples as an SVG plot here.
    pub svg: Option<PathBuf>,
}

impl Options {
    pub fn new(tollgate_bin: PathBuf, duration: Duration) -> Options {
        Options {
            tollgate_bin,
            duration,
            rate: 150,
            seed: 1,
            flush_interval_ms: 100,
            kill_window: Duration::from_millis(2000),
            sample_every: Duration::from_secs(10),
            keep_dir: false,
            svg: None,
        }
    }
}

/// Injected faults, one per request (or none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    None,
    /// The provider aborts the connection mid-stream (`truncate_after`).
    ResetMidStream,
    /// The provider drops the connection before answering (`reset`).
    ResetBeforeHead,
    Status5xx,
    Status429,
    /// A 1.2 s wait for the first byte (`delay_ms`, non-streaming).
    SlowFirstByte,
    /// The stream ends cleanly without `data: [DONE]` (`omit_done`).
    TruncatedSse,
    /// An in-band error event, then the end (`error_after`).
    InBandError,
    /// One unparseable event mid-stream (`malformed_after`).
    MalformedChunk,
    /// One 2 MiB `data:` line (`big_line_bytes`).
    BigLine,
    /// Usage on every chunk (`usage: cumulative`).
    CumulativeUsage,
    /// `200 OK` with an error body (`error_body_200`).
    ErrorBody200,
    /// The client leaves after two content chunks of a slow stream.
    ClientGoneMidStream,
    /// The client leaves 150 ms into a 600 ms wait for the response head.
    ClientGoneBeforeHead,
}

impl Fault {
    /// Share of requests in thousandths; the rest get no fault.
    const MIX: [(Fault, u32); 13] = [
        (Fault::ResetMidStream, 30),
        (Fault::ResetBeforeHead, 10),
        (Fault::Status5xx, 25),
        (Fault::Status429, 25),
        (Fault::SlowFirstByte, 30),
        (Fault::TruncatedSse, 25),
        (Fault::InBandError, 20),
        (Fault::MalformedChunk, 30),
        (Fault::BigLine, 5),
        (Fault::CumulativeUsage, 50),
        (Fault::ErrorBody200, 20),
        (Fault::ClientGoneMidStream, 30),
        (Fault::ClientGoneBeforeHead, 20),
    ];

    pub(super) fn pick(r: u32) -> Fault {
        let mut acc = 0;
        for (f, share) in Self::MIX {
            acc += share;
            if r % 1000 < acc {
                return f;
            }
        }
        Fault::None
    }

    /// `Some(true)`: streaming only; `Some(false)`: non-streaming only.
    pub(super) fn needs_stream(self) -> Option<bool> {
        match self {
            Fault::ResetMidStream
            | Fault::TruncatedSse
            | Fault::InBandError
            | Fault::MalformedChunk
            | Fault::BigLine
            | Fault::CumulativeUsage
            | Fault::ClientGoneMidStream => Some(true),
            Fault::SlowFirstByte | Fault::ClientGoneBeforeHead => Some(false),
            _ => None,
        }
    }

    /// 5xx and 429 are retried on the next channel, so they may reach the provider twice.
    pub(super) fn may_repeat(self) -> bool {
        matches!(self, Fault::Status5xx | Fault::Status429)
    }

    /// The provider dropped the connection after reading the whole body. The relay never
    /// sends such a request again (it may be doing the work); one that reached the provider
    /// twice is counted and fails the run.
    pub(super) fn resent_after_reset(self) -> bool {
        self == Fault::ResetBeforeHead
    }
}

/// splitmix64: deterministic per seed, no dependency.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub(super) const MAX_TOKENS: u64 = 64;
pub(super) const BIG_LINE: u32 = 2 * 1024 * 1024;
/// Requests in flight beyond this are not started (counted as shed), so a stalled gateway
/// cannot make the run grow without bound.
pub(super) const MAX_IN_FLIGHT: usize = 2000;

pub(super) struct Account {
    pub(super) name: &'static str,
    pub(super) group: &'static str,
    pub(super) balance_usd: &'static str,
    /// (name, extra key fields, share of traffic in thousandths)
    pub(super) keys: &'static [(&'static str, &'static str, u32)],
    /// Topped up by this much every 15 s (nano-USD), through the admin API.
    pub(super) topup_nano: i64,
    /// The client always sets `stream_options.include_usage`, so the provider's prompt
    /// count equals the gateway's estimate and the reservation always covers the charge.
    pub(super) always_include_usage: bool,
}

pub(super) const ACCOUNTS: &[Account] = &[
    Account {
        name: "big",
        group: "default",
        balance_usd: "1000",
        keys: &[
            ("big-0", "{}", 120),
            ("big-1", "{}", 120),
            ("big-2", "{}", 100),
            ("big-rpm", r#"{"rpm": 300}"#, 80),
            ("big-conc", r#"{"concurrency": 3}"#, 80),
        ],
        topup_nano: 0,
        always_include_usage: false,
    },
    Account {
        name: "vip",
        group: "vip",
        balance_usd: "1000",
        keys: &[("vip-0", "{}", 120), ("vip-1", "{}", 100)],
        topup_nano: 0,
        always_include_usage: false,
    },
    Account {
        name: "tight",
        group: "default",
        balance_usd: "0.02",
        keys: &[("tight-0", "{}", 60), ("tight-1", r#"{"rpm": 120}"#, 40)],
        topup_nano: 5_000_000,
        always_include_usage: true,
    },
    Account {
        name: "budget",
        group: "default",
        balance_usd: "1000",
        keys: &[
            ("budget-0", r#"{"budget_usd": "0.03"}"#, 80),
            ("budget-tpm", r#"{"tpm": 20000}"#, 100),
        ],
        topup_nano: 0,
        always_include_usage: true,
    },
];

/// nano-USD per 1M tokens, as the config below says in USD.
pub(super) fn rate(model: &str) -> (i128, i128, i128) {
    match model {
        "m1" => (2_000_000_000, 1_000_000_000, 8_000_000_000),
        "emb" => (20_000_000, 20_000_000, 0),
        _ => (0, 0, 0),
    }
}

/// The README's formula, rounded half up.
pub fn price(model: &str, group: &str, prompt: u64, completion: u64, cached: u64) -> i64 {
    let (input, cached_input, output) = rate(model);
    let cached = cached.min(prompt) as i128;
    let tokens =
        (prompt as i128 - cached) * input + cached * cached_input + completion as i128 * output;
    let ppm: i128 = if group == "vip" { 500_000 } else { 1_000_000 };
    let denom = 1_000_000i128 * 1_000_000;
    ((tokens * ppm + denom / 2) / denom) as i64
}
