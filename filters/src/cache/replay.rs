//! The response cache's forms: the request key, a recorded answer cut into what is stored,
//! and a stored answer rendered in the form the client asked for (JSON or SSE).

use std::io::Write;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::billing::Usage;
use crate::Endpoint;

/// A cache key: SHA-256 of the account, the path and the canonical request.
pub type Key = [u8; 32];

/// Top-level request fields that cannot change the answer, left out of the key.
const NOT_IN_KEY: [&str; 6] = [
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
];

/// The key of a request: the account (so no account sees another's answers), the path, and
/// the body with object keys sorted at every depth and [`NOT_IN_KEY`] left out. The model is
/// part of the body.
pub fn key(account_id: i64, path: &str, body: &Map<String, Value>) -> Key {
    let mut h = HashWriter(Sha256::new());
    h.0.update(b"tollgate-response-cache-v1\0");
    h.0.update(account_id.to_be_bytes());
    h.0.update(path.as_bytes());
    h.0.update(b"\0");
    let mut fields: Vec<(&String, &Value)> = body
        .iter()
        .filter(|(k, _)| !NOT_IN_KEY.contains(&k.as_str()))
        .collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    h.0.update(b"{");
    for (i, (k, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            h.0.update(b",");
        }
        canonical(&mut h, &Value::String(k.clone()));
        h.0.update(b":");
        canonical(&mut h, v);
    }
    h.0.update(b"}");
    h.0.finalize().into()
}

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// JSON with object keys sorted at every depth, whatever order the map keeps.
fn canonical(h: &mut HashWriter, v: &Value) {
    match v {
        Value::Object(m) => {
            let mut kv: Vec<_> = m.iter().collect();
            kv.sort_by(|a, b| a.0.cmp(b.0));
            h.0.update(b"{");
            for (i, (k, v)) in kv.into_iter().enumerate() {
                if i > 0 {
                    h.0.update(b",");
                }
                let _ = serde_json::to_writer(&mut *h, k);
                h.0.update(b":");
                canonical(h, v);
            }
            h.0.update(b"}");
        }
        Value::Array(a) => {
            h.0.update(b"[");
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    h.0.update(b",");
                }
                canonical(h, v);
            }
            h.0.update(b"]");
        }
        scalar => {
            let _ = serde_json::to_writer(&mut *h, scalar);
        }
    }
}

/// Whether a request samples: `temperature` above 0 or absent (providers then use 1), and
/// no `seed`. Only generating endpoints sample.
pub fn samples(endpoint: Endpoint, body: &Map<String, Value>) -> bool {
    if !matches!(endpoint, Endpoint::Chat | Endpoint::Completions) {
        return false;
    }
    if body.get("seed").is_some_and(|s| !s.is_null()) {
        return false;
    }
    match body.get("temperature") {
        None | Some(Value::Null) => true,
        Some(t) => t.as_f64().is_none_or(|t| t > 0.0),
    }
}

/// A stored answer's body.
#[derive(Debug, Clone)]
pub enum Stored {
    /// A JSON answer, byte for byte.
    Json(Bytes),
    /// A streamed answer: the `data:` payload of each event, without `[DONE]` and without
    /// the usage-only event (its usage is kept beside), plus that usage object.
    Sse {
        events: Vec<Bytes>,
        usage: Option<Value>,
    },
}

impl Stored {
    pub fn bytes(&self) -> usize {
        match self {
            Stored::Json(b) => b.len(),
            Stored::Sse { events, usage } => {
                events.iter().map(|e| e.len() + 16).sum::<usize>()
                    + usage.as_ref().map_or(0, |_| 256)
            }
        }
    }
}

/// Cuts a complete SSE body into its events. `None` unless it ended with `data: [DONE]`.
pub fn parse_sse(body: &[u8]) -> Option<Stored> {
    let text = std::str::from_utf8(body).ok()?.replace("\r\n", "\n");
    let mut events = Vec::new();
    let mut usage = None;
    let mut done = false;
    for event in text.split("\n\n") {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            continue;
        }
        if done {
            return None;
        }
        let data = data.join("\n");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).ok()?;
        if v.get("error").is_some() {
            return None;
        }
        let usage_only = v
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && v.get("usage").is_some_and(Value::is_object);
        if usage_only {
            usage = v.get("usage").cloned();
        } else {
            events.push(Bytes::from(data));
        }
    }
    done.then_some(Stored::Sse { events, usage })
}

/// The usage object to show for a stream whose usage event the client never saw (tollgate
/// asked for it and stripped it): the counts the provider reported.
pub fn usage_object(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

pub const JSON: &str = "application/json";
pub const SSE: &str = "text/event-stream";

/// What the client asked for.
#[derive(Debug, Clone, Copy)]
pub struct Form {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub include_usage: bool,
}

/// A stored answer in the form the client asked for: its content type and body. `None`
/// when the stored answer holds something the conversion does not carry across (tool calls,
/// logprobs, refusals, audio): then the request goes to the provider.
pub fn render(stored: &Stored, usage: &Usage, form: Form) -> Option<(&'static str, Vec<Bytes>)> {
    let chat = form.endpoint == Endpoint::Chat;
    match stored {
        Stored::Json(body) if !form.stream || form.endpoint == Endpoint::Embeddings => {
            Some((JSON, vec![body.clone()]))
        }
        Stored::Json(body) => {
            let v: Value = serde_json::from_slice(body).ok()?;
            Some((SSE, json_to_sse(&v, chat, form.include_usage)?))
        }
        Stored::Sse { events, usage: u } if form.stream => {
            let mut out: Vec<Bytes> = events.iter().map(|e| event(e)).collect();
            if form.include_usage {
                let first: Value = serde_json::from_slice(events.first()?).ok()?;
                let u = u.clone().unwrap_or_else(|| usage_object(usage));
                let mut c = envelope(&first, &first["object"]);
                c.insert("choices".into(), json!([]));
                c.insert("usage".into(), u);
                out.push(event(&serde_json::to_vec(&c).ok()?));
            }
            out.push(Bytes::from_static(b"data: [DONE]\n\n"));
            Some((SSE, out))
        }
        Stored::Sse { events, usage: u } => {
            let u = u.clone().unwrap_or_else(|| usage_object(usage));
            let body = sse_to_json(events, chat, u)?;
            Some((JSON, vec![Bytes::from(serde_json::to_vec(&body).ok()?)]))
        }
    }
}

fn event(payload: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(payload.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\n\n");
    Bytes::from(b)
}

/// `id`, `object`, `created`, `model` and `system_fingerprint` of an answer or chunk.
fn envelope(v: &Value, object: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    for f in ["id", "object", "created", "model", "system_fingerprint"] {
        if let Some(x) = v.get(f).filter(|x| !x.is_null()) {
            m.insert(f.into(), x.clone());
        }
    }
    m.insert("object".into(), object.clone());
    m
}

/// Fields beyond plain text that the conversion cannot carry.
fn carries_more(v: &Value, fields: &[&str]) -> bool {
    fields
        .iter()
        .any(|f| v.get(*f).is_some_and(|x| !x.is_null()))
}

const MESSAGE_EXTRAS: [&str; 4] = ["tool_calls", "function_call", "refusal", "audio"];

fn json_to_sse(v: &Value, chat: bool, include_usage: bool) -> Option<Vec<Bytes>> {
    let object = json!(if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    });
    let base = envelope(v, &object);
    let chunk = |choice: Value| -> Option<Bytes> {
        let mut c = base.clone();
        c.insert("choices".into(), json!([choice]));
        if include_usage {
            c.insert("usage".into(), Value::Null);
        }
        Some(event(&serde_json::to_vec(&c).ok()?))
    };
    let mut out = Vec::new();
    for (i, choice) in v.get("choices")?.as_array()?.iter().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        if carries_more(choice, &["logprobs"]) {
            return None;
        }
        let finish = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        if chat {
            let msg = choice.get("message")?;
            if carries_more(msg, &MESSAGE_EXTRAS) {
                return None;
            }
            let role = msg.get("role").cloned().unwrap_or(json!("assistant"));
            let content = msg.get("content").and_then(Value::as_str).unwrap_or("");
            let delta = |d: Value, f: Value| json!({"index": index, "delta": d, "logprobs": null, "finish_reason": f});
            out.push(chunk(delta(
                json!({"role": role, "content": ""}),
                Value::Null,
            ))?);
            out.push(chunk(delta(json!({ "content": content }), Value::Null))?);
            out.push(chunk(delta(json!({}), finish))?);
        } else {
            let text = choice.get("text").and_then(Value::as_str).unwrap_or("");
            let piece = |t: &str, f: Value| json!({"text": t, "index": index, "logprobs": null, "finish_reason": f});
            out.push(chunk(piece(text, Value::Null))?);
            out.push(chunk(piece("", finish))?);
        }
    }
    if include_usage {
        let mut c = base.clone();
        c.insert("choices".into(), json!([]));
        c.insert(
            "usage".into(),
            v.get("usage").cloned().unwrap_or(Value::Null),
        );
        out.push(event(&serde_json::to_vec(&c).ok()?));
    }
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Some(out)
}

/// One choice being assembled from deltas.
#[derive(Default)]
struct Assembled {
    role: Option<Value>,
    text: String,
    finish: Value,
}

fn sse_to_json(events: &[Bytes], chat: bool, usage: Value) -> Option<Value> {
    let mut first: Option<Value> = None;
    let mut choices: std::collections::BTreeMap<u64, Assembled> = Default::default();
    for e in events {
        let v: Value = serde_json::from_slice(e).ok()?;
        for c in v.get("choices")?.as_array()? {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            if carries_more(c, &["logprobs"]) {
                return None;
            }
            let a = choices.entry(index).or_default();
            if let Some(f) = c.get("finish_reason").filter(|f| !f.is_null()) {
                a.finish = f.clone();
            }
            if chat {
                let d = c.get("delta")?;
                if carries_more(d, &MESSAGE_EXTRAS) {
                    return None;
                }
                if let Some(r) = d.get("role").filter(|r| !r.is_null()) {
                    a.role = Some(r.clone());
                }
                a.text
                    .push_str(d.get("content").and_then(Value::as_str).unwrap_or(""));
            } else {
                a.text
                    .push_str(c.get("text").and_then(Value::as_str).unwrap_or(""));
            }
        }
        first.get_or_insert(v);
    }
    let first = first?;
    let object = json!(if chat {
        "chat.completion"
    } else {
        "text_completion"
    });
    let mut out = envelope(&first, &object);
    let list: Vec<Value> = choices
        .into_iter()
        .map(|(index, a)| {
            if chat {
                let role = a.role.unwrap_or(json!("assistant"));
                json!({"index": index, "message": {"role": role, "content": a.text}, "logprobs": null, "finish_reason": a.finish})
            } else {
                json!({"text": a.text, "index": index, "logprobs": null, "finish_reason": a.finish})
            }
        })
        .collect();
    out.insert("choices".into(), Value::Array(list));
    out.insert("usage".into(), usage);
    Some(Value::Object(out))
}

/// The shared tier's format version: the first byte of every encoded entry. A node that
/// reads another version treats the entry as a miss.
pub const FORMAT_VERSION: u8 = 1;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An entry for the shared tier: [`FORMAT_VERSION`], then one JSON object with when it was
/// stored (`at_ms`, Unix ms), its `ttl_ms`, the `usage` the provider reported, and either
/// the JSON answer's text (`json`) or the stream's event payloads (`events`, with the
/// stream's usage object as `sse_usage`).
pub fn encode(stored: &Stored, usage: &Usage, ttl: std::time::Duration) -> Bytes {
    let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    let mut v = json!({
        "at_ms": unix_ms(),
        "ttl_ms": ttl.as_millis() as u64,
        "usage": [usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens, usage.audio_prompt_tokens, usage.audio_completion_tokens],
    });
    match stored {
        Stored::Json(b) => v["json"] = Value::String(text(b)),
        Stored::Sse { events, usage } => {
            v["events"] = Value::Array(events.iter().map(|e| Value::String(text(e))).collect());
            v["sse_usage"] = usage.clone().unwrap_or(Value::Null);
        }
    }
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(v.to_string().as_bytes());
    Bytes::from(out)
}

/// Reads an [`encode`]d entry: the answer, its usage, its age and its TTL. `None` for
/// another version or anything malformed.
pub fn decode(raw: &[u8]) -> Option<(Stored, Usage, std::time::Duration, std::time::Duration)> {
    let (&version, rest) = raw.split_first()?;
    if version != FORMAT_VERSION {
        return None;
    }
    let v: Value = serde_json::from_slice(rest).ok()?;
    let n = |i: usize| v["usage"].get(i).and_then(Value::as_u64);
    let usage = Usage {
        prompt_tokens: n(0)?,
        completion_tokens: n(1)?,
        cached_tokens: n(2)?,
        // Entries written before cache writes were counted have three numbers.
        cache_write_tokens: n(3).unwrap_or(0),
        audio_prompt_tokens: n(4).unwrap_or(0),
        audio_completion_tokens: n(5).unwrap_or(0),
        estimated: false,
    };
    let stored = if let Some(j) = v["json"].as_str() {
        Stored::Json(Bytes::from(j.to_string()))
    } else {
        let events = v["events"]
            .as_array()?
            .iter()
            .map(|e| e.as_str().map(|s| Bytes::from(s.to_string())))
            .collect::<Option<Vec<_>>>()?;
        let usage = Some(v["sse_usage"].clone()).filter(|u| !u.is_null());
        Stored::Sse { events, usage }
    };
    let at = v["at_ms"].as_u64()?;
    let age = std::time::Duration::from_millis(unix_ms().saturating_sub(at));
    let ttl = std::time::Duration::from_millis(v["ttl_ms"].as_u64()?);
    Some((stored, usage, age, ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn the_key_ignores_key_order_and_fields_that_cannot_change_the_answer() {
        let a = obj(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0,"stream":true,"user":"u1"}"#,
        );
        let b = obj(
            r#"{"temperature":0,"messages":[{"content":"hi","role":"user"}],"model":"m","metadata":{"x":1}}"#,
        );
        let p = "/v1/chat/completions";
        assert_eq!(key(1, p, &a), key(1, p, &b));
        assert_ne!(key(1, p, &a), key(2, p, &a), "accounts never share");
        assert_ne!(key(1, p, &a), key(1, "/v1/completions", &a));
        let c =
            obj(r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"temperature":0}"#);
        assert_ne!(key(1, p, &a), key(1, p, &c));
        let d =
            obj(r#"{"model":"m2","messages":[{"role":"user","content":"hi"}],"temperature":0}"#);
        assert_ne!(key(1, p, &a), key(1, p, &d));
    }

    #[test]
    fn sampling_is_a_positive_or_missing_temperature_without_a_seed() {
        let chat = Endpoint::Chat;
        assert!(samples(chat, &obj(r#"{"model":"m"}"#)));
        assert!(samples(chat, &obj(r#"{"temperature":0.7}"#)));
        assert!(!samples(chat, &obj(r#"{"temperature":0}"#)));
        assert!(!samples(chat, &obj(r#"{"temperature":1,"seed":4}"#)));
        assert!(!samples(Endpoint::Embeddings, &obj(r#"{"input":"x"}"#)));
    }

    const STREAM: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":7,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n\
data: [DONE]\n\n";

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 9,
            completion_tokens: 2,
            ..Usage::default()
        }
    }

    fn text(parts: &[Bytes]) -> String {
        parts
            .iter()
            .map(|b| std::str::from_utf8(b).unwrap())
            .collect()
    }

    #[test]
    fn a_stream_without_done_is_not_stored_and_a_complete_one_replays_as_itself() {
        let cut = STREAM.replace("data: [DONE]\n\n", "");
        assert!(parse_sse(cut.as_bytes()).is_none());
        let stored = parse_sse(STREAM.as_bytes()).unwrap();
        let form = Form {
            endpoint: Endpoint::Chat,
            stream: true,
            include_usage: true,
        };
        let (ct, body) = render(&stored, &usage(), form).unwrap();
        assert_eq!(ct, SSE);
        let out = text(&body);
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert!(out.contains("\"Hel\"") && out.contains("\"prompt_tokens\":9"));
        let no_usage = Form {
            include_usage: false,
            ..form
        };
        let out = text(&render(&stored, &usage(), no_usage).unwrap().1);
        assert!(!out.contains("prompt_tokens"), "{out}");
    }

    #[test]
    fn a_stored_stream_serves_a_json_request() {
        let stored = parse_sse(STREAM.as_bytes()).unwrap();
        let form = Form {
            endpoint: Endpoint::Chat,
            stream: false,
            include_usage: false,
        };
        let (ct, body) = render(&stored, &usage(), form).unwrap();
        assert_eq!(ct, JSON);
        let v: Value = serde_json::from_slice(&body[0]).unwrap();
        assert_eq!(v["id"], "c1");
        assert_eq!(v["created"], 7);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["completion_tokens"], 2);
    }

    #[test]
    fn a_stored_json_answer_serves_a_stream_and_back() {
        let body = r#"{"id":"c2","object":"chat.completion","created":8,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop","logprobs":null}],"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}"#;
        let stored = Stored::Json(Bytes::from(body));
        let form = Form {
            endpoint: Endpoint::Chat,
            stream: true,
            include_usage: true,
        };
        let (ct, parts) = render(&stored, &usage(), form).unwrap();
        assert_eq!(ct, SSE);
        let sse = text(&parts);
        let again = parse_sse(sse.as_bytes()).unwrap();
        let json_form = Form {
            stream: false,
            ..form
        };
        let v: Value =
            serde_json::from_slice(&render(&again, &usage(), json_form).unwrap().1[0]).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "Hi there");
        assert_eq!(v["usage"]["prompt_tokens"], 4, "the original usage");
        assert_eq!(v["id"], "c2");
        // Tool calls are not carried across forms.
        let tools = body.replace(
            r#""content":"Hi there""#,
            r#""content":null,"tool_calls":[{"id":"t"}]"#,
        );
        assert!(render(&Stored::Json(Bytes::from(tools)), &usage(), form).is_none());
    }

    #[test]
    fn completions_convert_both_ways() {
        let body = r#"{"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"text":"abc","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":3}}"#;
        let form = Form {
            endpoint: Endpoint::Completions,
            stream: true,
            include_usage: false,
        };
        let sse = text(
            &render(&Stored::Json(Bytes::from(body)), &usage(), form)
                .unwrap()
                .1,
        );
        let stored = parse_sse(sse.as_bytes()).unwrap();
        let json_form = Form {
            stream: false,
            ..form
        };
        let v: Value =
            serde_json::from_slice(&render(&stored, &usage(), json_form).unwrap().1[0]).unwrap();
        assert_eq!(v["choices"][0]["text"], "abc");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 2, "from the settled usage");
    }

    #[test]
    fn shared_entries_round_trip_and_other_versions_are_misses() {
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            cached_tokens: 2,
            cache_write_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            estimated: false,
        };
        let ttl = std::time::Duration::from_secs(60);
        for stored in [
            Stored::Json(Bytes::from_static(b"{\"id\":\"x\",\"choices\":[]}")),
            Stored::Sse {
                events: vec![
                    Bytes::from_static(b"{\"a\":1}"),
                    Bytes::from("{\"b\":\"\u{e9}\"}"),
                ],
                usage: Some(json!({"prompt_tokens": 7})),
            },
        ] {
            let raw = encode(&stored, &usage, ttl);
            assert_eq!(raw[0], FORMAT_VERSION);
            let (back, u, age, t) = decode(&raw).unwrap();
            assert_eq!(format!("{back:?}"), format!("{stored:?}"));
            assert_eq!((u, t), (usage, ttl));
            assert!(age < std::time::Duration::from_secs(5));
            let mut other = raw.to_vec();
            other[0] = FORMAT_VERSION + 1;
            assert!(decode(&other).is_none());
        }
        assert!(decode(b"").is_none());
        assert!(decode(b"\x01not json").is_none());
    }
}
