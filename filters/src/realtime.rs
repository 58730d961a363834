//! OpenAI's Realtime API over a websocket: the frames both ways, and the events tollgate
//! acts on.
//!
//! The relay passes frames through as they are (client frames keep their mask), one
//! complete frame at a time, so tollgate can read each text message on the side and insert
//! its own frames between the provider's (an error event, a close). It reads:
//! - from the client, `response.create` (a response is about to start: its worst case is
//!   reserved first, and refused when the account cannot cover it), and the text and audio
//!   it sends (the estimate of the next response's prompt);
//! - from the provider, `response.created` (a response the provider started on its own,
//!   with server VAD: reserved then) and `response.done`, whose `response.usage` settles
//!   the response's cost into the ledger.
//!
//! Compressed frames (`permessage-deflate`) could not be read, so the relay never lets the
//! extension be negotiated.

use bytes::{Buf, Bytes, BytesMut};
use serde::Deserialize;

use crate::billing::Usage;

/// Largest frame relayed; a bigger one ends the session (the Realtime API's own events,
/// audio included, are far smaller).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest message (all its fragments) read for events; a bigger one is relayed unread.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

pub const OP_CONTINUATION: u8 = 0;
pub const OP_TEXT: u8 = 1;
pub const OP_BINARY: u8 = 2;
pub const OP_CLOSE: u8 = 8;

/// One complete frame as it came (to be passed on unchanged) and, when it completed a text
/// message, the message.
#[derive(Debug)]
pub struct Frame {
    pub raw: Bytes,
    pub opcode: u8,
    pub text: Option<Vec<u8>>,
}

/// Why a stream of frames cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    TooLarge,
    /// Reserved bits set: an extension tollgate did not agree to.
    Extension,
}

/// Cuts a byte stream into frames and reassembles text messages.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: BytesMut,
    /// The text message being reassembled from fragments (`None`: not in one, or too big).
    message: Option<Vec<u8>>,
    in_text: bool,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        if b[0] & 0x70 != 0 {
            return Err(FrameError::Extension);
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0F;
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()),
                10,
            ),
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if len > MAX_FRAME as u64 {
            return Err(FrameError::TooLarge);
        }
        let mask = if masked {
            if b.len() < at + 4 {
                return Ok(None);
            }
            at += 4;
            Some([b[at - 4], b[at - 3], b[at - 2], b[at - 1]])
        } else {
            None
        };
        let total = at + len as usize;
        if b.len() < total {
            return Ok(None);
        }
        let raw = self.buf.split_to(total).freeze();
        let payload = || {
            let mut p = raw[at..].to_vec();
            if let Some(m) = mask {
                for (i, byte) in p.iter_mut().enumerate() {
                    *byte ^= m[i % 4];
                }
            }
            p
        };
        let text = match opcode {
            OP_TEXT => {
                self.in_text = !fin;
                if fin {
                    Some(payload())
                } else {
                    self.message = Some(payload());
                    None
                }
            }
            OP_CONTINUATION if self.in_text => {
                if let Some(m) = &mut self.message {
                    if m.len() + len as usize <= MAX_MESSAGE {
                        m.extend_from_slice(&payload());
                    } else {
                        self.message = None;
                    }
                }
                if fin {
                    self.in_text = false;
                    self.message.take()
                } else {
                    None
                }
            }
            _ => None,
        };
        Ok(Some(Frame { raw, opcode, text }))
    }

    /// Whether bytes of an unfinished frame are buffered.
    pub fn mid_frame(&self) -> bool {
        self.buf.has_remaining()
    }
}

/// An unmasked frame, as a server sends it.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    match payload.len() {
        n if n < 126 => out.extend_from_slice(&[n as u8]),
        n if n <= u16::MAX as usize => {
            out.extend_from_slice(&[126]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.extend_from_slice(&[127]);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// A masked close frame, as a client sends it (to the provider).
pub fn client_close_frame(code: u16) -> Bytes {
    let mask: [u8; 4] = rand::random();
    let mut out = vec![0x80 | OP_CLOSE, 0x80 | 2];
    out.extend_from_slice(&mask);
    for (i, b) in code.to_be_bytes().iter().enumerate() {
        out.push(b ^ mask[i]);
    }
    Bytes::from(out)
}

/// A close frame to the client with a status code and reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(120)]);
    server_frame(OP_CLOSE, &payload)
}

/// A Realtime `error` event, as a frame to the client.
pub fn error_event(kind: &str, code: &str, message: &str) -> Bytes {
    let event = serde_json::json!({
        "type": "error",
        "event_id": format!("evt_tollgate_{}", rand::random::<u32>()),
        "error": {"type": kind, "code": code, "message": message, "param": null},
    });
    server_frame(OP_TEXT, event.to_string().as_bytes())
}

/// What tollgate reads of one Realtime event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Client: a response is asked for, at most this many output tokens (`None`: as the
    /// session says).
    ResponseCreate { max_output_tokens: Option<u64> },
    /// Client: `session.update`'s output cap for later responses.
    SessionCap(Option<u64>),
    /// Provider: a response started.
    ResponseCreated,
    /// Provider: a response ended, with its usage if reported.
    ResponseDone(Option<Usage>),
    /// Anything else the client sends: what it may add to the next response's prompt, in
    /// tokens (an upper bound).
    Input { tokens: u64 },
}

/// Input audio tokens per second counted for a reservation: above what the Realtime
/// models count (about 10 per second), so the reservation errs high.
const AUDIO_TOKENS_PER_SECOND: u64 = crate::media::AUDIO_TOKENS_PER_SECOND;
/// Bytes per second of the Realtime API's default input audio (PCM16, 24 kHz, mono).
const AUDIO_BYTES_PER_SECOND: u64 = 48_000;

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "type", default)]
    kind: String,
    /// `input_audio_buffer.append`: base64 audio.
    #[serde(default, borrow)]
    audio: Option<&'a str>,
    #[serde(default)]
    response: Option<RawResponse>,
    #[serde(default)]
    session: Option<RawSession>,
}

#[derive(Deserialize, Default)]
struct RawResponse {
    #[serde(default)]
    max_output_tokens: Option<TokenCap>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize, Default)]
struct RawSession {
    #[serde(default, alias = "max_response_output_tokens")]
    max_output_tokens: Option<TokenCap>,
}

/// A number, or `"inf"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenCap {
    Count(u64),
    Other(serde::de::IgnoredAny),
}

impl TokenCap {
    fn count(self) -> Option<u64> {
        match self {
            TokenCap::Count(n) => Some(n),
            TokenCap::Other(_) => None,
        }
    }
}

#[derive(Deserialize, Default)]
struct RawUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    input_token_details: Details,
    #[serde(default)]
    output_token_details: Details,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    audio_tokens: u64,
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    cached_tokens_details: Option<CachedDetails>,
}

#[derive(Deserialize, Default)]
struct CachedDetails {
    #[serde(default)]
    audio_tokens: u64,
}

impl RawUsage {
    fn usage(&self) -> Usage {
        let cached_audio = self
            .input_token_details
            .cached_tokens_details
            .as_ref()
            .map_or(0, |c| c.audio_tokens);
        Usage {
            prompt_tokens: self.input_tokens,
            completion_tokens: self.output_tokens,
            cached_tokens: self.input_token_details.cached_tokens,
            cache_write_tokens: 0,
            audio_prompt_tokens: self
                .input_token_details
                .audio_tokens
                .saturating_sub(cached_audio),
            audio_completion_tokens: self.output_token_details.audio_tokens,
            estimated: false,
        }
    }
}

/// Reads one text message. `None` when it is not a JSON event.
pub fn read_event(message: &[u8]) -> Option<Event> {
    let ev: RawEvent = serde_json::from_slice(message).ok()?;
    Some(match ev.kind.as_str() {
        "response.create" => Event::ResponseCreate {
            max_output_tokens: ev
                .response
                .and_then(|r| r.max_output_tokens)
                .and_then(TokenCap::count),
        },
        "session.update" => Event::SessionCap(
            ev.session
                .and_then(|s| s.max_output_tokens)
                .and_then(TokenCap::count),
        ),
        "response.created" => Event::ResponseCreated,
        "response.done" => Event::ResponseDone(
            ev.response
                .and_then(|r| r.usage)
                .map(|u| u.usage())
                .filter(|u| *u != Usage::default()),
        ),
        // Audio by its duration; anything else (text items, instructions, tools) by its
        // bytes, a fair upper bound on what it adds to the next prompt.
        "input_audio_buffer.append" => {
            let decoded = ev.audio.map_or(0, |a| a.len() as u64 * 3 / 4);
            Event::Input {
                tokens: decoded.div_ceil(AUDIO_BYTES_PER_SECOND) * AUDIO_TOKENS_PER_SECOND,
            }
        }
        _ => Event::Input {
            tokens: message.len() as u64 / 4,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn frames_are_cut_at_any_split_and_passed_on_byte_for_byte() {
        let long = "x".repeat(300);
        let mut wire = masked(OP_TEXT, true, br#"{"type":"response.create"}"#);
        wire.extend(masked(OP_TEXT, false, long.as_bytes()));
        wire.extend(masked(OP_CONTINUATION, true, b"-end"));
        wire.extend(server_frame(OP_TEXT, b"{}"));
        for split in 0..wire.len() {
            let mut r = FrameReader::default();
            let mut frames = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                r.push(part);
                while let Some(f) = r.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert!(!r.mid_frame());
            let raw: Vec<u8> = frames.iter().flat_map(|f| f.raw.to_vec()).collect();
            assert_eq!(raw, wire, "split {split}");
            let texts: Vec<Vec<u8>> = frames.into_iter().filter_map(|f| f.text).collect();
            assert_eq!(
                texts,
                [
                    br#"{"type":"response.create"}"#.to_vec(),
                    format!("{long}-end").into_bytes(),
                    b"{}".to_vec()
                ]
            );
        }
    }

    #[test]
    fn oversized_and_compressed_frames_are_refused() {
        let mut r = FrameReader::default();
        let mut big = vec![0x82, 127];
        big.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        r.push(&big);
        assert_eq!(r.next_frame().unwrap_err(), FrameError::TooLarge);
        let mut r = FrameReader::default();
        r.push(&[0xC1, 0x00]);
        assert_eq!(r.next_frame().unwrap_err(), FrameError::Extension);
    }

    #[test]
    fn built_frames_read_back() {
        let mut r = FrameReader::default();
        let payload = vec![7u8; 70_000];
        r.push(&server_frame(OP_TEXT, &payload));
        r.push(&close_frame(1008, "over budget"));
        r.push(&client_close_frame(1000));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.text.unwrap(), payload);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.opcode, OP_CLOSE);
        assert_eq!(&f.raw[2..4], &1008u16.to_be_bytes());
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!(f.opcode, OP_CLOSE);
        assert!(r.next_frame().unwrap().is_none());
        let e = error_event("insufficient_quota", "insufficient_quota", "no money");
        let mut r = FrameReader::default();
        r.push(&e);
        let v: serde_json::Value =
            serde_json::from_slice(&r.next_frame().unwrap().unwrap().text.unwrap()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["code"], "insufficient_quota");
    }

    #[test]
    fn events_tollgate_acts_on() {
        assert_eq!(
            read_event(br#"{"type":"response.create","response":{"max_output_tokens":200}}"#),
            Some(Event::ResponseCreate {
                max_output_tokens: Some(200)
            })
        );
        assert_eq!(
            read_event(br#"{"type":"response.create","response":{"max_output_tokens":"inf"}}"#),
            Some(Event::ResponseCreate {
                max_output_tokens: None
            })
        );
        assert_eq!(
            read_event(br#"{"type":"session.update","session":{"max_response_output_tokens":99}}"#),
            Some(Event::SessionCap(Some(99)))
        );
        let done = br#"{"type":"response.done","response":{"id":"r","usage":{"total_tokens":180,"input_tokens":120,"output_tokens":60,"input_token_details":{"text_tokens":20,"audio_tokens":100,"cached_tokens":40,"cached_tokens_details":{"text_tokens":10,"audio_tokens":30}},"output_token_details":{"text_tokens":15,"audio_tokens":45}}}}"#;
        assert_eq!(
            read_event(done),
            Some(Event::ResponseDone(Some(Usage {
                prompt_tokens: 120,
                completion_tokens: 60,
                cached_tokens: 40,
                cache_write_tokens: 0,
                audio_prompt_tokens: 70,
                audio_completion_tokens: 45,
                estimated: false,
            })))
        );
        assert_eq!(
            read_event(br#"{"type":"response.done","response":{"status":"cancelled"}}"#),
            Some(Event::ResponseDone(None))
        );
        assert_eq!(read_event(b"not json"), None);
        // One second of 24 kHz PCM16, base64: 64,000 characters.
        let audio = format!(
            r#"{{"type":"input_audio_buffer.append","audio":"{}"}}"#,
            "A".repeat(64_000)
        );
        assert_eq!(
            read_event(audio.as_bytes()),
            Some(Event::Input {
                tokens: AUDIO_TOKENS_PER_SECOND
            })
        );
        let item = br#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"hello"}]}}"#;
        assert_eq!(
            read_event(item),
            Some(Event::Input {
                tokens: item.len() as u64 / 4
            })
        );
    }
}
