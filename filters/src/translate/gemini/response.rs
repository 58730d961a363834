//! Gemini `GenerateContentResponse` → OpenAI, whole and streamed.

use bytes::BytesMut;
use serde_json::{json, Value};

use crate::translate::{
    now_unix, openai_error, openai_usage, sse_data, sse_done, ChunkWriter, StreamTranslator,
};

/// Gemini `finishReason` -> OpenAI `finish_reason`.
fn finish_reason(reason: &str, has_calls: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if has_calls => "tool_calls",
        _ => "stop",
    }
}

fn usage(meta: &Value) -> Value {
    let n = |k| meta.get(k).and_then(Value::as_u64).unwrap_or(0);
    let completion = n("candidatesTokenCount") + n("thoughtsTokenCount");
    let mut u = openai_usage(
        n("promptTokenCount"),
        completion,
        n("cachedContentTokenCount"),
    );
    if let Some(total) = meta.get("totalTokenCount").and_then(Value::as_u64) {
        u["total_tokens"] = total.into();
    }
    u["completion_tokens_details"] = json!({"reasoning_tokens": n("thoughtsTokenCount")});
    u
}

fn chat_id(body: &Value) -> String {
    match body.get("responseId").and_then(Value::as_str) {
        Some(id) => format!("chatcmpl-{id}"),
        None => "chatcmpl-gemini".to_string(),
    }
}

/// The text (thought parts left out) and the function calls of one candidate's parts;
/// calls are numbered from `first_call`.
fn read_parts(candidate: &Value, first_call: usize) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    let parts = candidate
        .get("content")
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array);
    for p in parts.into_iter().flatten() {
        if let Some(call) = p.get("functionCall") {
            let n = first_call + calls.len();
            calls.push(json!({
                "id": format!("call_{n}"),
                "type": "function",
                "function": {
                    "name": call.get("name").cloned().unwrap_or_default(),
                    "arguments": call.get("args").unwrap_or(&json!({})).to_string(),
                },
            }));
        } else if p.get("thought") != Some(&Value::Bool(true)) {
            if let Some(t) = p.get("text").and_then(Value::as_str) {
                text.push_str(t);
            }
        }
    }
    (text, calls)
}

fn candidate_index(candidate: &Value, position: usize) -> u64 {
    candidate
        .get("index")
        .and_then(Value::as_u64)
        .unwrap_or(position as u64)
}

/// Gemini error body `{"error": {code, message, status}}` -> OpenAI error body.
fn error_to_openai(e: &Value) -> Value {
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("upstream error");
    let status = e
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("api_error");
    openai_error(message, status)
}

/// Gemini GenerateContentResponse -> OpenAI chat.completion. A prompt blocked before any
/// candidate (`promptFeedback.blockReason`) becomes one empty `content_filter` choice.
pub fn response_to_openai(body: &Value, model: &str) -> Value {
    if let Some(e) = body.get("error").filter(|e| !e.is_null()) {
        return error_to_openai(e);
    }
    let mut choices = Vec::new();
    let candidates = body.get("candidates").and_then(Value::as_array);
    for (pos, c) in candidates.into_iter().flatten().enumerate() {
        let (text, calls) = read_parts(c, 0);
        let content = if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        };
        let mut message = json!({"role": "assistant", "content": content});
        let has_calls = !calls.is_empty();
        if has_calls {
            message["tool_calls"] = Value::Array(calls);
        }
        let finish = c
            .get("finishReason")
            .and_then(Value::as_str)
            .map(|r| finish_reason(r, has_calls));
        choices.push(json!({
            "index": candidate_index(c, pos),
            "message": message,
            "logprobs": null,
            "finish_reason": finish,
        }));
    }
    let blocked = body
        .get("promptFeedback")
        .and_then(|f| f.get("blockReason"))
        .is_some_and(|r| !r.is_null());
    if choices.is_empty() && blocked {
        choices.push(json!({
            "index": 0,
            "message": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": "content_filter",
        }));
    }
    let mut out = json!({
        "id": chat_id(body),
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": choices,
    });
    if let Some(meta) = body.get("usageMetadata") {
        out["usage"] = usage(meta);
    }
    out
}

/// Per-candidate stream state.
#[derive(Debug, Default, Clone)]
struct Choice {
    started: bool,
    calls: usize,
    finished: bool,
}

/// Gemini streamGenerateContent?alt=sse events (each `data:` is a GenerateContentResponse) ->
/// OpenAI chunks.
///
/// Each candidate is a choice: its first chunk carries `delta.role`, text parts become
/// `delta.content`, each `functionCall` part a whole tool call (`call_<n>`), its
/// `finishReason` a finish chunk. `usageMetadata` is cumulative; the last one wins. After a
/// finish reason, a clean end writes the usage chunk (with `include_usage`) and `[DONE]`; an
/// unclean one or one without a finish reason writes nothing more. An error body becomes an
/// OpenAI error event and ends the output.
#[derive(Debug)]
pub struct StreamToOpenAi {
    w: ChunkWriter,
    id_set: bool,
    choices: Vec<Choice>,
    usage: Option<Value>,
    seen_finish: bool,
    ended: bool,
}

impl StreamToOpenAi {
    pub fn new(model: &str, include_usage: bool) -> Self {
        StreamToOpenAi {
            w: ChunkWriter {
                id: "chatcmpl-gemini".into(),
                created: now_unix(),
                model: model.into(),
                include_usage,
            },
            id_set: false,
            choices: Vec::new(),
            usage: None,
            seen_finish: false,
            ended: false,
        }
    }

    /// Fixes `created` (tests compare outputs byte for byte).
    #[cfg(test)]
    pub(crate) fn created_at(mut self, created: u64) -> Self {
        self.w.created = created;
        self
    }
}

impl StreamTranslator for StreamToOpenAi {
    fn event(&mut self, _name: Option<&str>, data: &[u8], out: &mut BytesMut) {
        if self.ended {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            sse_data(out, &error_to_openai(e));
            self.ended = true;
            return;
        }
        if !self.id_set {
            self.id_set = true;
            self.w.id = chat_id(&v);
        }
        if let Some(meta) = v.get("usageMetadata").filter(|m| m.is_object()) {
            self.usage = Some(usage(meta));
        }
        let candidates = v.get("candidates").and_then(Value::as_array);
        for (pos, c) in candidates.into_iter().flatten().enumerate() {
            let index = candidate_index(c, pos);
            let slot = index as usize;
            if self.choices.len() <= slot {
                self.choices.resize(slot + 1, Choice::default());
            }
            if self.choices[slot].finished {
                continue;
            }
            if !self.choices[slot].started {
                self.choices[slot].started = true;
                self.w.choice(
                    out,
                    index,
                    json!({"role": "assistant", "content": ""}),
                    None,
                );
            }
            let (text, calls) = read_parts(c, self.choices[slot].calls);
            if !text.is_empty() {
                self.w.choice(out, index, json!({"content": text}), None);
            }
            if !calls.is_empty() {
                let first = self.choices[slot].calls;
                let calls: Vec<Value> = calls
                    .into_iter()
                    .enumerate()
                    .map(|(k, mut call)| {
                        call["index"] = (first + k).into();
                        call
                    })
                    .collect();
                self.choices[slot].calls += calls.len();
                self.w
                    .choice(out, index, json!({"tool_calls": calls}), None);
            }
            if let Some(reason) = c.get("finishReason").and_then(Value::as_str) {
                let has_calls = self.choices[slot].calls > 0;
                self.choices[slot].finished = true;
                self.seen_finish = true;
                self.w.choice(
                    out,
                    index,
                    json!({}),
                    Some(finish_reason(reason, has_calls)),
                );
            }
        }
    }

    fn finish(&mut self, clean: bool, out: &mut BytesMut) {
        if self.ended || !clean || !self.seen_finish {
            return;
        }
        self.ended = true;
        if self.w.include_usage {
            let usage = self.usage.clone().unwrap_or_else(|| openai_usage(0, 0, 0));
            self.w.usage(out, usage);
        }
        sse_done(out);
    }

    fn complete(&self) -> bool {
        self.seen_finish
    }
}
