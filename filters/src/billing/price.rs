//! Prices: configured USD rates as integer nano-USD, and the cost of a request's usage.
//!
//! Money is an `i64` of nano-USD everywhere. Prices are configured in USD per 1M tokens and
//! converted once, at start-up, to integer nano-USD per 1M tokens; group multipliers to
//! integer parts-per-million. A cost is then one integer expression, rounded once.

use std::collections::{BTreeMap, HashMap};

use crate::request::Units;
use crate::GatewayError;

pub const NANO_PER_USD: i64 = 1_000_000_000;
const PPM: i128 = 1_000_000;
const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;

/// What one model costs, in integer nano-USD.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRate {
    /// nano-USD per 1M prompt tokens.
    pub input: i64,
    /// nano-USD per 1M completion tokens (reasoning tokens are part of these).
    pub output: i64,
    /// nano-USD per 1M cached prompt tokens (cache reads).
    pub cached_input: i64,
    /// nano-USD per 1M prompt tokens written to the provider's cache.
    pub cache_write: i64,
    /// nano-USD per 1M audio input and output tokens (realtime and audio models).
    pub audio_input: i64,
    pub audio_output: i64,
    /// nano-USD per generated image, by `quality/size`, `size`, `quality` or `default`.
    pub per_image: BTreeMap<String, i64>,
    /// nano-USD per second of audio transcribed or translated.
    pub per_audio_second: i64,
    /// nano-USD per 1M characters spoken.
    pub per_1m_characters: i64,
    /// nano-USD per request.
    pub per_request: i64,
    /// Output cap assumed for the worst case when the request sets none.
    pub default_max_output: Option<u64>,
}

/// USD (as configured) → nano-USD. Exact for prices with up to 9 decimals.
pub fn usd_to_nano(usd: f64) -> i64 {
    (usd * NANO_PER_USD as f64).round() as i64
}

impl ModelRate {
    pub fn from_usd(input: f64, output: f64, cached_input: Option<f64>, per_request: f64) -> Self {
        ModelRate {
            input: usd_to_nano(input),
            output: usd_to_nano(output),
            cached_input: usd_to_nano(cached_input.unwrap_or(input)),
            cache_write: usd_to_nano(input),
            audio_input: usd_to_nano(input),
            audio_output: usd_to_nano(output),
            per_image: BTreeMap::new(),
            per_audio_second: 0,
            per_1m_characters: 0,
            per_request: usd_to_nano(per_request),
            default_max_output: None,
        }
    }
}

/// nano-USD × 1M (a per-1M price) × parts per million (a multiplier), divided out once:
/// rounded half up, or up (`ceil`, for a reservation).
fn round(scaled: i128, ceil: bool) -> i64 {
    let denom = TOKENS_PER_PRICE_UNIT * PPM;
    let q = if ceil {
        scaled.saturating_add(denom - 1) / denom
    } else {
        scaled.saturating_add(denom / 2) / denom
    };
    q.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// What to do with a model that has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpricedPolicy {
    Reject,
    Free,
}

/// Token counts as the provider reports them, in OpenAI's sense: `prompt_tokens` is every
/// prompt token, `cached_tokens` (read from the cache) and `cache_write_tokens` (written to
/// it, Anthropic's `cache_creation_input_tokens`) included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cache_write_tokens: u64,
    /// Uncached audio input tokens (part of `prompt_tokens`), priced at `audio_input`.
    pub audio_prompt_tokens: u64,
    /// Audio output tokens (part of `completion_tokens`), priced at `audio_output`.
    pub audio_completion_tokens: u64,
    /// Not reported by the provider: estimated by the gateway.
    pub estimated: bool,
}

/// `pricing:` after validation.
#[derive(Debug, Clone)]
pub struct PriceTable {
    pub models: HashMap<String, ModelRate>,
    /// Group → multiplier in parts per million.
    pub groups: HashMap<String, u64>,
    pub unpriced: UnpricedPolicy,
    /// Output cap assumed when neither the request nor the model sets one.
    pub default_max_output: u64,
}

impl PriceTable {
    pub fn multiplier_ppm(&self, group: &str) -> u64 {
        self.groups.get(group).copied().unwrap_or(PPM as u64)
    }

    /// The price of `model`; a `model_map` alias without a price of its own is priced as the
    /// upstream model it maps to. `None` when unpriced models are free; `Err` when refused.
    pub fn rate(
        &self,
        model: &str,
        upstream: Option<&str>,
    ) -> Result<Option<&ModelRate>, GatewayError> {
        let found = self
            .models
            .get(model)
            .or_else(|| upstream.and_then(|m| self.models.get(m)));
        match (found, self.unpriced) {
            (Some(r), _) => Ok(Some(r)),
            (None, UnpricedPolicy::Free) => Ok(None),
            (None, UnpricedPolicy::Reject) => Err(GatewayError::Unpriced(model.to_owned())),
        }
    }

    /// The exact cost of `units`, rounded half up to the nano-USD.
    pub fn cost_of_units(&self, rate: &ModelRate, group: &str, units: &Units) -> i64 {
        self.unit_cost(rate, group, units, false)
    }

    /// The exact cost of `usage`, rounded half up to the nano-USD.
    pub fn cost(&self, rate: &ModelRate, group: &str, usage: &Usage) -> i64 {
        self.cost_rounded(rate, group, usage, false)
    }

    fn cost_rounded(&self, rate: &ModelRate, group: &str, u: &Usage, ceil: bool) -> i64 {
        // Each prompt token is priced once: cache reads, then cache writes, then uncached
        // audio, and the rest as text; output audio apart from output text.
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let written = u.cache_write_tokens.min(u.prompt_tokens - cached);
        let audio_in = u
            .audio_prompt_tokens
            .min(u.prompt_tokens - cached - written) as i128;
        let audio_out = u.audio_completion_tokens.min(u.completion_tokens) as i128;
        let (cached, written) = (cached as i128, written as i128);
        let uncached = u.prompt_tokens as i128 - cached - written - audio_in;
        let text_out = u.completion_tokens as i128 - audio_out;
        // nano-USD × tokens / 1M: divided out once, at the end, with the multiplier.
        // Saturating throughout: absurd token counts or prices cost the most, never wrap.
        let tokens = (uncached.saturating_mul(rate.input as i128))
            .saturating_add(cached.saturating_mul(rate.cached_input as i128))
            .saturating_add(written.saturating_mul(rate.cache_write as i128))
            .saturating_add(audio_in.saturating_mul(rate.audio_input as i128))
            .saturating_add(text_out.saturating_mul(rate.output as i128))
            .saturating_add(audio_out.saturating_mul(rate.audio_output as i128))
            .saturating_add((rate.per_request as i128).saturating_mul(TOKENS_PER_PRICE_UNIT));
        round(
            tokens.saturating_mul(self.multiplier_ppm(group) as i128),
            ceil,
        )
    }

    /// Whether the model is priced by the unit (images, audio seconds, characters): then
    /// a request that asks for units is charged for them, not for its tokens.
    pub fn prices_units(rate: &ModelRate) -> bool {
        !rate.per_image.is_empty() || rate.per_audio_second > 0 || rate.per_1m_characters > 0
    }

    /// The cost of `units` at `rate`, rounded half up (`ceil`: up, for a reservation).
    /// An image variant with no price of its own takes its size's, its quality's, then
    /// `default`'s, else costs nothing.
    pub fn unit_cost(&self, rate: &ModelRate, group: &str, units: &Units, ceil: bool) -> i64 {
        let image = if units.images == 0 {
            0
        } else {
            let (quality, size) = units
                .image_variant
                .split_once('/')
                .unwrap_or(("", &units.image_variant));
            [units.image_variant.as_str(), size, quality, "default"]
                .iter()
                .filter(|k| !k.is_empty())
                .find_map(|k| rate.per_image.get(*k))
                .copied()
                .unwrap_or(0)
        };
        // nano-USD × 1M (characters are priced per 1M), divided out once with the multiplier.
        let scaled = (units.images as i128)
            .saturating_mul(image as i128)
            .saturating_add(
                (units.audio_seconds as i128).saturating_mul(rate.per_audio_second as i128),
            )
            .saturating_mul(TOKENS_PER_PRICE_UNIT)
            .saturating_add(
                (units.characters as i128).saturating_mul(rate.per_1m_characters as i128),
            )
            .saturating_mul(self.multiplier_ppm(group) as i128);
        round(scaled, ceil)
    }

    /// The most this request can cost: the prompt estimate in full at the input price, plus
    /// `n ×` the output cap. Rounded up.
    pub fn worst_case(
        &self,
        rate: &ModelRate,
        group: &str,
        prompt_estimate: u64,
        max_output: Option<u64>,
        n: u64,
    ) -> i64 {
        let cap = max_output
            .or(rate.default_max_output)
            .unwrap_or(self.default_max_output);
        let u = Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: cap.saturating_mul(n.max(1)),
            estimated: true,
            ..Usage::default()
        };
        self.cost_rounded(rate, group, &u, true)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two priced models and two groups, rejecting unpriced models.
    pub(crate) fn table() -> PriceTable {
        let mut models = HashMap::new();
        models.insert(
            "m".to_string(),
            ModelRate::from_usd(0.15, 0.60, Some(0.075), 0.0),
        );
        models.insert(
            "fee".to_string(),
            ModelRate::from_usd(1.0, 2.0, None, 0.001),
        );
        PriceTable {
            models,
            groups: HashMap::from([("default".into(), 1_000_000), ("vip".into(), 500_000)]),
            unpriced: UnpricedPolicy::Reject,
            default_max_output: 4096,
        }
    }

    #[test]
    fn cost_is_exact_integer_nano_usd() {
        let t = table();
        let m = &t.models["m"];
        assert_eq!(m.input, 150_000_000);
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 100,
            cached_tokens: 400,
            cache_write_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            estimated: false,
        };
        // 600 × 150 + 400 × 75 + 100 × 600 nano-USD = 90_000 + 30_000 + 60_000
        assert_eq!(t.cost(m, "default", &u), 180_000);
        assert_eq!(t.cost(m, "vip", &u), 90_000);
        assert_eq!(t.cost(m, "unknown-group", &u), 180_000);
        let fee = &t.models["fee"];
        let one = Usage {
            prompt_tokens: 1,
            ..Default::default()
        };
        assert_eq!(t.cost(fee, "default", &one), 1_000 + 1_000_000);
    }

    #[test]
    fn cache_reads_and_writes_are_priced_by_their_own_rates() {
        let t = table();
        let rate = ModelRate {
            cache_write: usd_to_nano(3.75),
            ..ModelRate::from_usd(3.0, 15.0, Some(0.30), 0.0)
        };
        let u = Usage {
            prompt_tokens: 1000 + 200 + 300,
            completion_tokens: 50,
            cached_tokens: 200,
            cache_write_tokens: 300,
            ..Usage::default()
        };
        // 1000 × 3000 + 200 × 300 + 300 × 3750 + 50 × 15000 nano-USD
        assert_eq!(
            t.cost(&rate, "default", &u),
            3_000_000 + 60_000 + 1_125_000 + 750_000
        );
        // Counts that overlap more than the prompt never price a token twice.
        let odd = Usage {
            prompt_tokens: 100,
            cached_tokens: 80,
            cache_write_tokens: 80,
            ..Usage::default()
        };
        assert_eq!(t.cost(&rate, "default", &odd), 80 * 300 + 20 * 3750);
    }

    #[test]
    fn images_audio_seconds_and_characters_are_priced_by_the_unit() {
        let t = table();
        let rate = ModelRate {
            per_image: BTreeMap::from([
                ("1024x1024".into(), usd_to_nano(0.04)),
                ("hd/1024x1024".into(), usd_to_nano(0.08)),
                ("default".into(), usd_to_nano(0.12)),
            ]),
            per_audio_second: usd_to_nano(0.0001),
            per_1m_characters: usd_to_nano(15.0),
            ..ModelRate::default()
        };
        assert!(PriceTable::prices_units(&rate));
        assert!(!PriceTable::prices_units(&ModelRate::default()));
        let images = |n, variant: &str| Units {
            images: n,
            image_variant: variant.into(),
            ..Units::default()
        };
        let cost = |u: &Units| t.cost_of_units(&rate, "default", u);
        assert_eq!(cost(&images(2, "hd/1024x1024")), 160_000_000);
        assert_eq!(
            cost(&images(3, "standard/1024x1024")),
            120_000_000,
            "by size"
        );
        assert_eq!(cost(&images(1, "/1792x1024")), 120_000_000, "default");
        let audio = Units {
            audio_seconds: 61,
            ..Units::default()
        };
        assert_eq!(cost(&audio), 6_100_000);
        let speech = Units {
            characters: 1001,
            ..Units::default()
        };
        // 1001 characters × 15,000 nano-USD each.
        assert_eq!(cost(&speech), 15_015_000);
        assert_eq!(t.unit_cost(&rate, "vip", &speech, false), 7_507_500);
        // A fraction of a nano-USD: half up when settled, up when reserved.
        let cheap = ModelRate {
            per_1m_characters: 1_500_000, // 1.5 nano-USD per character
            ..ModelRate::default()
        };
        let one = Units {
            characters: 1,
            ..Units::default()
        };
        assert_eq!(t.unit_cost(&cheap, "default", &one, false), 2);
        assert_eq!(t.unit_cost(&cheap, "vip", &one, false), 1);
        assert_eq!(t.unit_cost(&cheap, "vip", &one, true), 1);
        assert_eq!(
            t.unit_cost(
                &cheap,
                "default",
                &Units {
                    characters: 3,
                    ..Units::default()
                },
                true
            ),
            5
        );
    }

    #[test]
    fn audio_tokens_are_priced_by_their_own_rates() {
        let t = table();
        let rate = ModelRate {
            audio_input: usd_to_nano(32.0),
            audio_output: usd_to_nano(64.0),
            ..ModelRate::from_usd(4.0, 16.0, Some(0.4), 0.0)
        };
        let u = Usage {
            prompt_tokens: 100 + 50 + 10,
            cached_tokens: 10,
            audio_prompt_tokens: 50,
            completion_tokens: 20 + 30,
            audio_completion_tokens: 30,
            ..Usage::default()
        };
        // text in 100 × 4000, cached 10 × 400, audio in 50 × 32000, text out 20 × 16000,
        // audio out 30 × 64000
        assert_eq!(
            t.cost(&rate, "default", &u),
            400_000 + 4_000 + 1_600_000 + 320_000 + 1_920_000
        );
    }

    #[test]
    fn sub_nano_costs_round_half_up_and_worst_case_rounds_up() {
        let mut t = table();
        t.models
            .insert("tiny".into(), ModelRate::from_usd(0.0005, 0.0, None, 0.0)); // 0.5 nano/token
        let r = t.models["tiny"].clone();
        let one = Usage {
            prompt_tokens: 1,
            ..Default::default()
        };
        assert_eq!(t.cost(&r, "default", &one), 1);
        let three = Usage {
            prompt_tokens: 3,
            ..Default::default()
        };
        assert_eq!(t.cost(&r, "default", &three), 2);
        assert_eq!(t.worst_case(&r, "default", 3, Some(0), 1), 2);
    }

    #[test]
    fn worst_case_uses_n_times_the_cap_or_the_default() {
        let t = table();
        let m = &t.models["m"];
        assert_eq!(
            t.worst_case(m, "default", 100, Some(10), 2),
            100 * 150 + 20 * 600
        );
        assert_eq!(t.worst_case(m, "default", 0, None, 1), 4096 * 600);
    }

    #[test]
    fn worst_case_saturates_instead_of_overflowing() {
        let mut t = table();
        // A pricey model with an absurd cap × n: the most money there is, not a wrap.
        t.models
            .insert("pricey".into(), ModelRate::from_usd(1e9, 1e9, None, 1e9));
        t.groups.insert("x10".into(), 10_000_000);
        let r = t.models["pricey"].clone();
        assert_eq!(
            t.worst_case(&r, "x10", u64::MAX, Some(u64::MAX), u64::MAX),
            i64::MAX
        );
        let huge = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            cached_tokens: 0,
            cache_write_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            estimated: false,
        };
        assert_eq!(t.cost(&r, "x10", &huge), i64::MAX);
    }

    #[test]
    fn unpriced_models_are_refused_or_free() {
        let mut t = table();
        assert_eq!(
            t.rate("x", None).unwrap_err().code(),
            Some("model_not_priced")
        );
        assert_eq!(t.rate("alias", Some("m")).unwrap(), Some(&t.models["m"]));
        t.unpriced = UnpricedPolicy::Free;
        assert_eq!(t.rate("x", None).unwrap(), None);
    }
}
