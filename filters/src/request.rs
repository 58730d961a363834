//! The request facts every filter needs, read from the JSON body in one parse.
//!
//! The body is parsed once into its top-level fields with their values kept raw
//! ([`serde_json::value::RawValue`], borrowed from the body): `messages` or `input`, often
//! most of the body, is validated but never turned into a tree or copied. Only each field's
//! byte range is kept. When the body must change on its way upstream (a mapped model name,
//! an injected `stream_options`), [`RequestBody::rewrite`] copies the fields back out in
//! their original order.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use bytes::Bytes;
use indexmap::IndexMap;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Map;

pub use crate::media::Media;
use crate::GatewayError;

/// Longest `model` accepted, in bytes. Real model ids are far shorter (OpenAI's and
/// Anthropic's are under 64); the cap keeps a client-chosen string out of the ledger, the
/// access log and error messages at any size.
pub const MAX_MODEL_BYTES: usize = 256;
/// Longest `user` (the end-user id OpenAI's API takes) accepted, in bytes.
pub const MAX_USER_BYTES: usize = 256;
/// Largest `max_tokens`, `max_completion_tokens` or `max_output_tokens` accepted (2^20): above
/// every model's real output limit, and small enough that token sums cannot overflow.
pub const MAX_OUTPUT_TOKENS: u64 = 1_048_576;
/// Largest `n` (choices per request) accepted: OpenAI's own limit.
pub const MAX_CHOICES: u64 = 128;

/// The routes whose answer is generated text (or audio) billed as output tokens. Every other
/// route (`/v1/embeddings`, `/v1/moderations`, `/v1/messages/count_tokens`, ...) is charged
/// its input only: no output cap is counted against tokens/min or reserved.
pub const GENERATING_ROUTES: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
];

/// What [`RequestBody::rewrite`] adds to a body to ask for a stream's usage, at most.
pub const INJECTED_STREAM_OPTIONS: &str = r#","stream_options":{"include_usage":true}"#;

/// Whether a request to `path` produces output tokens.
pub fn generates_output(path: &str) -> bool {
    GENERATING_ROUTES.contains(&path)
}

/// What the gateway knows about a request once its body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFacts {
    /// The model the client asked for.
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage`, as the client sent it.
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens` (Responses API);
    /// never above [`MAX_OUTPUT_TOKENS`].
    pub max_output_tokens: Option<u64>,
    /// `n`: the number of choices, never above [`MAX_CHOICES`]; the worst-case output is
    /// `n × cap`.
    pub choices: u64,
    /// Estimated prompt tokens: text bytes / 4, with inline base64 payloads left out.
    pub prompt_tokens_estimate: u64,
    pub body_bytes: usize,
    /// The route produces output tokens (see [`GENERATING_ROUTES`]). When false, the output
    /// cap counts as 0 for tokens/min and the worst-case reservation.
    pub generates_output: bool,
    /// Images, audio and files in the request; their tokens are part of
    /// `prompt_tokens_estimate`.
    pub media: Media,
    /// What the request asks for that is priced by the unit (images to generate, seconds
    /// of audio to transcribe, characters to speak).
    pub units: Units,
}

/// What a request asks for that is priced by the unit rather than by the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Units {
    /// Images to generate (`n`, at least 1, on the image routes).
    pub images: u64,
    /// Their `quality/size` (`hd/1024x1792`; a missing part is empty: `/1024x1024`), which
    /// picks the per-image price.
    pub image_variant: String,
    /// Seconds of audio to transcribe or translate (from a WAV header, else the file at
    /// 128 kbit/s, rounded up).
    pub audio_seconds: u64,
    /// Characters of text to speak.
    pub characters: u64,
}

/// The image routes.
pub const IMAGE_ROUTES: [&str; 3] = [
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
];
/// The routes that turn audio into text.
pub const TRANSCRIPTION_ROUTES: [&str; 2] = ["/v1/audio/transcriptions", "/v1/audio/translations"];
/// The route that turns text into speech.
pub const SPEECH_ROUTE: &str = "/v1/audio/speech";

impl Default for RequestFacts {
    /// Assumes a generating route: the cautious choice (an output cap is counted).
    fn default() -> Self {
        RequestFacts {
            model: String::new(),
            stream: false,
            include_usage: false,
            max_output_tokens: None,
            choices: 0,
            prompt_tokens_estimate: 0,
            body_bytes: 0,
            generates_output: true,
            media: Media::default(),
            units: Units::default(),
        }
    }
}

impl RequestFacts {
    /// The output cap to count: the request's own, `None` for "use the configured default",
    /// and `Some(0)` on a route that produces no output (embeddings, moderations, ...).
    pub fn output_cap(&self) -> Option<u64> {
        if self.generates_output {
            self.max_output_tokens
        } else {
            Some(0)
        }
    }
}

/// A parsed request body: the original bytes plus its top-level fields.
#[derive(Debug)]
pub struct RequestBody {
    pub raw: Bytes,
    /// Top-level keys (a form's part names), in order, with the byte range of each raw
    /// value in `raw`.
    fields: Vec<(String, Range<usize>)>,
    /// A `multipart/form-data` body, not JSON.
    form: bool,
}

/// The body's top-level fields, in order, values kept raw. A key that appears twice is an
/// error: the gateway would price and allow-list one value while the provider's parser
/// might act on the other.
struct TopLevel<'a>(IndexMap<String, &'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for TopLevel<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Fields<'a> {
            type Value = TopLevel<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut out = IndexMap::with_capacity(map.size_hint().unwrap_or(8));
                // Keys are compared decoded: `"mod\u0065l"` is `model` to every parser.
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(de::Error::custom(format_args!(
                            "the key `{}` appears more than once",
                            crate::error::echo_name(&key)
                        )));
                    }
                    let value: &'a RawValue = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(Fields(PhantomData))
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

impl RequestBody {
    /// Parses the body of a request to `path` (the URI path, e.g. `/v1/embeddings`), which
    /// decides [`RequestFacts::generates_output`]. Not JSON, or not a JSON object, is a 400.
    pub fn parse_for_path(
        path: &str,
        raw: Bytes,
    ) -> Result<(RequestBody, RequestFacts), GatewayError> {
        let (body, mut facts) = Self::parse(raw)?;
        facts.generates_output = generates_output(path);
        if facts.stream && !facts.include_usage && crate::Endpoint::of(path).takes_stream_options()
        {
            // tollgate will ask for the stream's usage: the body sent grows by the field,
            // and the prompt estimate covers what is sent.
            facts.prompt_tokens_estimate = facts
                .prompt_tokens_estimate
                .saturating_add(INJECTED_STREAM_OPTIONS.len().div_ceil(4) as u64);
        }
        let text = |name: &str| {
            body.field(name)
                .and_then(|v| serde_json::from_slice::<String>(v).ok())
                .unwrap_or_default()
        };
        if IMAGE_ROUTES.contains(&path) {
            facts.units.images = facts.choices;
            facts.units.image_variant = format!("{}/{}", text("quality"), text("size"));
        } else if path == SPEECH_ROUTE {
            facts.units.characters = text("input").chars().count() as u64;
        }
        Ok((body, facts))
    }

    /// The raw value of a top-level field (JSON) or a form part.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, r)| &self.raw[r.clone()])
    }

    /// Parses a `multipart/form-data` body (an audio file to transcribe, an image to edit)
    /// of `content_type` sent to `path`. The form must name its `model`; the file's bytes
    /// count neither as prompt tokens nor as anything but its duration.
    pub fn parse_form(
        path: &str,
        content_type: &str,
        raw: Bytes,
    ) -> Result<(RequestBody, RequestFacts), GatewayError> {
        let bad = |why: &str| GatewayError::invalid(format!("The form could not be read: {why}."));
        let boundary = crate::multipart::boundary(content_type)
            .ok_or_else(|| bad("its content type names no boundary"))?;
        let parts = crate::multipart::parse(&raw, boundary).map_err(bad)?;
        let value = |name: &str| {
            parts
                .iter()
                .find(|p| p.name == name && p.filename.is_none())
                .and_then(|p| std::str::from_utf8(&raw[p.value.clone()]).ok())
        };
        let model = value("model").unwrap_or_default().trim().to_owned();
        if model.len() > MAX_MODEL_BYTES {
            return Err(GatewayError::InvalidRequest {
                message: format!("`model` is longer than {MAX_MODEL_BYTES} bytes."),
                param: Some("model"),
            });
        }
        let text_bytes: usize = parts
            .iter()
            .filter(|p| p.filename.is_none())
            .map(|p| p.value.len())
            .sum();
        let mut units = Units::default();
        if TRANSCRIPTION_ROUTES.contains(&path) {
            let file = parts
                .iter()
                .find(|p| p.name == "file")
                .ok_or_else(|| bad("it has no `file`"))?;
            units.audio_seconds = crate::media::audio_file_seconds(&raw[file.value.clone()]);
        }
        if IMAGE_ROUTES.contains(&path) {
            units.images = value("n")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, MAX_CHOICES);
            units.image_variant = format!(
                "{}/{}",
                value("quality").unwrap_or_default().trim(),
                value("size").unwrap_or_default().trim()
            );
        }
        let facts = RequestFacts {
            model,
            stream: value("stream").is_some_and(|s| s.trim() == "true"),
            choices: 1,
            prompt_tokens_estimate: (text_bytes / 4) as u64 + 1,
            body_bytes: raw.len(),
            generates_output: generates_output(path),
            units,
            ..RequestFacts::default()
        };
        let fields = parts.into_iter().map(|p| (p.name, p.value)).collect();
        Ok((
            RequestBody {
                raw,
                fields,
                form: true,
            },
            facts,
        ))
    }

    /// Parses the body as for a generating route (an output cap is counted). Prefer
    /// [`RequestBody::parse_for_path`], which knows embeddings produce no output.
    pub fn parse(raw: Bytes) -> Result<(RequestBody, RequestFacts), GatewayError> {
        let TopLevel(top) = serde_json::from_slice(&raw).map_err(|e| {
            GatewayError::invalid(format!(
                "We could not parse the JSON body of your request: {e}."
            ))
        })?;
        let model = match top.get("model") {
            None => String::new(),
            Some(v) => serde_json::from_str::<String>(v.get()).map_err(|_| {
                GatewayError::InvalidRequest {
                    message: "`model` must be a string.".into(),
                    param: Some("model"),
                }
            })?,
        };
        if model.len() > MAX_MODEL_BYTES {
            return Err(GatewayError::InvalidRequest {
                message: format!("`model` is longer than {MAX_MODEL_BYTES} bytes."),
                param: Some("model"),
            });
        }
        // The shape of the fields every route shares is checked here, before anything is
        // reserved or sent: `user` a string, `messages` an array, `input` a string or an
        // array (`null` stands for absent, as for the other fields).
        let shaped = |name: &'static str, ok: &[u8], what: &str| -> Result<(), GatewayError> {
            match top.get(name).map(|v| v.get().as_bytes()) {
                Some(raw) if raw != b"null" && !ok.contains(&raw[0]) => {
                    Err(GatewayError::InvalidRequest {
                        message: format!("`{name}` must be {what}."),
                        param: Some(name),
                    })
                }
                _ => Ok(()),
            }
        };
        shaped("user", b"\"", "a string")?;
        shaped("messages", b"[", "an array")?;
        shaped("input", b"\"[", "a string or an array")?;
        if let Some(v) = top.get("user") {
            // Escapes only lengthen the raw text, so a short raw value is a short string.
            let long = v.get().len() > MAX_USER_BYTES + 2
                && serde_json::from_str::<String>(v.get()).is_ok_and(|u| u.len() > MAX_USER_BYTES);
            if long {
                return Err(GatewayError::InvalidRequest {
                    message: format!("`user` is longer than {MAX_USER_BYTES} bytes."),
                    param: Some("user"),
                });
            }
        }
        let flag = |name: &'static str| -> Result<bool, GatewayError> {
            match top.get(name) {
                None => Ok(false),
                Some(v) if v.get() == "null" => Ok(false),
                Some(v) => serde_json::from_str::<bool>(v.get()).map_err(|_| {
                    GatewayError::InvalidRequest {
                        message: format!("`{name}` must be a boolean."),
                        param: Some(name),
                    }
                }),
            }
        };
        let count = |name: &'static str| -> Result<Option<u64>, GatewayError> {
            match top.get(name) {
                None => Ok(None),
                Some(v) if v.get() == "null" => Ok(None),
                Some(v) => serde_json::from_str::<u64>(v.get()).map(Some).map_err(|_| {
                    GatewayError::InvalidRequest {
                        message: format!("`{name}` must be a non-negative integer."),
                        param: Some(name),
                    }
                }),
            }
        };
        let stream = flag("stream")?;
        let include_usage = match top.get("stream_options") {
            // serde reads a struct from an array too (`[]`, `[true]`): only an object is one.
            Some(v) if v.get() != "null" && !v.get().starts_with('{') => {
                return Err(GatewayError::InvalidRequest {
                    message: "`stream_options` must be an object.".into(),
                    param: Some("stream_options"),
                });
            }
            Some(v) if v.get() != "null" => {
                serde_json::from_str::<StreamOptions>(v.get())
                    .map_err(|_| GatewayError::InvalidRequest {
                        message: "`stream_options` must be an object.".into(),
                        param: Some("stream_options"),
                    })?
                    .include_usage
            }
            _ => false,
        };
        let capped = |name: &'static str, max: u64| -> Result<Option<u64>, GatewayError> {
            match count(name)? {
                Some(v) if v > max => Err(GatewayError::InvalidRequest {
                    message: format!("`{name}` must be at most {max}."),
                    param: Some(name),
                }),
                v => Ok(v),
            }
        };
        let max_output_tokens = capped("max_completion_tokens", MAX_OUTPUT_TOKENS)?
            .or(capped("max_tokens", MAX_OUTPUT_TOKENS)?)
            .or(capped("max_output_tokens", MAX_OUTPUT_TOKENS)?);
        let choices = capped("n", MAX_CHOICES)?.unwrap_or(1).max(1);
        let media = ["messages", "input"]
            .iter()
            .filter_map(|f| top.get(*f))
            .map(|v| Media::of(v.get().as_bytes()))
            .fold(Media::default(), Media::plus);
        let facts = RequestFacts {
            model,
            stream,
            include_usage,
            max_output_tokens,
            choices,
            prompt_tokens_estimate: estimate_prompt_tokens(&raw).saturating_add(media.tokens()),
            body_bytes: raw.len(),
            generates_output: true,
            media,
            units: Units::default(),
        };
        // Borrowed raw values point into `raw`: their offsets are their ranges.
        let base = raw.as_ptr() as usize;
        let fields = top
            .into_iter()
            .map(|(k, v)| {
                let start = v.get().as_ptr() as usize - base;
                (k, start..start + v.get().len())
            })
            .collect();
        Ok((
            RequestBody {
                raw,
                fields,
                form: false,
            },
            facts,
        ))
    }

    /// The body to send upstream with `model` replaced and, when asked, `stream_options.
    /// include_usage` forced on. Returns the original bytes untouched when nothing changes.
    pub fn rewrite(
        &self,
        upstream_model: Option<&str>,
        force_include_usage: bool,
    ) -> Result<Bytes, GatewayError> {
        if upstream_model.is_none() && !force_include_usage {
            return Ok(self.raw.clone());
        }
        if self.form {
            // A form: the `model` part's value replaced, every other byte as sent.
            let (Some(model), Some((_, range))) = (
                upstream_model,
                self.fields.iter().find(|(k, _)| k == "model"),
            ) else {
                return Ok(self.raw.clone());
            };
            let mut buf = Vec::with_capacity(self.raw.len() + model.len());
            buf.extend_from_slice(&self.raw[..range.start]);
            buf.extend_from_slice(model.as_bytes());
            buf.extend_from_slice(&self.raw[range.end..]);
            return Ok(Bytes::from(buf));
        }
        let mut buf = Vec::with_capacity(self.raw.len() + 48);
        buf.push(b'{');
        let mut first = true;
        let mut put = |buf: &mut Vec<u8>, key: &str, raw_value: &[u8]| {
            if !first {
                buf.push(b',');
            }
            first = false;
            // Keys came from valid JSON; re-escaping them is cheap and exact.
            buf.extend_from_slice(&serde_json::to_vec(key).unwrap_or_default());
            buf.push(b':');
            buf.extend_from_slice(raw_value);
        };
        let mut saw_options = false;
        for (k, range) in &self.fields {
            // Raw values keep every byte of `messages` as sent; only the touched fields change.
            let raw_value = &self.raw[range.clone()];
            match k.as_str() {
                "model" if upstream_model.is_some() => {
                    let m = serde_json::to_string(upstream_model.unwrap_or_default())
                        .map_err(|_| GatewayError::Internal)?;
                    put(&mut buf, k, m.as_bytes());
                }
                "stream_options" if force_include_usage => {
                    saw_options = true;
                    let mut opts: Map<String, serde_json::Value> =
                        serde_json::from_slice(raw_value).unwrap_or_default();
                    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
                    let s = serde_json::to_string(&opts).map_err(|_| GatewayError::Internal)?;
                    put(&mut buf, k, s.as_bytes());
                }
                _ => put(&mut buf, k, raw_value),
            }
        }
        if force_include_usage && !saw_options {
            // INJECTED_STREAM_OPTIONS, as `put` writes it.
            put(&mut buf, "stream_options", br#"{"include_usage":true}"#);
        }
        buf.push(b'}');
        Ok(Bytes::from(buf))
    }
}

/// Bytes of text / 4, the usual rule of thumb for English with OpenAI's tokenizers.
/// Inline base64 payloads (`data:...;base64,...`) are skipped: a 4 MiB image is about a
/// thousand tokens, not a million, and counting it as text would refuse affordable requests.
pub fn estimate_prompt_tokens(body: &[u8]) -> u64 {
    let mut text = body.len();
    let mut rest = body;
    while let Some(at) = memchr::memmem::find(rest, b";base64,") {
        let payload = &rest[at + 8..];
        let end = memchr::memchr(b'"', payload).unwrap_or(payload.len());
        text -= end;
        rest = &payload[end..];
    }
    // An image still costs tokens upstream; a base64 payload is counted as ~1k tokens by
    // the caller's pricing cap, so here it contributes nothing.
    (text / 4) as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<(RequestBody, RequestFacts), GatewayError> {
        RequestBody::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn reads_model_after_a_long_messages_array() {
        let msgs: Vec<String> = (0..200)
            .map(|i| format!(r#"{{"role":"user","content":"m{i}"}}"#))
            .collect();
        let body = format!(
            r#"{{"messages":[{}],"stream":true,"stream_options":{{"include_usage":true}},"max_tokens":50,"n":2,"model":"gpt-4o-mini"}}"#,
            msgs.join(",")
        );
        let (_, f) = parse(&body).unwrap();
        assert_eq!(f.model, "gpt-4o-mini");
        assert!(f.stream && f.include_usage);
        assert_eq!(f.max_output_tokens, Some(50));
        assert_eq!(f.choices, 2);
    }

    #[test]
    fn the_estimate_covers_the_usage_request_tollgate_adds_to_a_stream() {
        let raw = Bytes::from_static(
            br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        let (_, plain) = RequestBody::parse(raw.clone()).unwrap();
        let (body, chat) =
            RequestBody::parse_for_path("/v1/chat/completions", raw.clone()).unwrap();
        let sent = body.rewrite(None, true).unwrap();
        assert_eq!(sent.len() - raw.len(), INJECTED_STREAM_OPTIONS.len());
        assert_eq!(
            chat.prompt_tokens_estimate,
            plain.prompt_tokens_estimate + 10
        );
        assert!(chat.prompt_tokens_estimate >= estimate_prompt_tokens(&sent));
        // Embeddings, or a client that asked for usage itself: nothing is added.
        let (_, emb) = RequestBody::parse_for_path("/v1/embeddings", raw).unwrap();
        assert_eq!(emb.prompt_tokens_estimate, plain.prompt_tokens_estimate);
    }

    #[test]
    fn unit_routes_count_images_characters_and_audio_seconds() {
        let (_, f) = RequestBody::parse_for_path(
            "/v1/images/generations",
            Bytes::from_static(
                br#"{"model":"dall-e-3","prompt":"a cat","n":2,"size":"1024x1024","quality":"hd"}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            (f.units.images, f.units.image_variant.as_str()),
            (2, "hd/1024x1024")
        );
        let (_, f) = RequestBody::parse_for_path(
            "/v1/audio/speech",
            Bytes::from_static(r#"{"model":"tts-1","input":"héllo","voice":"alloy"}"#.as_bytes()),
        )
        .unwrap();
        assert_eq!(f.units.characters, 5);
        // A form: a 2-second WAV (16 kHz mono PCM16: 32,000 bytes a second).
        let mut wav = b"RIFF\0\0\0\0WAVEfmt ".to_vec();
        wav.resize(28, 0);
        wav.extend_from_slice(&32_000u32.to_le_bytes());
        wav.resize(44 + 64_000, 0);
        let mut form = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n".to_vec();
        form.extend_from_slice(&wav);
        form.extend_from_slice(b"\r\n--b--\r\n");
        let (body, f) = RequestBody::parse_form(
            "/v1/audio/transcriptions",
            "multipart/form-data; boundary=b",
            Bytes::from(form.clone()),
        )
        .unwrap();
        assert_eq!(f.model, "whisper-1");
        assert_eq!(f.units.audio_seconds, 2);
        assert!(f.prompt_tokens_estimate < 10, "the file is not prompt text");
        assert_eq!(body.rewrite(None, false).unwrap(), form);
        // A mapped model: only its value changes.
        let moved = body.rewrite(Some("whisper-large"), false).unwrap();
        assert_eq!(moved, [&form[..53], b"whisper-large", &form[62..]].concat());
        let e = RequestBody::parse_form(
            "/v1/audio/transcriptions",
            "multipart/form-data; boundary=b",
            Bytes::from_static(
                b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nw\r\n--b--\r\n",
            ),
        )
        .unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn model_and_user_longer_than_256_bytes_are_400_with_param() {
        let at_cap = "m".repeat(MAX_MODEL_BYTES);
        let (_, f) = parse(&format!(r#"{{"model":"{at_cap}","user":"{at_cap}"}}"#)).unwrap();
        assert_eq!(f.model, at_cap);
        let long = "m".repeat(MAX_MODEL_BYTES + 1);
        let e = parse(&format!(r#"{{"model":"{long}"}}"#)).unwrap_err();
        assert_eq!((e.status(), e.code()), (400, Some("invalid_request_error")));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["param"], "model");
        assert!(!v["error"]["message"].as_str().unwrap().contains(&long));
        let e = parse(&format!(r#"{{"model":"m","user":"{long}"}}"#)).unwrap_err();
        assert_eq!(e.status(), 400);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["param"], "user");
        // A megabyte of model name never reaches the facts (the ledger, the log).
        let huge = "x".repeat(1 << 20);
        assert_eq!(
            parse(&format!(r#"{{"model":"{huge}"}}"#))
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn duplicate_top_level_keys_are_400() {
        for body in [
            r#"{"model":"gpt-4o-mini","messages":[],"model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o-mini","mod\u0065l":"gpt-4o"}"#,
            r#"{"model":"m","max_tokens":1,"max_tokens":100000}"#,
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status(), 400, "{body}");
            assert!(e.to_string().contains("more than once"), "{e}");
        }
        // The same key inside different objects is fine.
        assert!(
            parse(r#"{"model":"m","stream_options":{"model":1},"metadata":{"model":2}}"#).is_ok()
        );
    }

    #[test]
    fn output_caps_and_n_above_their_maximum_are_400_with_param() {
        for (body, param) in [
            (
                r#"{"model":"m","max_tokens":18446744073709551615}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","max_completion_tokens":1048577}"#,
                "max_completion_tokens",
            ),
            (
                r#"{"model":"m","max_output_tokens":1048577}"#,
                "max_output_tokens",
            ),
            (r#"{"model":"m","n":9223372036854775807}"#, "n"),
            (r#"{"model":"m","n":129}"#, "n"),
            // A huge value is refused even where another field would win.
            (
                r#"{"model":"m","max_completion_tokens":5,"max_tokens":1048577}"#,
                "max_tokens",
            ),
        ] {
            let e = parse(body).unwrap_err();
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(
                (e.status(), v["error"]["param"].as_str()),
                (400, Some(param)),
                "{body}"
            );
        }
        let (_, f) = parse(r#"{"model":"m","max_tokens":1048576,"n":128}"#).unwrap();
        assert_eq!(
            (f.max_output_tokens, f.choices),
            (Some(MAX_OUTPUT_TOKENS), MAX_CHOICES)
        );
        let (_, f) = parse(r#"{"model":"m","max_output_tokens":300}"#).unwrap();
        assert_eq!(f.max_output_tokens, Some(300));
    }

    #[test]
    fn only_generating_routes_have_an_output_cap() {
        let body = || Bytes::from_static(br#"{"model":"m","input":"hi","max_tokens":50}"#);
        for path in GENERATING_ROUTES {
            let (_, f) = RequestBody::parse_for_path(path, body()).unwrap();
            assert!(f.generates_output, "{path}");
            assert_eq!(f.output_cap(), Some(50));
        }
        for path in [
            "/v1/embeddings",
            "/v1/moderations",
            "/v1/messages/count_tokens",
        ] {
            let (_, f) = RequestBody::parse_for_path(path, body()).unwrap();
            assert!(!f.generates_output, "{path}");
            assert_eq!(f.output_cap(), Some(0), "{path}");
        }
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let (_, f) = parse(r#"{"model":"m","max_tokens":10,"max_completion_tokens":20}"#).unwrap();
        assert_eq!(f.max_output_tokens, Some(20));
    }

    #[test]
    fn bad_json_and_bad_types_are_400() {
        assert_eq!(parse("{nope").unwrap_err().status(), 400);
        assert_eq!(parse("[1,2]").unwrap_err().status(), 400);
        assert_eq!(parse(r#"{"model":1}"#).unwrap_err().status(), 400);
        assert_eq!(
            parse(r#"{"model":"m","stream":"yes"}"#)
                .unwrap_err()
                .status(),
            400
        );
    }

    #[test]
    fn fields_of_the_wrong_shape_are_400_with_param() {
        for (body, param) in [
            (r#"{"model":"m","user":5}"#, "user"),
            (r#"{"model":"m","user":{"id":"u"}}"#, "user"),
            (r#"{"model":"m","messages":"hi"}"#, "messages"),
            (r#"{"model":"m","messages":{"role":"user"}}"#, "messages"),
            (r#"{"model":"m","input":5}"#, "input"),
            (r#"{"model":"m","input":{"text":"a"}}"#, "input"),
            (r#"{"model":"m","input":true}"#, "input"),
            (
                r#"{"model":"m","stream":true,"stream_options":[]}"#,
                "stream_options",
            ),
            (
                r#"{"model":"m","stream":true,"stream_options":[true]}"#,
                "stream_options",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status(), 400, "{body}");
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(v["error"]["param"], param, "{body}");
        }
        for body in [
            r#"{"model":"m","user":"u","messages":[],"input":"a"}"#,
            r#"{"model":"m","user":null,"messages":null,"input":[[1,2]]}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        ] {
            assert!(parse(body).is_ok(), "{body}");
        }
    }

    #[test]
    fn rewrite_maps_model_and_keeps_everything_else() {
        let src = r#"{"model":"gpt-4","messages":[{"role":"user","content":"hi \"x\""}],"temperature":0.5}"#;
        let (b, _) = parse(src).unwrap();
        let out = b.rewrite(Some("gpt-4o"), false).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["messages"][0]["content"], "hi \"x\"");
        assert_eq!(v["temperature"], 0.5);
        let text = std::str::from_utf8(&out).unwrap();
        let at = |k: &str| text.find(k).unwrap();
        assert!(at("\"model\"") < at("\"messages\"") && at("\"messages\"") < at("\"temperature\""));
    }

    #[test]
    fn rewrite_injects_include_usage_keeping_other_stream_options() {
        let (b, _) = parse(r#"{"model":"m","stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b.rewrite(None, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        let (b, _) = parse(r#"{"model":"m","stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b.rewrite(None, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn unchanged_body_is_forwarded_byte_for_byte() {
        let src = r#"{ "model" : "m" ,"messages":[]}"#;
        let (b, _) = parse(src).unwrap();
        assert_eq!(&b.rewrite(None, false).unwrap()[..], src.as_bytes());
    }

    #[test]
    fn estimate_skips_base64_images() {
        let img = "A".repeat(400_000);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{img}"}}}}]}}]}}"#
        );
        assert!(estimate_prompt_tokens(body.as_bytes()) < 100);
        assert_eq!(estimate_prompt_tokens(&[b'a'; 400]), 101);
    }
}
