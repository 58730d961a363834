//! Field path → the YAML line it is written on, for error messages.

/// The line where a dotted path (`channels[1].base_url`) is written, found by walking the
/// YAML's indentation. Best effort: `None` where the text does not follow block style.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut from = 0usize;
    let mut min_indent: Option<usize> = None;
    let mut found = None;
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(from) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let ind = indent(l);
            if min_indent.is_some_and(|m| ind < m) && i > from {
                return found;
            }
            let t = t.strip_prefix("- ").unwrap_or(t);
            if t.starts_with(&format!("{key}:")) {
                hit = Some((i, ind));
                break;
            }
        }
        let (i, ind) = hit?;
        found = Some(i + 1);
        from = i + 1;
        min_indent = Some(ind + 1);
        if let Some(want) = index {
            let mut seen = 0;
            let mut item = None;
            for (j, l) in lines.iter().enumerate().skip(from) {
                let t = l.trim_start();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if indent(l) < ind || (indent(l) == ind && !t.starts_with('-')) {
                    break;
                }
                if t.starts_with('-') {
                    if seen == want {
                        item = Some(j);
                        break;
                    }
                    seen += 1;
                }
            }
            let j = item?;
            found = Some(j + 1);
            // The item's own first key sits on the dash line; search from there.
            from = j;
            min_indent = Some(indent(lines[j]));
        }
    }
    found
}
