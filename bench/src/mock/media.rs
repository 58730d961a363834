//! OpenAI's images and audio endpoints, in their shapes, with the quantities they bill
//! by recorded as [`ServedUsage`] (wire [`WireFormat::OpenAi`], `stream: false`):
//!
//! - `POST .../images/generations` (JSON `{model, prompt, n, size, quality,
//!   response_format}`): `{"created", "data": [n × {"b64_json": <a 1×1 PNG>}]}`, or
//!   `{"url": "https://example.invalid/img/<i>.png"}` items (i from 0) with
//!   `response_format: "url"`. `n` defaults to 1 and must be 1..=10; `prompt` is
//!   required. Recorded: `images` = n.
//! - `POST .../audio/transcriptions` and `.../audio/translations` (multipart/form-data
//!   with `file` and `model`, optional `response_format`): `{"text": "mock transcript",
//!   "usage": {"type": "duration", "seconds": S}}` (`verbose_json` adds `task`,
//!   `language`, `duration` and empty `segments`; `text`, `srt` and `vtt` answer
//!   `text/plain` without usage, and nothing is recorded). S = the WAV data chunk's bytes /
//!   the `fmt ` chunk's byte rate, rounded up, when the file is a RIFF/WAVE file; else
//!   the `audio_seconds` knob (the `x-mock` header: a multipart body has no `x_mock`);
//!   else 1. Recorded: `model` (the form field), `audio_seconds` = S. A form without
//!   `file` or `model`, or a body that is not multipart/form-data, is a 400.
//! - `POST .../audio/speech` (JSON `{model, input, voice, response_format}`):
//!   [`SPEECH_BYTES`] deterministic bytes as `audio/mpeg` (other `response_format`s only
//!   change the content type). `model` and `input` are required. Recorded: `characters`
//!   = the characters (Unicode scalar values) of `input`.
//!
//! The request (for multipart: the exact body bytes) is recorded like every request.

use super::handler::{Call, Route};
use super::*;

/// A 1×1 transparent PNG, the image every `b64_json` item carries.
pub const PNG_1X1: [u8; 68] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0b, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x00, 0x02, 0x00,
    0x00, 0x05, 0x00, 0x01, 0x7a, 0x5e, 0xab, 0x3f, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44,
    0xae, 0x42, 0x60, 0x82,
];

/// Length of a speech answer.
pub const SPEECH_BYTES: usize = 1024;

/// The text every transcription and translation answers.
pub const TRANSCRIPT: &str = "mock transcript";

/// The bytes of every speech answer: `ID3`, then byte `i` = `i % 251`.
pub fn speech_bytes() -> Vec<u8> {
    let mut out: Vec<u8> = (0..SPEECH_BYTES).map(|i| (i % 251) as u8).collect();
    out[..3].copy_from_slice(b"ID3");
    out
}

pub(super) async fn answer(
    call: Call,
    route: Route,
    body: &[u8],
    content_type: Option<&str>,
) -> Response<MockBody> {
    call.delay().await;
    match route {
        Route::Images => images(&call),
        Route::Speech => speech(&call),
        _ => transcribe(&call, route, body, content_type),
    }
}

fn str_field<'a>(call: &'a Call, name: &str) -> Option<&'a str> {
    call.json.as_ref()?.get(name)?.as_str()
}

fn images(call: &Call) -> Response<MockBody> {
    if !call.json.as_ref().is_some_and(Value::is_object) {
        return bad_request("the request body must be a JSON object");
    }
    if str_field(call, "prompt").is_none() {
        return bad_request("you must provide a prompt parameter");
    }
    let n = match call.json.as_ref().and_then(|j| j.get("n")) {
        None | Some(Value::Null) => 1,
        Some(v) => match v.as_u64() {
            Some(n @ 1..=10) => n,
            _ => return bad_request("n must be an integer from 1 to 10"),
        },
    };
    let url = match str_field(call, "response_format") {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return bad_request(&format!(
                "response_format must be \"url\" or \"b64_json\", got {other:?}"
            ))
        }
    };
    let model = str_field(call, "model").unwrap_or("mock-model").to_owned();
    let data: Vec<Value> = (0..n)
        .map(|i| match url {
            true => serde_json::json!({"url": format!("https://example.invalid/img/{i}.png")}),
            false => serde_json::json!({"b64_json": base64_encode(&PNG_1X1)}),
        })
        .collect();
    let out = serde_json::json!({"created": unix_now(), "data": data});
    call.shared.record_served(ServedUsage {
        model,
        images: n,
        ..ServedUsage::default()
    });
    call.ok_json(&out, "x-request-id", call.next_id())
}

fn speech(call: &Call) -> Response<MockBody> {
    if !call.json.as_ref().is_some_and(Value::is_object) {
        return bad_request("the request body must be a JSON object");
    }
    let Some(model) = str_field(call, "model") else {
        return bad_request("you must provide a model parameter");
    };
    let Some(input) = str_field(call, "input") else {
        return bad_request("you must provide an input parameter");
    };
    let content_type = match str_field(call, "response_format") {
        None | Some("mp3") => "audio/mpeg",
        Some("opus") => "audio/ogg",
        Some("aac") => "audio/aac",
        Some("flac") => "audio/flac",
        Some("wav") => "audio/wav",
        Some("pcm") => "audio/pcm",
        Some(other) => return bad_request(&format!("unsupported response_format {other:?}")),
    };
    call.shared.record_served(ServedUsage {
        model: model.to_owned(),
        characters: input.chars().count() as u64,
        ..ServedUsage::default()
    });
    let bytes = speech_bytes();
    let mut resp = Response::new(MockBody::Full(Some(bytes::Bytes::from(bytes))));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(SPEECH_BYTES));
    h.insert("x-request-id", request_id(call.next_id()));
    add_success_headers(h, &call.extra_headers);
    resp
}

fn transcribe(
    call: &Call,
    route: Route,
    body: &[u8],
    content_type: Option<&str>,
) -> Response<MockBody> {
    let parts = match parse_multipart(content_type.unwrap_or(""), body) {
        Ok(p) => p,
        Err(e) => return bad_request(&e),
    };
    let field = |name: &str| parts.iter().find(|p| p.name == name);
    let Some(file) = field("file") else {
        return bad_request("you must provide a file parameter");
    };
    let Some(model) = field("model") else {
        return bad_request("you must provide a model parameter");
    };
    let model = String::from_utf8_lossy(&model.data).into_owned();
    let format = field("response_format").map(|p| String::from_utf8_lossy(&p.data).into_owned());
    let seconds = wav_seconds(&file.data)
        .or(call.b.audio_seconds)
        .unwrap_or(1);
    let usage = serde_json::json!({"type": "duration", "seconds": seconds});
    let json = match format.as_deref() {
        None | Some("json") => serde_json::json!({"text": TRANSCRIPT, "usage": usage}),
        Some("verbose_json") => serde_json::json!({
            "task": if route == Route::Translations { "translate" } else { "transcribe" },
            "language": "english",
            "duration": seconds as f64,
            "text": TRANSCRIPT,
            "segments": [],
            "usage": usage,
        }),
        Some(f @ ("text" | "srt" | "vtt")) => {
            let end = clock(seconds, if f == "srt" { ',' } else { '.' });
            let start = clock(0, if f == "srt" { ',' } else { '.' });
            let text = match f {
                "text" => format!("{TRANSCRIPT}\n"),
                "srt" => format!("1\n{start} --> {end}\n{TRANSCRIPT}\n\n"),
                _ => format!("WEBVTT\n\n{start} --> {end}\n{TRANSCRIPT}\n\n"),
            };
            let mut resp = Response::new(MockBody::Full(Some(bytes::Bytes::from(text))));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert("x-request-id", request_id(call.next_id()));
            add_success_headers(h, &call.extra_headers);
            return resp;
        }
        Some(other) => return bad_request(&format!("unsupported response_format {other:?}")),
    };
    call.shared.record_served(ServedUsage {
        model,
        audio_seconds: seconds,
        ..ServedUsage::default()
    });
    call.ok_json(&json, "x-request-id", call.next_id())
}

/// `HH:MM:SS` then `sep` and `000`.
fn clock(seconds: u64, sep: char) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    format!("{h:02}:{m:02}:{s:02}{sep}000")
}

/// The duration of a RIFF/WAVE file in whole seconds, rounded up: the `data` chunk's
/// bytes (as declared, capped at what is there) over the `fmt ` chunk's byte rate.
/// `None` when it is not a WAV file or has no byte rate before its data.
pub fn wav_seconds(data: &[u8]) -> Option<u64> {
    if data.len() < 12 || &data[0..4] != b"RIFF" || &data[8..12] != b"WAVE" {
        return None;
    }
    let le32 = |at: usize| -> Option<u64> {
        let b: [u8; 4] = data.get(at..at + 4)?.try_into().ok()?;
        Some(u64::from(u32::from_le_bytes(b)))
    };
    let mut at = 12usize;
    let mut byte_rate = None;
    while at + 8 <= data.len() {
        let id = &data[at..at + 4];
        let size = le32(at + 4)?;
        let start = at + 8;
        if id == b"fmt " {
            byte_rate = le32(start + 8);
        } else if id == b"data" {
            let rate = byte_rate.filter(|r| *r > 0)?;
            let bytes = size.min((data.len() - start) as u64);
            return Some(bytes.div_ceil(rate));
        }
        // Chunks are padded to an even length.
        let next = (start as u64).checked_add(size + (size & 1))?;
        at = usize::try_from(next).ok()?;
    }
    None
}

/// One part of a multipart/form-data body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormPart {
    /// The `name` of its `Content-Disposition: form-data`.
    pub name: String,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Vec<u8>,
}

/// Parses a `multipart/form-data` body (RFC 7578) whose boundary is given in
/// `content_type`. Strict where it matters: every part needs a form-data disposition
/// with a name, and the closing delimiter must be there.
pub fn parse_multipart(content_type: &str, body: &[u8]) -> Result<Vec<FormPart>, String> {
    let mut params = content_type.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(format!(
            "Invalid Content-Type header ({content_type:?}), expected multipart/form-data"
        ));
    }
    let boundary = params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("multipart/form-data without a boundary")?;
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let next_delimiter = format!("\r\n--{boundary}");
    let next_delimiter = next_delimiter.as_bytes();

    let malformed = |why: &str| format!("malformed multipart body: {why}");
    // The first delimiter may follow a preamble.
    let mut at = match body.starts_with(delimiter) {
        true => delimiter.len(),
        false => {
            find(body, next_delimiter, 0).ok_or_else(|| malformed("no boundary"))?
                + next_delimiter.len()
        }
    };
    let mut parts = Vec::new();
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            return Ok(parts);
        }
        if !rest.starts_with(b"\r\n") {
            return Err(malformed("a boundary not followed by CRLF"));
        }
        let head_start = at + 2;
        let head_end =
            find(body, b"\r\n\r\n", head_start).ok_or_else(|| malformed("unterminated headers"))?;
        let head = std::str::from_utf8(&body[head_start..head_end])
            .map_err(|_| malformed("headers are not UTF-8"))?;
        let data_start = head_end + 4;
        let data_end = find(body, next_delimiter, data_start)
            .ok_or_else(|| malformed("no closing boundary"))?;
        let mut part = FormPart {
            name: String::new(),
            filename: None,
            content_type: None,
            data: body[data_start..data_end].to_vec(),
        };
        let mut named = false;
        for line in head.split("\r\n") {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim();
            if name.eq_ignore_ascii_case("content-type") {
                part.content_type = Some(value.trim().to_owned());
            } else if name.eq_ignore_ascii_case("content-disposition") {
                let mut params = value.split(';');
                if !params
                    .next()
                    .is_some_and(|d| d.trim().eq_ignore_ascii_case("form-data"))
                {
                    return Err(malformed("a part that is not form-data"));
                }
                for p in params {
                    let Some((k, v)) = p.split_once('=') else {
                        continue;
                    };
                    let v = v.trim().trim_matches('"').to_owned();
                    match k.trim().to_ascii_lowercase().as_str() {
                        "name" => {
                            part.name = v;
                            named = true;
                        }
                        "filename" => part.filename = Some(v),
                        _ => {}
                    }
                }
            }
        }
        if !named {
            return Err(malformed("a part without a Content-Disposition name"));
        }
        parts.push(part);
        at = data_end + next_delimiter.len();
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(byte_rate: u32, data_len: u32) -> Vec<u8> {
        let mut w = b"RIFF\0\0\0\0WAVE".to_vec();
        w.extend_from_slice(b"fmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes()); // PCM
        w.extend_from_slice(&1u16.to_le_bytes()); // mono
        w.extend_from_slice(&(byte_rate / 2).to_le_bytes()); // sample rate
        w.extend_from_slice(&byte_rate.to_le_bytes());
        w.extend_from_slice(&2u16.to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data_len.to_le_bytes());
        w.extend(std::iter::repeat_n(0u8, data_len as usize));
        w
    }

    #[test]
    fn wav_duration_rounds_up() {
        assert_eq!(wav_seconds(&wav(1000, 2500)), Some(3));
        assert_eq!(wav_seconds(&wav(1000, 2000)), Some(2));
        assert_eq!(wav_seconds(&wav(1000, 0)), Some(0));
        assert_eq!(wav_seconds(&wav(0, 10)), None);
        assert_eq!(wav_seconds(b"ID3 not a wav file"), None);
        // A data chunk declared longer than the file counts what is there.
        let mut w = wav(1000, 1500);
        let at = w.len() - 1500 - 4;
        w[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(wav_seconds(&w), Some(2));
    }

    #[test]
    fn multipart_parts() {
        let body = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--X\r\n--XyZ--\r\n";
        let parts = parse_multipart("multipart/form-data; boundary=\"XyZ\"", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "model");
        assert_eq!(parts[0].data, b"whisper-1");
        assert_eq!(parts[1].name, "file");
        assert_eq!(parts[1].filename.as_deref(), Some("a.wav"));
        assert_eq!(parts[1].content_type.as_deref(), Some("audio/wav"));
        assert_eq!(parts[1].data, b"RIFF\r\n--X");
        assert!(parse_multipart("application/json", body).is_err());
        assert!(parse_multipart("multipart/form-data", body).is_err());
        let unterminated = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1";
        assert!(parse_multipart("multipart/form-data; boundary=XyZ", unterminated).is_err());
    }
}
