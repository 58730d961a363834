//! One response of a session: its events, its pacing and misbehaviour, its usage.

use futures_util::SinkExt;
use serde_json::json;

use super::*;

/// What a response's output looks like, for its events.
struct Output<'a> {
    response_id: &'a str,
    item_id: &'a str,
}

impl Session {
    pub(super) async fn respond(&mut self, ev: &Value) -> Result<(), End> {
        let mut b = self.base.clone();
        if let Some(x) = ev.get("x_mock") {
            match Behaviour::deserialize(x) {
                Ok(over) => b = b.overlay(over),
                Err(e) => return self.client_error(&format!("invalid x_mock: {e}")).await,
            }
        }
        let mode = match UsageMode::parse(b.usage.as_deref()) {
            Ok(m) => m,
            Err(msg) => return self.client_error(&msg).await,
        };
        let r = ev.get("response");
        let asked = r.and_then(|r| r.get("output_modalities").or(r.get("modalities")));
        let audio = modalities(asked).unwrap_or(self.audio);
        let pacing = Pacing::new(&b);
        let chunks = b.chunks.unwrap_or(3);
        let error_message = b
            .error_message
            .clone()
            .unwrap_or_else(|| "mock upstream error".to_owned());

        self.responses += 1;
        let response_id = format!("resp_{}", self.responses);
        let item_id = self.item_id();
        let out = Output {
            response_id: &response_id,
            item_id: &item_id,
        };
        let conversation_id = format!("conv_{}", self.session["id"].as_str().unwrap_or(""));
        let output_modalities = match audio {
            true => json!(["audio"]),
            false => json!(["text"]),
        };
        let response = |status: &str, output: Value, usage: Value| {
            json!({
                "object": "realtime.response",
                "id": response_id,
                "status": status,
                "status_details": null,
                "output": output,
                "conversation_id": conversation_id,
                "output_modalities": output_modalities,
                "max_output_tokens": "inf",
                "usage": usage,
            })
        };
        let created = response("in_progress", json!([]), Value::Null);
        self.send(json!({"type": "response.created", "response": created}))
            .await?;
        self.last_item = Some(item_id.clone());
        let empty_item = json!({
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        });
        self.send(json!({
            "type": "response.output_item.added",
            "response_id": response_id,
            "output_index": 0,
            "item": empty_item,
        }))
        .await?;
        let empty_part = match audio {
            true => json!({"type": "audio", "transcript": ""}),
            false => json!({"type": "text", "text": ""}),
        };
        self.send(out.event("response.content_part.added", json!({"part": empty_part})))
            .await?;

        let mut text = String::new();
        let mut sent = 0u32;
        loop {
            if pacing.truncate_after == Some(sent) {
                self.truncate().await;
                return Err(End);
            }
            if pacing.error_after == Some(sent) {
                self.send(json!({
                    "type": "error",
                    "error": {
                        "type": "server_error",
                        "code": null,
                        "message": error_message,
                        "param": null,
                        "event_id": null,
                    },
                }))
                .await?;
                let usage = self.usage(&b, audio, sent, chunks);
                let mut failed = response("failed", json!([]), usage.clone());
                failed["status_details"] = json!({
                    "type": "failed",
                    "error": {"type": "server_error", "code": null, "message": error_message},
                });
                return self.done(failed, usage, mode).await;
            }
            if sent == chunks {
                break;
            }
            if pacing.gate && sent == 1 {
                let mut gate = self.shared.gate.subscribe();
                self.wait(async move {
                    let _ = gate.wait_for(|open| *open).await;
                })
                .await?;
            }
            if let Some(d) = pacing.delay {
                self.wait(tokio::time::sleep(d)).await?;
            }
            let delta = pacing.text(sent);
            self.shared.chunks_sent.fetch_add(1, Ordering::SeqCst);
            if audio {
                let ev = out.event(
                    "response.output_audio_transcript.delta",
                    json!({"delta": delta}),
                );
                self.send(ev).await?;
                let bytes = [sent as u8; AUDIO_DELTA_BYTES];
                let ev = out.event(
                    "response.output_audio.delta",
                    json!({"delta": base64_encode(&bytes)}),
                );
                self.send(ev).await?;
            } else {
                let ev = out.event("response.output_text.delta", json!({"delta": delta}));
                self.send(ev).await?;
            }
            text.push_str(&delta);
            sent += 1;
        }

        let (part, content) = if audio {
            self.send(out.event("response.output_audio.done", json!({})))
                .await?;
            let ev = out.event(
                "response.output_audio_transcript.done",
                json!({"transcript": text}),
            );
            self.send(ev).await?;
            (
                json!({"type": "audio", "transcript": text}),
                json!({"type": "output_audio", "transcript": text}),
            )
        } else {
            let ev = out.event("response.output_text.done", json!({"text": text}));
            self.send(ev).await?;
            (
                json!({"type": "text", "text": text}),
                json!({"type": "output_text", "text": text}),
            )
        };
        self.send(out.event("response.content_part.done", json!({"part": part})))
            .await?;
        let item = json!({
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [content],
        });
        self.send(json!({
            "type": "response.output_item.done",
            "response_id": response_id,
            "output_index": 0,
            "item": item,
        }))
        .await?;
        let usage = self.usage(&b, audio, sent, chunks);
        let done = response("completed", json!([item]), usage.clone());
        self.done(done, usage, mode).await
    }

    /// `response.done`, and its [`ServedUsage`] (unless `usage: "none"`).
    async fn done(
        &mut self,
        mut response: Value,
        usage: Value,
        mode: UsageMode,
    ) -> Result<(), End> {
        if mode == UsageMode::None {
            if let Some(r) = response.as_object_mut() {
                r.remove("usage");
            }
        } else {
            let n = |v: &Value| v.as_u64().unwrap_or(0);
            self.shared.record_served(ServedUsage {
                model: self.model.clone(),
                prompt_tokens: n(&usage["input_tokens"]),
                completion_tokens: n(&usage["output_tokens"]),
                cached_tokens: n(&usage["input_token_details"]["cached_tokens"]),
                audio_prompt_tokens: n(&usage["input_token_details"]["audio_tokens"]),
                audio_completion_tokens: n(&usage["output_token_details"]["audio_tokens"]),
                stream: true,
                wire: WireFormat::Realtime,
                ..ServedUsage::default()
            });
        }
        self.send(json!({"type": "response.done", "response": response}))
            .await
    }

    /// The usage object after `sent` of `chunks` chunks (see the module doc).
    fn usage(&self, b: &Behaviour, audio: bool, sent: u32, chunks: u32) -> Value {
        let text_in = self.input_text_bytes / 4 + 1;
        let audio_in = b.realtime_audio_in.unwrap_or(0);
        let cached = b.cached_tokens.unwrap_or(0).min(text_in + audio_in);
        let cached_text = cached.min(text_in);
        let cached_audio = cached - cached_text;
        let text_out = u64::from(sent);
        let audio_out = match (audio, b.realtime_audio_out.unwrap_or(0)) {
            (false, _) => 0,
            (true, full) if sent >= chunks => full,
            (true, full) => full * u64::from(sent) / u64::from(chunks),
        };
        let input = text_in + audio_in;
        let output = text_out + audio_out;
        json!({
            "total_tokens": input + output,
            "input_tokens": input,
            "output_tokens": output,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {
                "text_tokens": text_out,
                "audio_tokens": audio_out,
            },
        })
    }

    /// Closes the TCP connection mid-response: what was sent is flushed and given a
    /// moment to leave, then the socket is dropped without a close frame.
    async fn truncate(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.flush()).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Output<'_> {
    /// A content event of this response's single item and part.
    fn event(&self, kind: &str, fields: Value) -> Value {
        let mut ev = json!({
            "type": kind,
            "response_id": self.response_id,
            "item_id": self.item_id,
            "output_index": 0,
            "content_index": 0,
        });
        if let (Some(ev), Value::Object(fields)) = (ev.as_object_mut(), fields) {
            ev.extend(fields);
        }
        ev
    }
}

/// Whether a modalities list asks for audio; `None` when there is no list.
pub(super) fn modalities(v: Option<&Value>) -> Option<bool> {
    let list = v?.as_array()?;
    Some(list.iter().any(|m| m.as_str() == Some("audio")))
}
