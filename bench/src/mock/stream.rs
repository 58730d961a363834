//! A streamed (SSE) completion: the task that feeds one response body, chunk by
//! chunk, with the misbehaviours a request asked for (delays, the gate,
//! truncation, in-band errors) and the usage reporting of its [`UsageMode`].
//!
//! [`Sse`] and [`Pacing`] are the wire-neutral half, shared with the Anthropic and
//! Gemini streams: every wire asks [`Sse::step`] before each content chunk.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use super::wire::{error_json, ChatDeltaChoice, Chunk, Delta, Item, TextChoice, Usage};
use super::{Behaviour, ServedUsage, Shared, UsageMode};

/// The receiver (hyper's body) is gone: the client disconnected.
pub(super) struct Gone;

/// The per-chunk misbehaviours of a stream, whatever its wire format.
pub(super) struct Pacing {
    pub(super) delay: Option<Duration>,
    pub(super) truncate_after: Option<u32>,
    pub(super) error_after: Option<u32>,
    pub(super) gate: bool,
    /// Send one unparseable event after this many content chunks.
    pub(super) malformed_after: Option<u32>,
    /// Pad the first content chunk's text to this many bytes.
    pub(super) big_line_bytes: Option<u32>,
}

impl Pacing {
    pub(super) fn new(b: &Behaviour) -> Pacing {
        Pacing {
            delay: b.delay_ms.map(Duration::from_millis),
            truncate_after: b.truncate_after,
            error_after: b.error_after,
            gate: b.gate,
            malformed_after: b.malformed_after,
            big_line_bytes: b.big_line_bytes,
        }
    }

    /// The text of content chunk `i`: `tok{i} `, the first padded to `big_line_bytes`.
    pub(super) fn text(&self, i: u32) -> String {
        let mut text = format!("tok{i} ");
        if i == 0 {
            if let Some(n) = self.big_line_bytes {
                let n = n as usize;
                if n > text.len() {
                    text.push_str(&"x".repeat(n - text.len()));
                }
            }
        }
        text
    }
}

/// What a stream does next, decided before each content chunk by [`Sse::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Send content chunk number `sent` (gate and delay already waited for).
    Chunk,
    /// The body has been aborted mid-way; send nothing more.
    Truncated,
    /// Send the wire's in-band error event, then end the body cleanly.
    Error,
    /// Every content chunk is out: send the closing events.
    End,
}

/// One streamed response body: the channel hyper reads, and the server's counters.
pub(super) struct Sse {
    pub(super) shared: Arc<Shared>,
    pub(super) tx: mpsc::Sender<Item>,
}

impl Sse {
    pub(super) fn new(shared: Arc<Shared>) -> (Sse, mpsc::Receiver<Item>) {
        let (tx, rx) = mpsc::channel(8);
        (Sse { shared, tx }, rx)
    }

    pub(super) async fn send(&self, bytes: Vec<u8>) -> Result<(), Gone> {
        self.tx.send(Ok(Bytes::from(bytes))).await.map_err(|_| Gone)
    }

    /// Counted before it can reach anyone: a client holding chunk N must never read
    /// a count below N.
    pub(super) fn count_chunk(&self) {
        self.shared.chunks_sent.fetch_add(1, Ordering::SeqCst);
    }

    /// Before content chunk number `sent` of `total`: truncation, the in-band error,
    /// the end, or (after the gate and the delay) the chunk itself.
    pub(super) async fn step(&self, p: &Pacing, sent: u32, total: u32) -> Result<Step, Gone> {
        if p.truncate_after == Some(sent) {
            self.truncate().await;
            return Ok(Step::Truncated);
        }
        if p.error_after == Some(sent) {
            return Ok(Step::Error);
        }
        if sent == total {
            return Ok(Step::End);
        }
        if p.gate && sent == 1 {
            let mut gate = self.shared.gate.subscribe();
            tokio::select! {
                _ = async { let _ = gate.wait_for(|open| *open).await; } => {}
                _ = self.tx.closed() => return Err(Gone),
            }
        }
        if let Some(d) = p.delay {
            tokio::time::sleep(d).await;
        }
        Ok(Step::Chunk)
    }

    /// Aborts the body mid-way (hyper then drops the connection without the
    /// terminating chunk).
    async fn truncate(&self) {
        // Let hyper take every frame already sent (the channel drains), then
        // give it a moment to write them, so the client sees exactly the chunks
        // sent before the abort. Bounded: a stuck client must not hang us.
        for _ in 0..200 {
            if self.tx.capacity() == self.tx.max_capacity() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        let _ = self.tx.send(Err(io::Error::other("mock truncate"))).await;
    }
}

pub(super) struct StreamJob {
    pub(super) sse: Sse,
    pub(super) pacing: Pacing,
    pub(super) chat: bool,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) chunks: u32,
    pub(super) error_message: String,
    pub(super) mode: UsageMode,
    pub(super) include_usage: bool,
    pub(super) prompt_tokens: u64,
    pub(super) cached: u64,
    /// End the body cleanly without the final `data: [DONE]`.
    pub(super) omit_done: bool,
    /// The request's `user` field, recorded with the served usage.
    pub(super) user: Option<String>,
}

impl StreamJob {
    pub(super) async fn run(self) {
        let mut last_cumulative = None;
        let _ = self.emit(&mut last_cumulative).await;
        // A cumulative stream has reported usage in-band with every chunk, so
        // whatever it last sent counts, even if the stream then broke.
        if let Some(u) = last_cumulative {
            self.served(u);
        }
    }

    fn served(&self, u: Usage) {
        self.sse.shared.record_served(ServedUsage {
            model: self.model.clone(),
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.cached_tokens,
            stream: true,
            user: self.user.clone(),
            ..ServedUsage::default()
        });
    }

    /// The `usage` field every regular chunk carries after `completion`
    /// content chunks.
    fn usage_field(&self, completion: u32) -> Option<Option<Usage>> {
        match self.mode {
            UsageMode::Final if self.include_usage => Some(None),
            UsageMode::Cumulative => Some(Some(Usage::new(
                self.prompt_tokens,
                completion,
                self.cached,
            ))),
            _ => None,
        }
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), Gone> {
        self.sse.send(bytes).await
    }

    fn event<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        serde_json::to_writer(&mut out, v).expect("serialising chunk");
        out.extend_from_slice(b"\n\n");
        out
    }

    /// A regular chunk with a single choice; `text: None` with a finish
    /// reason is the closing chunk (empty delta / empty text).
    fn chunk(
        &self,
        role: bool,
        text: Option<&str>,
        finish: Option<&'static str>,
        usage: Option<Option<Usage>>,
    ) -> Vec<u8> {
        if self.chat {
            Self::event(&Chunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: &[ChatDeltaChoice {
                    index: 0,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: if role { Some("") } else { text },
                    },
                    logprobs: (),
                    finish_reason: finish,
                }],
                usage,
            })
        } else {
            Self::event(&Chunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: &[TextChoice {
                    text: text.unwrap_or(""),
                    index: 0,
                    logprobs: (),
                    finish_reason: finish,
                }],
                usage,
            })
        }
    }

    fn usage_chunk(&self, u: Usage) -> Vec<u8> {
        Self::event(&Chunk::<'_, ChatDeltaChoice> {
            id: &self.id,
            object: if self.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            },
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(Some(u)),
        })
    }

    async fn emit(&self, last_cumulative: &mut Option<Usage>) -> Result<(), Gone> {
        let cumulative = self.mode == UsageMode::Cumulative;
        let track = |sent: u32, last: &mut Option<Usage>| {
            if cumulative {
                *last = Some(Usage::new(self.prompt_tokens, sent, self.cached));
            }
        };
        if self.chat {
            self.send(self.chunk(true, None, None, self.usage_field(0)))
                .await?;
            track(0, last_cumulative);
        }
        let mut sent = 0u32;
        loop {
            match self.sse.step(&self.pacing, sent, self.chunks).await? {
                Step::Truncated => return Ok(()),
                Step::Error => {
                    let err = error_json(&self.error_message, "server_error", None);
                    let mut ev = b"data: ".to_vec();
                    ev.extend_from_slice(&err);
                    ev.extend_from_slice(b"\n\n");
                    // Ends the body cleanly (terminating chunk) but without [DONE].
                    return self.send(ev).await;
                }
                Step::End => break,
                Step::Chunk => {}
            }
            if self.pacing.malformed_after == Some(sent) {
                let broken = format!(
                    "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"delta\":{{\"content\":\"tok\n\n",
                    self.id
                );
                self.send(broken.into_bytes()).await?;
            }
            let text = self.pacing.text(sent);
            self.sse.count_chunk();
            self.send(self.chunk(false, Some(&text), None, self.usage_field(sent + 1)))
                .await?;
            sent += 1;
            track(sent, last_cumulative);
        }
        self.send(self.chunk(false, None, Some("stop"), self.usage_field(sent)))
            .await?;
        track(sent, last_cumulative);
        if self.mode == UsageMode::Final && self.include_usage {
            let u = Usage::new(self.prompt_tokens, sent, self.cached);
            self.send(self.usage_chunk(u)).await?;
            self.served(u);
        }
        if self.omit_done {
            return Ok(());
        }
        self.send(b"data: [DONE]\n\n".to_vec()).await
    }
}
