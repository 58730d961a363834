//! `cache:` after parsing: the response cache's settings and how a hit is billed.

use serde::Deserialize;

/// `cache:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// The exact-match response cache; absent: no cache filter in the chain.
    #[serde(default)]
    pub responses: Option<ResponseCacheConfig>,
}

/// Where entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Memory,
    /// This node's memory, then Redis (`redis:` must be configured).
    Redis,
}

/// `cache.responses`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseCacheConfig {
    pub backend: Backend,
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: u64,
    /// Models whose answers are cached; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Also cache requests that sample (temperature above 0 or unset, no seed).
    #[serde(default)]
    pub cache_sampled: bool,
    #[serde(default)]
    pub bill: BillPolicy,
}

fn default_ttl_s() -> u64 {
    300
}
fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_max_entry_bytes() -> u64 {
    1024 * 1024
}

/// How a hit is billed: `free`, `full` (the original usage at today's price) or
/// `ratio:R` (the full price × R, 0 ≤ R ≤ 1, up to 6 decimals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BillPolicy {
    /// The share of the full price, in parts per million.
    pub ppm: u64,
}

impl Default for BillPolicy {
    fn default() -> Self {
        BillPolicy { ppm: PPM }
    }
}

const PPM: u64 = 1_000_000;

impl TryFrom<String> for BillPolicy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad =
            || format!("`{s}`: expected free, full or ratio:R with 0 <= R <= 1 (e.g. ratio:0.1)");
        let ppm = match s.as_str() {
            "free" => 0,
            "full" => PPM,
            r => {
                let r = r.strip_prefix("ratio:").ok_or_else(bad)?;
                let (int, frac) = r.split_once('.').unwrap_or((r, ""));
                let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
                if !digits(int) || (!frac.is_empty() && !digits(frac)) || frac.len() > 6 {
                    return Err(bad());
                }
                let int: u64 = int.parse().map_err(|_| bad())?;
                let frac: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
                let ppm = int.saturating_mul(PPM).saturating_add(frac);
                if ppm > PPM {
                    return Err(bad());
                }
                ppm
            }
        };
        Ok(BillPolicy { ppm })
    }
}

impl BillPolicy {
    /// The price of a hit: `full × ppm / 10⁶`, rounded half up (exact integers).
    pub fn apply(self, full_nano: i64) -> i64 {
        let v = (full_nano as i128 * self.ppm as i128 + (PPM / 2) as i128) / PPM as i128;
        v.clamp(0, i64::MAX as i128) as i64
    }
}
