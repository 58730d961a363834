//! Images, audio and files in a request: counted as units (for `images_per_min` and
//! `audio_seconds_per_min`) and estimated in tokens by the providers' published formulas.
//!
//! - **Images** (OpenAI's GPT-4o/4.1 tile formula): `detail: low` costs 85 tokens. Otherwise
//!   (`high`, `auto` or none, counted as `high` since `auto` may pick it) the image is scaled
//!   to fit within 2048×2048, then so that its shortest side is at most 768 px, and costs
//!   `85 + 170 × tiles`, where tiles are the 512-px squares covering it. The size is read
//!   from the header of an inline `data:` image (PNG, GIF, JPEG, WebP); an image given by URL
//!   is counted at the formula's largest value, 1,445 tokens (2048×768: 8 tiles).
//! - **Audio** (`input_audio`): seconds from a WAV header (data bytes / byte rate), else the
//!   payload at 128 kbit/s (16,000 bytes per second), rounded up; 32 tokens per second
//!   (Google's published rate for Gemini; OpenAI publishes none, and its audio models count
//!   fewer per second, so this errs high).
//! - **Files** (`file`, `input_file`): OpenAI gives the model the text and an image of every
//!   PDF page; each page counts as one 768×768 high-detail image (765 tokens) plus 1,000
//!   tokens of text. Pages are the PDF's `/Type /Page` objects; a file whose pages cannot be
//!   counted (a `file_id`, another format) counts as one page.

use base64::Engine;
use serde_json::Value;

/// What a request carries besides text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Media {
    pub images: u32,
    pub image_tokens: u64,
    pub audio_seconds: u64,
    pub files: u32,
    pub file_tokens: u64,
}

/// Tokens of one image at `detail: low`.
pub const LOW_DETAIL_TOKENS: u64 = 85;
/// Tokens per 512-px tile at `detail: high`, on top of [`LOW_DETAIL_TOKENS`].
pub const TILE_TOKENS: u64 = 170;
/// Audio tokens per second.
pub const AUDIO_TOKENS_PER_SECOND: u64 = 32;
/// Tokens of one file page: a 768×768 high-detail image plus text.
pub const FILE_PAGE_TOKENS: u64 = 765 + 1000;

/// The high-detail token count of a `width`×`height` image.
pub fn image_tokens_high(width: u32, height: u32) -> u64 {
    let (mut w, mut h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let longest = w.max(h);
    if longest > 2048.0 {
        let s = 2048.0 / longest;
        w *= s;
        h *= s;
    }
    let shortest = w.min(h);
    if shortest > 768.0 {
        let s = 768.0 / shortest;
        w *= s;
        h *= s;
    }
    // Rounded to whole pixels before tiling, as a resize would.
    let tiles = (w.round() / 512.0).ceil() as u64 * (h.round() / 512.0).ceil() as u64;
    LOW_DETAIL_TOKENS + TILE_TOKENS * tiles
}

/// The most a high-detail image can cost (2048×768 after scaling: 4 × 2 tiles).
pub fn image_tokens_max() -> u64 {
    image_tokens_high(2048, 768)
}

impl Media {
    pub fn tokens(&self) -> u64 {
        self.image_tokens
            .saturating_add(self.audio_seconds.saturating_mul(AUDIO_TOKENS_PER_SECOND))
            .saturating_add(self.file_tokens)
    }

    pub fn is_empty(&self) -> bool {
        *self == Media::default()
    }

    pub fn plus(self, o: Media) -> Media {
        Media {
            images: self.images.saturating_add(o.images),
            image_tokens: self.image_tokens.saturating_add(o.image_tokens),
            audio_seconds: self.audio_seconds.saturating_add(o.audio_seconds),
            files: self.files.saturating_add(o.files),
            file_tokens: self.file_tokens.saturating_add(o.file_tokens),
        }
    }

    /// The media in a raw `messages` or `input` value. Text-only requests (no part type
    /// that carries media) cost one scan for the markers and no parse.
    pub fn of(raw: &[u8]) -> Media {
        const MARKERS: [&[u8]; 4] = [b"image", b"input_audio", b"\"file", b"input_file"];
        if !MARKERS
            .iter()
            .any(|m| memchr::memmem::find(raw, m).is_some())
        {
            return Media::default();
        }
        let Ok(v) = serde_json::from_slice::<Value>(raw) else {
            return Media::default();
        };
        let mut m = Media::default();
        walk(&v, &mut m, 0);
        m
    }
}

fn walk(v: &Value, m: &mut Media, depth: usize) {
    if depth > 16 {
        return;
    }
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, m, depth + 1)),
        Value::Object(o) => {
            match o.get("type").and_then(Value::as_str) {
                Some("image_url") | Some("input_image") | Some("image") => {
                    // Chat: {"image_url": {"url", "detail"}} or {"image_url": "..."};
                    // Responses: {"image_url": "...", "detail"}.
                    let inner = o.get("image_url");
                    let url = inner
                        .and_then(|u| u.get("url").and_then(Value::as_str).or(u.as_str()))
                        .unwrap_or_default();
                    let detail = inner
                        .and_then(|u| u.get("detail"))
                        .or(o.get("detail"))
                        .and_then(Value::as_str)
                        .unwrap_or("auto");
                    m.images = m.images.saturating_add(1);
                    m.image_tokens = m.image_tokens.saturating_add(image_cost(url, detail));
                    return;
                }
                Some("input_audio") => {
                    let a = o.get("input_audio").unwrap_or(v);
                    let data = a.get("data").and_then(Value::as_str).unwrap_or_default();
                    let format = a.get("format").and_then(Value::as_str).unwrap_or_default();
                    m.audio_seconds = m.audio_seconds.saturating_add(audio_seconds(data, format));
                    return;
                }
                Some("file") | Some("input_file") => {
                    let f = o.get("file").unwrap_or(v);
                    let data = f
                        .get("file_data")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    m.files = m.files.saturating_add(1);
                    m.file_tokens = m
                        .file_tokens
                        .saturating_add(pdf_pages(data).saturating_mul(FILE_PAGE_TOKENS));
                    return;
                }
                _ => {}
            }
            o.values().for_each(|x| walk(x, m, depth + 1));
        }
        _ => {}
    }
}

/// The payload of a `data:...;base64,` URL, or the string itself when it is bare base64.
fn base64_payload(s: &str) -> &str {
    match s.find(";base64,") {
        Some(at) if s.starts_with("data:") => &s[at + 8..],
        _ => s,
    }
}

/// Decodes at most `max` bytes from the start of a base64 payload.
fn decode_prefix(payload: &str, max: usize) -> Vec<u8> {
    let take = (max / 3 * 4).min(payload.len() / 4 * 4);
    base64::engine::general_purpose::STANDARD
        .decode(&payload.as_bytes()[..take])
        .unwrap_or_default()
}

fn image_cost(url: &str, detail: &str) -> u64 {
    if detail.eq_ignore_ascii_case("low") {
        return LOW_DETAIL_TOKENS;
    }
    if url.starts_with("data:") {
        let head = decode_prefix(base64_payload(url), 256 * 1024);
        if let Some((w, h)) = image_size(&head) {
            return image_tokens_high(w, h);
        }
    }
    image_tokens_max()
}

/// Width and height from an image file's header: PNG, GIF, JPEG or WebP.
pub fn image_size(b: &[u8]) -> Option<(u32, u32)> {
    let be16 = |i: usize| {
        Some(u32::from(u16::from_be_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let le16 = |i: usize| {
        Some(u32::from(u16::from_le_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let be32 = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
    let le24 = |i: usize| {
        let s = b.get(i..i + 3)?;
        Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
    };
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Some((be32(16)?, be32(20)?));
    }
    if b.starts_with(b"GIF8") {
        return Some((le16(6)?, le16(8)?));
    }
    if b.starts_with(b"RIFF") && b.get(8..12) == Some(b"WEBP") {
        return match b.get(12..16)? {
            b"VP8X" => Some((le24(24)? + 1, le24(27)? + 1)),
            b"VP8L" => {
                let bits = u32::from_le_bytes(b.get(21..25)?.try_into().ok()?);
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            b"VP8 " => Some((le16(26)? & 0x3fff, le16(28)? & 0x3fff)),
            _ => None,
        };
    }
    if b.starts_with(&[0xff, 0xd8]) {
        let mut i = 2;
        while i + 9 < b.len() {
            if b[i] != 0xff {
                return None;
            }
            let marker = b[i + 1];
            if marker == 0xff {
                i += 1;
                continue;
            }
            let len = be16(i + 2)? as usize;
            let sof = (0xc0..=0xcf).contains(&marker) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
            if sof {
                return Some((be16(i + 7)?, be16(i + 5)?));
            }
            i += 2 + len;
        }
    }
    None
}

/// Seconds of audio in a base64 payload, rounded up, at least 1.
fn audio_seconds(data: &str, format: &str) -> u64 {
    let payload = base64_payload(data);
    let bytes = (payload.len() as u64).saturating_mul(3) / 4;
    let rate = if format.eq_ignore_ascii_case("wav") || payload.starts_with("UklGR") {
        wav_byte_rate(&decode_prefix(payload, 64))
    } else {
        None
    };
    seconds_of(bytes, rate)
}

/// Seconds of an audio file (a transcription's upload), rounded up, at least 1: a WAV's
/// data by its byte rate, anything else at 128 kbit/s.
pub fn audio_file_seconds(file: &[u8]) -> u64 {
    seconds_of(file.len() as u64, wav_byte_rate(file))
}

fn seconds_of(bytes: u64, wav_byte_rate: Option<u32>) -> u64 {
    match wav_byte_rate {
        Some(rate) => bytes.saturating_sub(44).div_ceil(u64::from(rate)).max(1),
        None => bytes.div_ceil(16_000).max(1),
    }
}

/// A WAV header's byte rate.
fn wav_byte_rate(head: &[u8]) -> Option<u32> {
    if !(head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WAVE")) {
        return None;
    }
    head.get(28..32)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .filter(|&r| r > 0)
}

/// Pages of an inline PDF (`/Type /Page` objects, not `/Pages`), at least 1.
fn pdf_pages(data: &str) -> u64 {
    let payload = base64_payload(data);
    if payload.is_empty() {
        return 1;
    }
    let pdf = decode_prefix(payload, 32 * 1024 * 1024);
    let mut n = 0u64;
    for needle in [&b"/Type /Page"[..], &b"/Type/Page"[..]] {
        let mut rest = &pdf[..];
        while let Some(at) = memchr::memmem::find(rest, needle) {
            let after = rest.get(at + needle.len()).copied();
            if after != Some(b's') {
                n += 1;
            }
            rest = &rest[at + needle.len()..];
        }
    }
    n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of a PNG of the given size (enough for its header).
    pub(crate) fn png_head(w: u32, h: u32) -> Vec<u8> {
        let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        v.extend_from_slice(&w.to_be_bytes());
        v.extend_from_slice(&h.to_be_bytes());
        v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    fn data_url(bytes: &[u8], mime: &str) -> String {
        format!(
            "data:{mime};base64,{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    #[test]
    fn openai_tile_formula_examples() {
        // OpenAI's published examples.
        assert_eq!(image_tokens_high(1024, 1024), 765);
        assert_eq!(image_tokens_high(2048, 4096), 1105);
        assert_eq!(image_tokens_high(512, 512), 255);
        assert_eq!(image_tokens_max(), 1445);
    }

    #[test]
    fn image_sizes_are_read_from_headers() {
        assert_eq!(image_size(&png_head(800, 600)), Some((800, 600)));
        let gif = b"GIF89a\x20\x03\x58\x02rest";
        assert_eq!(image_size(gif), Some((800, 600)));
        // JPEG: SOI, an APP0 segment, then SOF0 with height 600 and width 800.
        let mut jpg = vec![0xff, 0xd8, 0xff, 0xe0, 0, 4, 0, 0];
        jpg.extend_from_slice(&[0xff, 0xc0, 0, 17, 8, 0x02, 0x58, 0x03, 0x20, 3, 0, 0, 0, 0]);
        assert_eq!(image_size(&jpg), Some((800, 600)));
        assert_eq!(image_size(b"not an image"), None);
    }

    #[test]
    fn two_high_detail_images_and_one_low_are_counted_by_the_formula() {
        let img = data_url(&png_head(1024, 1024), "image/png");
        let raw = serde_json::json!([{"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image_url", "image_url": {"url": img, "detail": "high"}},
            {"type": "image_url", "image_url": {"url": img, "detail": "high"}},
            {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
        ]}]);
        let m = Media::of(raw.to_string().as_bytes());
        assert_eq!(m.images, 3);
        assert_eq!(m.image_tokens, 765 + 765 + 85);
        // An image by URL at high detail: the largest the formula allows.
        let raw = r#"[{"type":"input_image","image_url":"https://x/big.png"}]"#;
        assert_eq!(Media::of(raw.as_bytes()).image_tokens, 1445);
    }

    #[test]
    fn audio_seconds_from_a_wav_header_else_by_bytes() {
        // 16 kHz mono 16-bit: 32,000 bytes per second; 2.5 s of data.
        let mut wav = b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\x80\x3e\0\0".to_vec();
        wav.extend_from_slice(&32_000u32.to_le_bytes());
        wav.extend_from_slice(&[2, 0, 16, 0]);
        wav.extend_from_slice(b"data\0\0\0\0");
        wav.resize(44 + 80_000, 0);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&wav);
        let raw = serde_json::json!([{"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}]);
        let m = Media::of(raw.to_string().as_bytes());
        assert_eq!(m.audio_seconds, 3);
        assert_eq!(m.tokens(), 3 * AUDIO_TOKENS_PER_SECOND);
        let mp3 = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 48_000]);
        let raw = serde_json::json!([{"type": "input_audio", "input_audio": {"data": mp3, "format": "mp3"}}]);
        assert_eq!(Media::of(raw.to_string().as_bytes()).audio_seconds, 3);
    }

    #[test]
    fn pdf_pages_are_counted() {
        let pdf = b"%PDF-1.4 1 0 obj <</Type /Pages /Count 2>> 2 0 obj <</Type /Page>> 3 0 obj <</Type/Page>>";
        let raw = serde_json::json!([{"type": "file", "file": {"file_data": data_url(pdf, "application/pdf")}}]);
        let m = Media::of(raw.to_string().as_bytes());
        assert_eq!((m.files, m.file_tokens), (1, 2 * FILE_PAGE_TOKENS));
        let raw = r#"[{"type":"file","file":{"file_id":"file-1"}}]"#;
        assert_eq!(Media::of(raw.as_bytes()).file_tokens, FILE_PAGE_TOKENS);
    }

    #[test]
    fn text_only_requests_have_no_media() {
        let raw = r#"[{"role":"user","content":"describe an image of a file"}]"#;
        assert!(Media::of(raw.as_bytes()).is_empty());
    }
}
