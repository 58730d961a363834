//! Test helpers: driving a stream translator through [`SseEvents`] with any chunking.

use bytes::BytesMut;
use serde_json::Value;

use super::{SseEvents, StreamTranslator};

/// Feeds `input` cut at `cuts` through an [`SseEvents`] into `t`, then finishes with `clean`.
pub fn run_split(
    t: &mut dyn StreamTranslator,
    input: &[u8],
    cuts: &[usize],
    clean: bool,
) -> Vec<u8> {
    let mut sse = SseEvents::new();
    let mut out = BytesMut::new();
    let mut prev = 0;
    for &i in cuts.iter().chain(std::iter::once(&input.len())) {
        sse.push(&input[prev..i]);
        prev = i;
        while let Some((name, data)) = sse.next() {
            t.event(name.as_deref(), &data, &mut out);
        }
    }
    if let Some((name, data)) = sse.rest() {
        t.event(name.as_deref(), &data, &mut out);
    }
    t.finish(clean, &mut out);
    out.to_vec()
}

/// The output's events as (name, data) pairs, parsed back with [`SseEvents`] (which also
/// checks that every event is complete).
pub fn events(output: &[u8]) -> Vec<(Option<String>, String)> {
    assert!(
        output.is_empty() || output.ends_with(b"\n\n"),
        "output ends mid-event"
    );
    let mut sse = SseEvents::new();
    sse.push(output);
    let mut all = Vec::new();
    while let Some((name, data)) = sse.next() {
        all.push((name, String::from_utf8(data).unwrap()));
    }
    assert_eq!(sse.rest(), None);
    all
}

/// The JSON `data:` of every event except `[DONE]`.
pub fn json_events(output: &[u8]) -> Vec<Value> {
    events(output)
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).unwrap())
        .collect()
}

/// How many `data: [DONE]` events the output has.
pub fn done_count(output: &[u8]) -> usize {
    events(output).iter().filter(|(_, d)| d == "[DONE]").count()
}

/// Anthropic-style SSE text from (event, json) pairs.
pub fn anthropic_sse(events: &[(&str, Value)]) -> Vec<u8> {
    let mut s = String::new();
    for (name, data) in events {
        s.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    s.into_bytes()
}

/// OpenAI/Gemini-style SSE text (`data:` only), each JSON or a literal like `[DONE]`.
pub fn data_sse(items: &[String]) -> Vec<u8> {
    let mut s = String::new();
    for d in items {
        s.push_str(&format!("data: {d}\r\n\r\n"));
    }
    s.into_bytes()
}
