//! Streams, both directions: Anthropic SSE events ⇄ OpenAI `chat.completion.chunk` events.

use bytes::BytesMut;
use serde_json::{json, Value};

use super::response::{anthropic_error, cached_tokens, finish_reason, stop_reason};
use crate::translate::{
    now_unix, openai_error, openai_usage, sse_done, sse_named, ChunkWriter, StreamTranslator,
};

/// Streaming: Anthropic SSE events in, OpenAI chat.completion.chunk SSE out.
///
/// The first chunk carries `delta.role`; text deltas become `delta.content`; each `tool_use`
/// block becomes a tool call numbered from 0 in block order, its `input_json_delta` fragments
/// its `arguments`; `message_delta`'s stop reason a finish chunk. At `message_stop` the usage
/// chunk (with `include_usage`) and `data: [DONE]` are written, once; a stream cut off before
/// `message_stop` gets neither. An `error` event becomes an OpenAI error event and ends the
/// output. `thinking` blocks, `ping` and unknown events are dropped.
#[derive(Debug)]
pub struct StreamToOpenAi {
    w: ChunkWriter,
    started: bool,
    /// (Anthropic block index, OpenAI tool call index) of each tool_use block.
    tool_blocks: Vec<(u64, u64)>,
    input: u64,
    cache_creation: u64,
    cache_read: u64,
    output: u64,
    finished: bool,
    stopped: bool,
    ended: bool,
}

impl StreamToOpenAi {
    pub fn new(model: &str, include_usage: bool) -> Self {
        StreamToOpenAi {
            w: ChunkWriter {
                id: "chatcmpl-anthropic".into(),
                created: now_unix(),
                model: model.into(),
                include_usage,
            },
            started: false,
            tool_blocks: Vec::new(),
            input: 0,
            cache_creation: 0,
            cache_read: 0,
            output: 0,
            finished: false,
            stopped: false,
            ended: false,
        }
    }

    /// Fixes `created` (tests compare outputs byte for byte).
    #[cfg(test)]
    pub(crate) fn created_at(mut self, created: u64) -> Self {
        self.w.created = created;
        self
    }

    fn start(&mut self, out: &mut BytesMut) {
        if !self.started {
            self.started = true;
            self.w
                .choice(out, 0, json!({"role": "assistant", "content": ""}), None);
        }
    }

    fn take_usage(&mut self, usage: &Value) {
        let fields = [
            ("input_tokens", &mut self.input),
            ("cache_creation_input_tokens", &mut self.cache_creation),
            ("cache_read_input_tokens", &mut self.cache_read),
            ("output_tokens", &mut self.output),
        ];
        for (key, slot) in fields {
            if let Some(n) = usage.get(key).and_then(Value::as_u64) {
                *slot = n;
            }
        }
    }

    fn close(&mut self, out: &mut BytesMut) {
        if self.ended {
            return;
        }
        self.start(out);
        if !self.finished {
            self.finished = true;
            self.w.choice(out, 0, json!({}), Some("stop"));
        }
        if self.w.include_usage {
            let prompt = self.input + self.cache_creation + self.cache_read;
            self.w
                .usage(out, openai_usage(prompt, self.output, self.cache_read));
        }
        sse_done(out);
        self.ended = true;
    }
}

impl StreamTranslator for StreamToOpenAi {
    fn event(&mut self, name: Option<&str>, data: &[u8], out: &mut BytesMut) {
        if self.ended {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        let kind = v.get("type").and_then(Value::as_str).or(name).unwrap_or("");
        let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
        match kind {
            "message_start" => {
                let m = v.get("message").unwrap_or(&Value::Null);
                if let Some(id) = m.get("id").and_then(Value::as_str) {
                    self.w.id = id.to_string();
                }
                self.take_usage(m.get("usage").unwrap_or(&Value::Null));
                self.start(out);
            }
            "content_block_start" => {
                self.start(out);
                let block = v.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = block.get("text").and_then(Value::as_str).unwrap_or("");
                        if !text.is_empty() {
                            self.w.choice(out, 0, json!({"content": text}), None);
                        }
                    }
                    Some("tool_use") => {
                        let i = self.tool_blocks.len() as u64;
                        self.tool_blocks.push((index, i));
                        let call = json!({
                            "index": i,
                            "id": block.get("id").cloned().unwrap_or_default(),
                            "type": "function",
                            "function": {
                                "name": block.get("name").cloned().unwrap_or_default(),
                                "arguments": "",
                            },
                        });
                        self.w.choice(out, 0, json!({"tool_calls": [call]}), None);
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = v.get("delta").unwrap_or(&Value::Null);
                let text = |key| delta.get(key).and_then(Value::as_str).unwrap_or("");
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") if !text("text").is_empty() => {
                        self.start(out);
                        self.w
                            .choice(out, 0, json!({"content": text("text")}), None);
                    }
                    Some("input_json_delta") if !text("partial_json").is_empty() => {
                        let tool = self.tool_blocks.iter().find(|(b, _)| *b == index);
                        if let Some(&(_, i)) = tool {
                            let call = json!({"index": i, "function": {"arguments": text("partial_json")}});
                            self.w.choice(out, 0, json!({"tool_calls": [call]}), None);
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                self.take_usage(v.get("usage").unwrap_or(&Value::Null));
                let reason = v.get("delta").and_then(|d| d.get("stop_reason"));
                if let Some(reason) = reason.and_then(Value::as_str) {
                    if !self.finished {
                        self.start(out);
                        self.finished = true;
                        self.w
                            .choice(out, 0, json!({}), Some(finish_reason(reason)));
                    }
                }
            }
            "message_stop" => {
                self.stopped = true;
                self.close(out);
            }
            "error" => {
                let e = v.get("error").unwrap_or(&Value::Null);
                let message = e
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream error");
                let kind = e.get("type").and_then(Value::as_str).unwrap_or("api_error");
                crate::translate::sse_data(out, &openai_error(message, kind));
                self.ended = true;
            }
            _ => {}
        }
    }

    fn finish(&mut self, clean: bool, out: &mut BytesMut) {
        if clean && self.stopped {
            self.close(out);
        }
    }

    fn complete(&self) -> bool {
        self.stopped
    }
}

/// The content block open in the Anthropic output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// A tool_use block for the OpenAI tool call with this index.
    Tool(u64),
}

/// Streaming: OpenAI chunk SSE events in, Anthropic SSE events out.
///
/// `message_start` comes with the first chunk (id `msg_` + the chunk's id); text deltas go to
/// a text block, each new tool call index opens a `tool_use` block (the previous block is
/// stopped first), argument fragments become `input_json_delta`s. The finish reason and the
/// usage chunk are remembered; at `data: [DONE]` the open block is stopped and
/// `message_delta` (stop reason, usage) and `message_stop` are written. A stream cut off
/// before `[DONE]` gets none of these. An OpenAI error event becomes an `error` event and
/// ends the output.
#[derive(Debug)]
pub struct StreamFromOpenAi {
    model: String,
    started: bool,
    open: Option<Open>,
    next_block: u64,
    /// OpenAI tool call indices already given a block.
    tools_seen: Vec<u64>,
    stop: Option<&'static str>,
    prompt: u64,
    completion: u64,
    cached: u64,
    done: bool,
    ended: bool,
}

impl StreamFromOpenAi {
    pub fn new(model: &str) -> Self {
        StreamFromOpenAi {
            model: model.into(),
            started: false,
            open: None,
            next_block: 0,
            tools_seen: Vec::new(),
            stop: None,
            prompt: 0,
            completion: 0,
            cached: 0,
            done: false,
            ended: false,
        }
    }

    fn start(&mut self, id: &str, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": format!("msg_{id}"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": self.prompt.saturating_sub(self.cached), "output_tokens": 0},
        });
        sse_named(
            out,
            "message_start",
            &json!({"type": "message_start", "message": message}),
        );
    }

    fn stop_block(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            let index = self.next_block - 1;
            sse_named(
                out,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            );
        }
    }

    fn open_block(&mut self, open: Open, block: Value, out: &mut BytesMut) {
        self.stop_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some(open);
        sse_named(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
    }

    fn delta(&self, delta: Value, out: &mut BytesMut) {
        let index = self.next_block - 1;
        sse_named(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn tool_call(&mut self, call: &Value, out: &mut BytesMut) {
        let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        if self.open != Some(Open::Tool(index)) {
            if self.tools_seen.contains(&index) {
                // A fragment for a call whose block is already stopped: Anthropic cannot
                // reopen a block (OpenAI does not interleave calls).
                return;
            }
            self.tools_seen.push(index);
            let f = call.get("function").unwrap_or(&Value::Null);
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("toolu_{index}"));
            let block = json!({
                "type": "tool_use",
                "id": id,
                "name": f.get("name").and_then(Value::as_str).unwrap_or(""),
                "input": {},
            });
            self.open_block(Open::Tool(index), block, out);
        }
        let args = call
            .get("function")
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if !args.is_empty() {
            self.delta(
                json!({"type": "input_json_delta", "partial_json": args}),
                out,
            );
        }
    }

    fn close(&mut self, out: &mut BytesMut) {
        self.start("", out);
        self.stop_block(out);
        let delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": {
                "output_tokens": self.completion,
                "input_tokens": self.prompt.saturating_sub(self.cached),
                "cache_read_input_tokens": self.cached,
            },
        });
        sse_named(out, "message_delta", &delta);
        sse_named(out, "message_stop", &json!({"type": "message_stop"}));
        self.ended = true;
    }
}

impl StreamTranslator for StreamFromOpenAi {
    fn event(&mut self, _name: Option<&str>, data: &[u8], out: &mut BytesMut) {
        if self.ended {
            return;
        }
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            self.close(out);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            return;
        };
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error");
            sse_named(out, "error", &anthropic_error(message, "api_error"));
            self.ended = true;
            return;
        }
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            let n = |k| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
            self.prompt = n("prompt_tokens");
            self.completion = n("completion_tokens");
            self.cached = cached_tokens(usage);
        }
        self.start(v.get("id").and_then(Value::as_str).unwrap_or(""), out);
        let choice = v.get("choices").and_then(Value::as_array).and_then(|c| {
            c.iter()
                .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        });
        let Some(choice) = choice else { return };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        let text = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .or_else(|| {
                delta
                    .get("refusal")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
            });
        if let Some(text) = text {
            if self.open != Some(Open::Text) {
                self.open_block(Open::Text, json!({"type": "text", "text": ""}), out);
            }
            self.delta(json!({"type": "text_delta", "text": text}), out);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.tool_call(call, out);
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop = Some(stop_reason(f));
        }
    }

    fn finish(&mut self, _clean: bool, _out: &mut BytesMut) {
        // Closing happens at `[DONE]`; a stream that ended without it is not complete, clean
        // or not, so nothing is written that would pretend it was.
    }

    fn complete(&self) -> bool {
        self.done
    }
}
