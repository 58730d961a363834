//! `GET /api/pricing`: the public price table, with a group's multiplier applied.
//!
//! The table cannot change while the process runs, so each group's page is rendered once
//! and served from memory; clients and CDNs may cache it for a minute.

use std::collections::HashMap;

use bytes::Bytes;
use tollgate_filters::billing::PriceTable;

use crate::store::money::format_usd;

pub struct PricingPage {
    pages: HashMap<String, Bytes>,
    default_page: Bytes,
}

/// nano-USD (per 1M tokens) × multiplier → a JSON number with the exact decimal digits.
fn usd(nano: i64, ppm: u64) -> serde_json::Value {
    let scaled = (nano as i128 * ppm as i128 + 500_000) / 1_000_000;
    let text = format_usd(scaled as i64);
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

fn render(t: &PriceTable, group: &str) -> Bytes {
    let ppm = t.multiplier_ppm(group);
    let mut names: Vec<&String> = t.models.keys().collect();
    names.sort();
    let data: Vec<_> = names
        .into_iter()
        .map(|m| {
            let r = &t.models[m];
            serde_json::json!({
                "model": m,
                "input": usd(r.input, ppm),
                "output": usd(r.output, ppm),
                "cached_input": usd(r.cached_input, ppm),
                "cache_write": usd(r.cache_write, ppm),
                "audio_input": usd(r.audio_input, ppm),
                "audio_output": usd(r.audio_output, ppm),
                "per_request": usd(r.per_request, ppm),
            })
        })
        .collect();
    let body = serde_json::json!({
        "object": "list",
        "group": group,
        "multiplier": ppm as f64 / 1_000_000.0,
        "unit": "USD per 1M tokens (per_request: USD per request)",
        "data": data,
    });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

impl PricingPage {
    pub fn new(t: &PriceTable) -> Self {
        let pages = t.groups.keys().map(|g| (g.clone(), render(t, g))).collect();
        PricingPage {
            pages,
            default_page: render(t, "default"),
        }
    }

    /// The page for `group` (the default group when absent); `None` for an unknown group.
    pub fn page(&self, group: Option<&str>) -> Option<Bytes> {
        match group {
            None => Some(self.default_page.clone()),
            Some(g) => self.pages.get(g).cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_filters::billing::{ModelRate, UnpricedPolicy};

    #[test]
    fn multiplier_is_applied_exactly() {
        let t = PriceTable {
            models: HashMap::from([("m".to_string(), ModelRate::from_usd(0.15, 0.6, None, 0.0))]),
            groups: HashMap::from([("default".into(), 1_000_000), ("vip".into(), 800_000)]),
            unpriced: UnpricedPolicy::Reject,
            default_max_output: 1,
        };
        let p = PricingPage::new(&t);
        let v: serde_json::Value = serde_json::from_slice(&p.page(Some("vip")).unwrap()).unwrap();
        assert_eq!(v["data"][0]["input"], serde_json::json!(0.12));
        assert_eq!(v["data"][0]["output"], serde_json::json!(0.48));
        assert!(p.page(Some("nope")).is_none());
        let d: serde_json::Value = serde_json::from_slice(&p.page(None).unwrap()).unwrap();
        assert_eq!(d["data"][0]["input"], serde_json::json!(0.15));
    }
}
