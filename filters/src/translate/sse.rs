//! Cutting complete SSE events out of a byte stream whose chunks split anywhere.

/// A pending event larger than this is dropped (its bytes are skipped up to its blank line).
pub const MAX_EVENT: usize = 1024 * 1024;

/// Where a discarded (oversized) event's bytes have got to: a blank line ends the discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discard {
    /// Not discarding.
    Off,
    /// Inside a line.
    MidLine,
    /// Just after a line's `\n`.
    LineStart,
    /// Just after a line's `\n` and a `\r`.
    LineStartCr,
}

/// Splits pushed bytes into SSE events: `(event name, data lines joined with '\n')`.
///
/// Events end at a blank line (`\n\n`, `\r\n\r\n` or a mix); comment lines (starting with
/// `:`) and fields other than `event` and `data` are ignored; a block with neither (e.g. a
/// keep-alive comment) yields nothing. One value space after the colon is stripped, as the
/// SSE spec says.
#[derive(Debug)]
pub struct SseEvents {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for `\n`.
    scanned: usize,
    /// Start of the line `scanned` is in.
    line_start: usize,
    discard: Discard,
}

impl Default for SseEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl SseEvents {
    pub fn new() -> Self {
        SseEvents {
            buf: Vec::new(),
            scanned: 0,
            line_start: 0,
            discard: Discard::Off,
        }
    }

    /// Appends bytes from the network.
    pub fn push(&mut self, chunk: &[u8]) {
        let mut chunk = chunk;
        while self.discard != Discard::Off && !chunk.is_empty() {
            let b = chunk[0];
            chunk = &chunk[1..];
            self.discard = match (self.discard, b) {
                (Discard::LineStart | Discard::LineStartCr, b'\n') => Discard::Off,
                (_, b'\n') => Discard::LineStart,
                (Discard::LineStart, b'\r') => Discard::LineStartCr,
                _ => Discard::MidLine,
            };
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, if one has arrived.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<(Option<String>, Vec<u8>)> {
        loop {
            let end = self.find_blank_line()?;
            // `end` is the index of the blank line's `\n`; the event is everything before the
            // blank line.
            let event_len = self.line_start;
            let taken: Vec<u8> = self.buf.drain(..=end).collect();
            self.scanned = 0;
            self.line_start = 0;
            if event_len > MAX_EVENT {
                continue;
            }
            if let Some(event) = parse_event(&taken[..event_len]) {
                return Some(event);
            }
        }
    }

    /// The final event of a stream that ended without its blank line; empties the buffer.
    pub fn rest(&mut self) -> Option<(Option<String>, Vec<u8>)> {
        if let Some(event) = self.next() {
            return Some(event);
        }
        let buf = std::mem::take(&mut self.buf);
        self.scanned = 0;
        self.line_start = 0;
        if self.discard != Discard::Off {
            self.discard = Discard::Off;
            return None;
        }
        parse_event(&buf)
    }

    /// Finds the `\n` ending a blank line, leaving `line_start` at that blank line's start.
    /// Drops the pending event if it grew past [`MAX_EVENT`] without one.
    fn find_blank_line(&mut self) -> Option<usize> {
        while let Some(off) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let nl = self.scanned + off;
            let line = &self.buf[self.line_start..nl];
            if line.is_empty() || line == b"\r" {
                return Some(nl);
            }
            self.line_start = nl + 1;
            self.scanned = nl + 1;
        }
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_EVENT {
            // Everything buffered belongs to one unfinished event: skip it and what follows up
            // to its blank line.
            let tail = &self.buf[self.line_start..];
            self.discard = if tail.is_empty() {
                Discard::LineStart
            } else if tail == b"\r" {
                Discard::LineStartCr
            } else {
                Discard::MidLine
            };
            self.buf.clear();
            self.scanned = 0;
            self.line_start = 0;
        }
        None
    }
}

/// One event block (lines without the blank line) to its name and data; `None` if it has
/// neither.
fn parse_event(block: &[u8]) -> Option<(Option<String>, Vec<u8>)> {
    let mut name = None;
    let mut data: Option<Vec<u8>> = None;
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => name = Some(String::from_utf8_lossy(value).into_owned()),
            b"data" => match &mut data {
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(value);
                }
                None => data = Some(value.to_vec()),
            },
            _ => {}
        }
    }
    if name.is_none() && data.is_none() {
        return None;
    }
    Some((name, data.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Event = (Option<String>, Vec<u8>);

    fn ev(name: Option<&str>, data: &str) -> Event {
        (name.map(str::to_string), data.as_bytes().to_vec())
    }

    fn drain(s: &mut SseEvents) -> Vec<Event> {
        std::iter::from_fn(|| s.next()).collect()
    }

    fn split_all(input: &[u8], at: &[usize]) -> Vec<Event> {
        let mut s = SseEvents::new();
        let mut out = Vec::new();
        let mut prev = 0;
        for &i in at.iter().chain(std::iter::once(&input.len())) {
            s.push(&input[prev..i]);
            out.extend(drain(&mut s));
            prev = i;
        }
        out.extend(s.rest());
        out
    }

    const STREAM: &[u8] = b": hello\n\nevent: message_start\ndata: {\"a\":1}\n\n\
        event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n\
        data: line1\ndata:line2\nid: 5\nretry: 10\n\n\
        data: x\r\n\n\
        data: tail";

    fn expected() -> Vec<Event> {
        vec![
            ev(Some("message_start"), "{\"a\":1}"),
            ev(Some("ping"), "{\"type\": \"ping\"}"),
            ev(None, "line1\nline2"),
            ev(None, "x"),
            ev(None, "tail"),
        ]
    }

    #[test]
    fn events_are_cut_at_blank_lines_in_every_separator_style() {
        assert_eq!(split_all(STREAM, &[]), expected());
    }

    #[test]
    fn events_split_at_any_byte_are_the_same() {
        for i in 0..=STREAM.len() {
            assert_eq!(split_all(STREAM, &[i]), expected(), "split at {i}");
        }
        let every: Vec<usize> = (1..STREAM.len()).collect();
        assert_eq!(split_all(STREAM, &every), expected());
    }

    #[test]
    fn rest_is_empty_after_a_complete_stream_and_ignores_comments() {
        let mut s = SseEvents::new();
        s.push(b"data: a\n\n: keepalive\n");
        assert_eq!(s.next(), Some(ev(None, "a")));
        assert_eq!(s.next(), None);
        assert_eq!(s.rest(), None);
        assert_eq!(s.rest(), None);
    }

    #[test]
    fn a_field_without_colon_and_an_empty_data_line_count() {
        let mut s = SseEvents::new();
        s.push(b"data\n\nevent: e\n\ndata:\ndata: b\n\n");
        assert_eq!(
            drain(&mut s),
            vec![ev(None, ""), ev(Some("e"), ""), ev(None, "\nb")]
        );
    }

    #[test]
    fn an_oversized_event_is_dropped_and_the_next_one_survives() {
        let mut s = SseEvents::new();
        s.push(b"data: small\n\ndata: ");
        let big = vec![b'x'; 64 * 1024];
        for _ in 0..17 {
            s.push(&big);
            // Polling drops the pending event once it passes the cap.
            let got = drain(&mut s);
            assert!(got.iter().all(|e| e.1 == b"small"), "only the small event");
        }
        assert!(s.buf.len() <= MAX_EVENT, "nothing big is held");
        s.push(b"xxxx\r");
        s.push(b"\n\r");
        s.push(b"\ndata: after\n\n");
        assert_eq!(drain(&mut s), vec![ev(None, "after")]);
        assert_eq!(s.rest(), None);
    }

    #[test]
    fn an_oversized_event_arriving_whole_is_dropped() {
        let mut s = SseEvents::new();
        let mut input = b"data: ".to_vec();
        input.extend(vec![b'y'; MAX_EVENT + 10]);
        input.extend_from_slice(b"\n\ndata: ok\n\n");
        s.push(&input);
        assert_eq!(drain(&mut s), vec![ev(None, "ok")]);
    }

    #[test]
    fn an_oversized_unfinished_event_is_not_returned_by_rest() {
        let mut s = SseEvents::new();
        s.push(b"data: ");
        s.push(&vec![b'z'; MAX_EVENT + 1]);
        assert_eq!(s.next(), None);
        assert_eq!(s.rest(), None);
    }
}
