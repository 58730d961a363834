//! The usage objects and stream events of each wire format, as far as the scanner reads
//! them.

use std::borrow::Cow;

use serde::Deserialize;

use crate::billing::Usage;
use crate::wire::Wire;

/// A usage object in any of the wire formats. Chat/completions/embeddings name the counts
/// `prompt_tokens`/`completion_tokens`; the Responses API and Anthropic
/// `input_tokens`/`output_tokens` (Anthropic's leaving out the cache reads and writes it
/// counts beside them); Gemini's `usageMetadata` `promptTokenCount`/`candidatesTokenCount`
/// (thinking tokens apart, in `thoughtsTokenCount`). Each count is kept only if present, so
/// a stream's later report updates what it names and keeps the rest (Anthropic's
/// `message_delta` carries the output, its `message_start` the input).
#[derive(Deserialize, Clone, Copy, Default)]
pub(super) struct UsageJson {
    #[serde(default, alias = "input_tokens", alias = "promptTokenCount")]
    pub(super) prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens", alias = "candidatesTokenCount")]
    pub(super) completion_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    pub(super) prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub(super) cache_creation_input_tokens: Option<u64>,
    #[serde(default, alias = "cachedContentTokenCount")]
    pub(super) cache_read_input_tokens: Option<u64>,
    #[serde(default, rename = "thoughtsTokenCount")]
    pub(super) thoughts: Option<u64>,
    /// Transcriptions: `{"type": "duration", "seconds": …}`.
    #[serde(default)]
    pub(super) seconds: Option<f64>,
}

#[derive(Deserialize, Clone, Copy)]
pub(super) struct PromptDetails {
    #[serde(default)]
    pub(super) cached_tokens: Option<u64>,
}

impl UsageJson {
    /// `newer`'s counts over these.
    pub(super) fn merge(self, newer: UsageJson) -> UsageJson {
        UsageJson {
            prompt_tokens: newer.prompt_tokens.or(self.prompt_tokens),
            completion_tokens: newer.completion_tokens.or(self.completion_tokens),
            prompt_tokens_details: newer.prompt_tokens_details.or(self.prompt_tokens_details),
            cache_creation_input_tokens: newer
                .cache_creation_input_tokens
                .or(self.cache_creation_input_tokens),
            cache_read_input_tokens: newer
                .cache_read_input_tokens
                .or(self.cache_read_input_tokens),
            thoughts: newer.thoughts.or(self.thoughts),
            seconds: newer.seconds.or(self.seconds),
        }
    }

    /// The counts in tollgate's (OpenAI's) sense, for a provider speaking `wire`.
    pub(super) fn usage(self, wire: Wire) -> Usage {
        let n = |v: Option<u64>| v.unwrap_or(0);
        let written = n(self.cache_creation_input_tokens);
        let read = n(self.cache_read_input_tokens);
        let (prompt, cached, written) = match wire {
            // Anthropic's input_tokens are the uncached ones only.
            Wire::Anthropic => (
                n(self.prompt_tokens)
                    .saturating_add(written)
                    .saturating_add(read),
                read,
                written,
            ),
            // Gemini's promptTokenCount includes its cached content.
            Wire::Gemini => (n(self.prompt_tokens), read, 0),
            Wire::OpenAi => (
                n(self.prompt_tokens),
                self.prompt_tokens_details
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
                0,
            ),
        };
        Usage {
            prompt_tokens: prompt,
            completion_tokens: n(self.completion_tokens).saturating_add(n(self.thoughts)),
            cached_tokens: cached,
            cache_write_tokens: written,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            estimated: false,
        }
    }
}

#[derive(Deserialize)]
pub(super) struct Chunk<'a> {
    #[serde(default, borrow)]
    pub(super) choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    pub(super) usage: Option<UsageJson>,
    #[serde(default)]
    pub(super) error: Option<serde::de::IgnoredAny>,
    /// Responses API: `response.completed` carries `response.usage`.
    #[serde(default)]
    pub(super) response: Option<ResponseObject>,
    /// Responses API: `response.output_text.delta` carries the text as a string;
    /// Anthropic's `content_block_delta` an object with `text` or `partial_json`.
    #[serde(default)]
    pub(super) delta: Option<TextOrOther>,
    /// Anthropic: the event type (`message_stop` ends a stream).
    #[serde(default, rename = "type", borrow)]
    pub(super) kind: Option<Cow<'a, str>>,
    /// Anthropic: `message_start` carries `message.usage`.
    #[serde(default)]
    pub(super) message: Option<ResponseObject>,
    /// Gemini: every chunk carries the running `usageMetadata`.
    #[serde(default, rename = "usageMetadata")]
    pub(super) usage_metadata: Option<UsageJson>,
    /// Gemini: the generated parts, and `finishReason` on the last chunk.
    #[serde(default)]
    pub(super) candidates: Option<Vec<Candidate>>,
}

#[derive(Deserialize)]
pub(super) struct ResponseObject {
    #[serde(default)]
    pub(super) usage: Option<UsageJson>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum TextOrOther {
    Text(String),
    Block {
        #[serde(default)]
        text: Option<String>,
        #[serde(default)]
        partial_json: Option<String>,
    },
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
pub(super) struct Candidate {
    #[serde(default)]
    pub(super) content: Option<CandidateContent>,
    #[serde(default, rename = "finishReason")]
    pub(super) finish_reason: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
pub(super) struct CandidateContent {
    #[serde(default)]
    pub(super) parts: Vec<Part>,
}

#[derive(Deserialize)]
pub(super) struct Part {
    #[serde(default)]
    pub(super) text: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Choice<'a> {
    #[serde(default, borrow)]
    pub(super) delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    pub(super) text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(super) struct Delta<'a> {
    #[serde(default, borrow)]
    pub(super) content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) reasoning_content: Option<Cow<'a, str>>,
}
