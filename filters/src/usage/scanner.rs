//! [`UsageScanner`]: usage and generated text read from one response body as it passes,
//! SSE event by event or from the tail of a JSON body.

use bytes::{Bytes, BytesMut};

use super::shapes::{Chunk, TextOrOther, UsageJson};
use crate::ctx::UsageReport;
use crate::wire::Wire;

const JSON_TAIL: usize = 64 * 1024;
/// A single SSE event larger than this is passed through unparsed.
const MAX_EVENT: usize = 1024 * 1024;

#[derive(Clone)]
enum Mode {
    Sse {
        strip_usage_event: bool,
        pending: BytesMut,
    },
    Json {
        /// The last chunks, held by reference (no copy) until they exceed `JSON_TAIL`.
        tail: std::collections::VecDeque<Bytes>,
        tail_len: usize,
    },
}

/// Watches one response body for usage and generated text.
#[derive(Clone)]
pub struct UsageScanner {
    mode: Mode,
    /// The provider's wire format.
    wire: Wire,
    /// The usage counts reported so far, merged.
    seen: Option<UsageJson>,
    /// Usage, generated text bytes and mid-stream errors seen so far.
    pub report: UsageReport,
    /// The stream's end marker went past: `data: [DONE]`, Anthropic's `message_stop`, or a
    /// Gemini candidate's `finishReason`.
    pub saw_done: bool,
}

impl UsageScanner {
    pub fn sse(strip_usage_event: bool) -> Self {
        UsageScanner {
            mode: Mode::Sse {
                strip_usage_event,
                pending: BytesMut::new(),
            },
            wire: Wire::OpenAi,
            seen: None,
            report: UsageReport::default(),
            saw_done: false,
        }
    }

    /// Whether the body is an event stream (else JSON).
    pub fn is_sse(&self) -> bool {
        matches!(self.mode, Mode::Sse { .. })
    }

    /// For a provider speaking `wire` (OpenAI's by default).
    pub fn with_wire(mut self, wire: Wire) -> Self {
        self.wire = wire;
        self
    }

    pub fn json() -> Self {
        UsageScanner {
            mode: Mode::Json {
                tail: std::collections::VecDeque::new(),
                tail_len: 0,
            },
            wire: Wire::OpenAi,
            seen: None,
            report: UsageReport::default(),
            saw_done: false,
        }
    }

    /// Takes one network chunk; returns what to send to the client now (maybe empty).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.mode {
            Mode::Json { tail, tail_len } => {
                // Without usage, the whole body is the best measure of what was generated.
                self.report.text_bytes += chunk.len() as u64;
                *tail_len += chunk.len();
                tail.push_back(chunk.clone());
                while tail.len() > 1 && *tail_len - tail[0].len() >= JSON_TAIL {
                    *tail_len -= tail.pop_front().map_or(0, |b| b.len());
                }
                chunk
            }
            Mode::Sse {
                strip_usage_event,
                pending,
            } => {
                let strip = *strip_usage_event;
                if pending.is_empty() {
                    // The common case: the chunk starts on an event boundary. Its complete
                    // events are scanned where they lie; only a trailing partial event is
                    // copied, and an unchanged chunk goes on as it came.
                    let mut from = 0;
                    let mut dropped: Vec<std::ops::Range<usize>> = Vec::new();
                    while let Some(end) = event_end(&chunk[from..]) {
                        let event = &chunk[from..from + end];
                        if !self_scan(
                            event,
                            &mut self.report,
                            &mut self.saw_done,
                            &mut self.seen,
                            self.wire,
                            strip,
                        ) {
                            dropped.push(from..from + end);
                        }
                        from += end;
                    }
                    if chunk.len() - from > MAX_EVENT {
                        // Not SSE as we know it: stop buffering, pass everything on.
                        from = chunk.len();
                    } else {
                        pending.extend_from_slice(&chunk[from..]);
                    }
                    if !strip {
                        return chunk;
                    }
                    if dropped.is_empty() {
                        return chunk.slice(..from);
                    }
                    let mut out = BytesMut::with_capacity(from);
                    let mut at = 0;
                    for r in dropped {
                        out.extend_from_slice(&chunk[at..r.start]);
                        at = r.end;
                    }
                    out.extend_from_slice(&chunk[at..from]);
                    return out.freeze();
                }
                pending.extend_from_slice(&chunk);
                let mut out = if strip {
                    BytesMut::with_capacity(chunk.len())
                } else {
                    BytesMut::new()
                };
                while let Some(end) = event_end(pending) {
                    let event = pending.split_to(end);
                    let keep = self_scan(
                        &event,
                        &mut self.report,
                        &mut self.saw_done,
                        &mut self.seen,
                        self.wire,
                        strip,
                    );
                    if strip && keep {
                        out.extend_from_slice(&event);
                    }
                }
                if pending.len() > MAX_EVENT {
                    // Not SSE as we know it: stop buffering, pass everything on.
                    let rest = pending.split();
                    if strip {
                        out.extend_from_slice(&rest);
                    }
                }
                if strip {
                    out.freeze()
                } else {
                    chunk
                }
            }
        }
    }

    /// The body ended: returns any bytes still held back, and settles JSON usage.
    pub fn finish(&mut self) -> Bytes {
        match &mut self.mode {
            Mode::Json { tail, .. } => {
                let found = match tail.len() {
                    0 => None,
                    // The common case, one chunk: parsed where it lies.
                    1 => last_usage_object(&tail[0], self.wire),
                    _ => last_usage_object(
                        &tail.iter().fold(BytesMut::new(), |mut all, b| {
                            all.extend_from_slice(b);
                            all
                        }),
                        self.wire,
                    ),
                };
                if let Some(u) = found {
                    self.report.usage = Some(u.usage(self.wire));
                    // Whole seconds, rounded up, as providers bill them.
                    self.report.audio_seconds = u
                        .seconds
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| s.ceil() as u64);
                }
                Bytes::new()
            }
            Mode::Sse {
                strip_usage_event,
                pending,
            } => {
                let rest = pending.split().freeze();
                if !rest.is_empty() {
                    // A final event without its blank line.
                    let strip = *strip_usage_event;
                    let keep = self_scan(
                        &rest,
                        &mut self.report,
                        &mut self.saw_done,
                        &mut self.seen,
                        self.wire,
                        strip,
                    );
                    if strip && keep {
                        return rest;
                    }
                }
                Bytes::new()
            }
        }
    }
}

/// The end (exclusive) of the first complete event in `buf`, including its blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let at = from + i;
        let next = &buf[at + 1..];
        if next.first() == Some(&b'\n') {
            return Some(at + 2);
        }
        if next.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        from = at + 1;
    }
    None
}

/// Scans one event; returns whether the client should see it.
fn self_scan(
    event: &[u8],
    seen: &mut UsageReport,
    done: &mut bool,
    counts: &mut Option<UsageJson>,
    wire: Wire,
    strip: bool,
) -> bool {
    let mut keep = true;
    for line in event.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            *done = true;
            continue;
        }
        if data.is_empty() {
            continue;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            continue;
        };
        if chunk.error.is_some() {
            seen.saw_error = true;
        }
        let text = &mut seen.text_bytes;
        match &chunk.delta {
            Some(TextOrOther::Text(t)) => *text += t.len() as u64,
            Some(TextOrOther::Block {
                text: t,
                partial_json,
            }) => {
                *text += t.as_deref().map_or(0, str::len) as u64;
                *text += partial_json.as_deref().map_or(0, str::len) as u64;
            }
            _ => {}
        }
        if chunk.kind.as_deref() == Some("message_stop") {
            *done = true;
        }
        for c in chunk.candidates.iter().flatten() {
            let parts = c.content.iter().flat_map(|c| &c.parts);
            *text += parts
                .map(|p| p.text.as_deref().map_or(0, str::len) as u64)
                .sum::<u64>();
            if c.finish_reason.is_some() {
                *done = true;
            }
        }
        let usage_here = chunk
            .usage
            .or(chunk.response.and_then(|r| r.usage))
            .or(chunk.message.and_then(|m| m.usage))
            .or(chunk.usage_metadata);
        let choices = chunk.choices.unwrap_or_default();
        for c in &choices {
            if let Some(d) = &c.delta {
                *text += d.content.as_deref().map_or(0, str::len) as u64;
                *text += d.reasoning_content.as_deref().map_or(0, str::len) as u64;
            }
            *text += c.text.as_deref().map_or(0, str::len) as u64;
        }
        if let Some(u) = usage_here {
            let merged = counts.map_or(u, |before| before.merge(u));
            *counts = Some(merged);
            seen.usage = Some(merged.usage(wire));
            if strip && choices.is_empty() {
                keep = false;
            }
        }
    }
    keep
}

/// The last `"usage": {...}` object in a JSON tail (Gemini's `"usageMetadata"`).
fn last_usage_object(buf: &[u8], wire: Wire) -> Option<UsageJson> {
    let key: &[u8] = match wire {
        Wire::Gemini => b"\"usageMetadata\"",
        _ => b"\"usage\"",
    };
    let mut end = buf.len();
    while let Some(at) = memchr::memmem::rfind(&buf[..end], key) {
        let rest = &buf[at + key.len()..];
        let rest = trim_start(rest);
        if let Some(rest) = rest.strip_prefix(b":") {
            let mut it =
                serde_json::Deserializer::from_slice(trim_start(rest)).into_iter::<UsageJson>();
            if let Some(Ok(u)) = it.next() {
                return Some(u);
            }
        }
        end = at;
    }
    None
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLE: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n";
    const C1: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn run(s: &mut UsageScanner, pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&s.feed(Bytes::copy_from_slice(p)));
        }
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn anthropic_gemini_and_transcription_usage_are_read_in_their_own_terms() {
        use crate::billing::Usage;
        let anthropic = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":4,\"cache_read_input_tokens\":6,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hello\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
        );
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut s = UsageScanner::sse(false).with_wire(Wire::Anthropic);
        assert_eq!(run(&mut s, &[anthropic.as_bytes()]), anthropic.as_bytes());
        assert!(!s.saw_done, "no message_stop yet");
        // Input from message_start (cache reads and writes counted in), output from
        // message_delta.
        let want = Usage {
            prompt_tokens: 20,
            completion_tokens: 7,
            cached_tokens: 6,
            cache_write_tokens: 4,
            ..Usage::default()
        };
        assert_eq!(s.report.usage, Some(want));
        assert_eq!(s.report.text_bytes, 5);
        let mut s = UsageScanner::sse(false).with_wire(Wire::Anthropic);
        run(&mut s, &[anthropic.as_bytes(), stop.as_bytes()]);
        assert!(s.saw_done);

        let gemini = br#"{"candidates":[{"content":{"parts":[{"text":"hi"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":5,"thoughtsTokenCount":3,"cachedContentTokenCount":2,"totalTokenCount":20}}"#;
        let mut s = UsageScanner::json().with_wire(Wire::Gemini);
        run(&mut s, &[gemini]);
        let want = Usage {
            prompt_tokens: 12,
            completion_tokens: 8,
            cached_tokens: 2,
            ..Usage::default()
        };
        assert_eq!(s.report.usage, Some(want));

        let transcript = br#"{"text":"hello","usage":{"type":"duration","seconds":2.5}}"#;
        let mut s = UsageScanner::json();
        run(&mut s, &[transcript]);
        assert_eq!(s.report.audio_seconds, Some(3));
    }

    #[test]
    fn usage_is_found_across_arbitrary_splits_and_chunks_pass_unchanged() {
        let whole = format!("{ROLE}{C1}{USAGE}{DONE}");
        for split in 1..whole.len() {
            let (a, b) = whole.as_bytes().split_at(split);
            let mut s = UsageScanner::sse(false);
            assert_eq!(run(&mut s, &[a, b]), whole.as_bytes());
            let u = s.report.usage.unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
                (9, 2, 4)
            );
            assert_eq!(s.report.text_bytes, 5);
        }
    }

    #[test]
    fn injected_usage_event_is_removed_but_recorded() {
        let whole = format!("{ROLE}{C1}{USAGE}{DONE}");
        for split in 1..whole.len() {
            let (a, b) = whole.as_bytes().split_at(split);
            let mut s = UsageScanner::sse(true);
            let out = String::from_utf8(run(&mut s, &[a, b])).unwrap();
            assert_eq!(out, format!("{ROLE}{C1}{DONE}"));
            assert_eq!(s.report.usage.unwrap().completion_tokens, 2);
        }
    }

    #[test]
    fn three_way_splits_give_the_same_bytes_and_usage_as_one_chunk() {
        let whole = format!("{ROLE}{C1}{C1}{USAGE}{DONE}");
        let b = whole.as_bytes();
        for strip in [false, true] {
            let mut one = UsageScanner::sse(strip);
            let expect = run(&mut one, &[b]);
            for i in (1..b.len()).step_by(7) {
                for j in (i..b.len()).step_by(11) {
                    let mut s = UsageScanner::sse(strip);
                    assert_eq!(run(&mut s, &[&b[..i], &b[i..j], &b[j..]]), expect);
                    assert_eq!(s.report.usage, one.report.usage);
                    assert_eq!(s.report.text_bytes, one.report.text_bytes);
                    assert!(s.saw_done);
                }
            }
        }
    }

    #[test]
    fn cumulative_usage_takes_the_last_value_never_the_sum() {
        let e = |p: u32, c: u32| {
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"x\"}}}}],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c}}}}}\n\n")
        };
        let body = format!("{}{}{}", e(5, 1), e(5, 2), e(5, 3));
        let mut s = UsageScanner::sse(true);
        let out = run(&mut s, &[body.as_bytes()]);
        assert_eq!(
            out,
            body.as_bytes(),
            "usage on content chunks is not stripped"
        );
        assert_eq!(s.report.usage.unwrap().completion_tokens, 3);
    }

    #[test]
    fn crlf_events_mid_stream_errors_and_completions_text() {
        let body = "data: {\"choices\":[{\"text\":\"abc\"}]}\r\n\r\ndata: {\"error\":{\"message\":\"boom\"}}\r\n\r\n";
        let mut s = UsageScanner::sse(false);
        run(&mut s, &[body.as_bytes()]);
        assert_eq!(s.report.text_bytes, 3);
        assert!(s.report.saw_error);
        assert!(s.report.usage.is_none());
    }

    #[test]
    fn json_usage_is_read_from_the_tail_of_a_large_body() {
        let big = "1.0,".repeat(100_000);
        let body = format!("{{\"data\":[{{\"embedding\":[{big}0]}}],\"model\":\"e\",\"usage\":{{\"prompt_tokens\":8,\"total_tokens\":8}}}}");
        let mut s = UsageScanner::json();
        let pieces: Vec<&[u8]> = body.as_bytes().chunks(16 * 1024).collect();
        let out = run(&mut s, &pieces);
        assert_eq!(out.len(), body.len());
        assert_eq!(s.report.usage.unwrap().prompt_tokens, 8);
    }

    #[test]
    fn responses_api_usage_names_are_understood() {
        let ev = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi!\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":3,\"input_tokens_details\":{\"cached_tokens\":2}}}}\n\n";
        let mut s = UsageScanner::sse(false);
        run(&mut s, &[ev.as_bytes()]);
        let u = s.report.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
            (12, 3, 2)
        );
        assert_eq!(s.report.text_bytes, 3);
        let body =
            r#"{"object":"response","output":[],"usage":{"input_tokens":7,"output_tokens":5}}"#;
        let mut s = UsageScanner::json();
        run(&mut s, &[body.as_bytes()]);
        assert_eq!(s.report.usage.unwrap().completion_tokens, 5);
    }

    #[test]
    fn json_text_mentioning_usage_does_not_confuse_the_scanner() {
        let body = r#"{"choices":[{"message":{"content":"the \"usage\": {} key"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let mut s = UsageScanner::json();
        run(&mut s, &[body.as_bytes()]);
        assert_eq!(s.report.usage.unwrap().completion_tokens, 4);
    }
}
