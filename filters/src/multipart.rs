//! `multipart/form-data` bodies (audio transcriptions, image edits): the parts' names and
//! where each value lies in the body, so the body can be forwarded byte for byte with at
//! most the `model` value replaced. Written here rather than taken from a crate because
//! the byte ranges are what the gateway needs (the crates hand out copies of each field).

use std::ops::Range;

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub filename: Option<String>,
    /// The value's bytes in the body.
    pub value: Range<usize>,
}

/// The boundary named by a `Content-Type: multipart/form-data; boundary=…` value.
pub fn boundary(content_type: &str) -> Option<&str> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= 70).then_some(v)
    })
}

/// The parts of `body`, in order. `Err` with what is wrong when the body is not a
/// well-formed form with that boundary.
pub fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, &'static str> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    let find = |from: usize| memchr::memmem::find(&body[from..], delim).map(|i| from + i);
    let mut at = find(0).ok_or("the form has no boundary line")?;
    let mut parts = Vec::new();
    loop {
        let after = at + delim.len();
        if body[after..].starts_with(b"--") {
            return Ok(parts);
        }
        let head_start = after
            + if body[after..].starts_with(b"\r\n") {
                2
            } else {
                return Err("a boundary line is malformed");
            };
        let head_len = memchr::memmem::find(&body[head_start..], b"\r\n\r\n")
            .ok_or("a part has no end of headers")?;
        let head = std::str::from_utf8(&body[head_start..head_start + head_len])
            .map_err(|_| "a part's headers are not text")?;
        let value_start = head_start + head_len + 4;
        let next = memchr::memmem::find(&body[value_start..], &[b"\r\n", delim].concat())
            .map(|i| value_start + i)
            .ok_or("a part is not closed by a boundary")?;
        let (name, filename) = disposition(head).ok_or("a part has no form-data name")?;
        parts.push(Part {
            name,
            filename,
            value: value_start..next,
        });
        at = next + 2;
        if parts.len() > 1000 {
            return Err("the form has too many parts");
        }
    }
}

/// `name` and `filename` of a part's `Content-Disposition: form-data; …`.
fn disposition(head: &str) -> Option<(String, Option<String>)> {
    let line = head.split("\r\n").find(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
    })?;
    let (_, v) = line.split_once(':')?;
    let mut params = v.split(';').map(str::trim);
    if !params.next()?.eq_ignore_ascii_case("form-data") {
        return None;
    }
    let (mut name, mut filename) = (None, None);
    for p in params {
        let Some((k, v)) = p.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim() {
            "name" => name = Some(v),
            "filename" => filename = Some(v),
            _ => {}
        }
    }
    Some((name?, filename))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--not-it\r\n\x00\x01\r\n--XyZ--\r\n";

    #[test]
    fn parts_are_found_with_their_value_ranges() {
        assert_eq!(boundary("multipart/form-data; boundary=XyZ"), Some("XyZ"));
        assert_eq!(
            boundary("Multipart/Form-Data; charset=utf-8; boundary=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary("application/json"), None);
        let parts = parse(FORM, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "model");
        assert_eq!(&FORM[parts[0].value.clone()], b"whisper-1");
        assert_eq!(parts[1].filename.as_deref(), Some("a.wav"));
        assert_eq!(
            &FORM[parts[1].value.clone()],
            b"RIFF\r\n--not-it\r\n\x00\x01"
        );
    }

    #[test]
    fn malformed_forms_are_refused() {
        assert!(parse(b"no boundary here", "XyZ").is_err());
        assert!(parse(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nunterminated",
            "XyZ"
        )
        .is_err());
        assert!(parse(
            b"--XyZ\r\nContent-Type: text/plain\r\n\r\nx\r\n--XyZ--",
            "XyZ"
        )
        .is_err());
        assert_eq!(parse(b"--XyZ--\r\n", "XyZ").unwrap(), vec![]);
    }
}
