//! `${ENV}` interpolation of the YAML text, before it is parsed.

use super::ConfigError;

/// Where in a YAML line a `${...}` stands, which decides how its value must be written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    Plain,
    Single,
    Double,
}

/// Writes `v` so YAML reads it back as exactly `v` in that position, or says why it cannot.
fn splice(v: &str, q: Quoting) -> Result<String, &'static str> {
    if v.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    match q {
        Quoting::Double => Ok(v.replace('\\', "\\\\").replace('"', "\\\"")),
        Quoting::Single => Ok(v.replace('\'', "''")),
        // Unquoted, these would end the value, start a comment, a mapping or a flow
        // collection, or change the scalar's type. (`host:8080` and URLs are fine.)
        Quoting::Plain
            if v.contains(": ")
                || v.contains(" #")
                || v.contains(|c: char| ",[]{}".contains(c))
                || v.starts_with(|c: char| "-?:#&*!|>'\"%@`".contains(c))
                || v.ends_with(':')
                || v.trim() != v =>
        {
            Err("needs quoting: put the reference in double quotes")
        }
        Quoting::Plain => Ok(v.to_string()),
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` (`$${` is a literal `${`). Shell semantics:
/// `${X}` takes X even when empty, `${X:-d}` uses `d` when X is unset or empty; one trailing
/// newline is dropped. The value is written to suit its place: escaped inside quotes,
/// refused unquoted when YAML would read it differently. Comments are left alone. Errors
/// name the variable, never its value.
pub fn interpolate(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let mut err = |message: String| {
            errors.push(ConfigError {
                path: "(interpolation)".into(),
                line: Some(n + 1),
                message,
            })
        };
        let mut quoting = Quoting::Plain;
        let mut rest = line;
        let mut prev: Option<char> = None;
        while let Some(c) = rest.chars().next() {
            // A comment: `#` at the start or after a space, outside quotes.
            if c == '#' && quoting == Quoting::Plain && prev.is_none_or(char::is_whitespace) {
                out.push_str(rest);
                rest = "";
                break;
            }
            if rest.starts_with("$${") {
                out.push_str("${");
                rest = &rest[3..];
                prev = Some('{');
                continue;
            }
            if !rest.starts_with("${") {
                quoting = match (c, quoting) {
                    ('"', Quoting::Plain) => Quoting::Double,
                    ('"', Quoting::Double) if prev != Some('\\') => Quoting::Plain,
                    ('\'', Quoting::Plain) => Quoting::Single,
                    ('\'', Quoting::Single) => Quoting::Plain,
                    (_, q) => q,
                };
                out.push(c);
                rest = &rest[c.len_utf8()..];
                prev = Some(c);
                continue;
            }
            let Some(len) = rest.find('}') else {
                err("unterminated `${`".into());
                out.push_str(rest);
                rest = "";
                break;
            };
            let expr = &rest[2..len];
            rest = &rest[len + 1..];
            prev = Some('}');
            let (name, default) = match expr.split_once(":-") {
                Some((name, d)) => (name, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                err(format!("`${{{expr}}}` is not a valid variable reference"));
                continue;
            }
            let value = env(name).map(|v| v.strip_suffix('\n').map(str::to_owned).unwrap_or(v));
            let value = match default {
                Some(d) => Some(
                    value
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| d.to_string()),
                ),
                None => value,
            };
            match value {
                None => err(format!(
                    "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                )),
                Some(v) => match splice(&v, quoting) {
                    Ok(text) => out.push_str(&text),
                    Err(why) => err(format!("environment variable `{name}` {why}")),
                },
            }
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_interpolation_with_and_without_default() {
        let out = interpolate("a: ${SET}\nb: ${UNSET:-dflt}\n# c: ${NOPE}\n", |k| {
            (k == "SET").then(|| "v".into())
        })
        .unwrap();
        assert_eq!(out, "a: v\nb: dflt\n# c: ${NOPE}\n");
        let e = interpolate("x: 1\nb: ${MISSING}\n", |_| None).unwrap_err();
        assert_eq!(e[0].line, Some(2));
        assert!(e[0].message.contains("MISSING"));
        let quoted = interpolate("k: \"${Q}\"\n", |_| Some("a\"b\\c".into())).unwrap();
        assert_eq!(quoted, "k: \"a\\\"b\\\\c\"\n");
        let plain = interpolate("k: ${Q}\n", |_| Some("a, tls_verify: false".into())).unwrap_err();
        assert!(plain[0].message.contains("`Q`") && !plain[0].message.contains("tls_verify"));
        let ctl = interpolate("k: \"${Q}\"\n", |_| Some("a\tb".into())).unwrap_err();
        assert!(ctl[0].message.contains("control"));
        assert_eq!(
            interpolate("k: v # ${NOPE}\n", |_| None).unwrap(),
            "k: v # ${NOPE}\n"
        );
        assert_eq!(
            interpolate("k: \"a#${X}\"\n", |_| Some("1".into())).unwrap(),
            "k: \"a#1\"\n"
        );
        assert_eq!(
            interpolate("k: '$${X}'\n", |_| None).unwrap(),
            "k: '${X}'\n"
        );
        assert_eq!(
            interpolate("k: '${X}'\n", |_| Some("it's".into())).unwrap(),
            "k: 'it''s'\n"
        );
        assert_eq!(
            interpolate("l: ${L:-127.0.0.1:8080}\nu: ${U}\n", |k| (k == "U")
                .then(|| "https://h/v1".into()))
            .unwrap(),
            "l: 127.0.0.1:8080\nu: https://h/v1\n"
        );
        assert_eq!(
            interpolate("k: ${E}|${E:-d}\n", |_| Some(String::new())).unwrap(),
            "k: |d\n"
        );
        assert_eq!(
            interpolate("k: ${N}\n", |_| Some("v\n".into())).unwrap(),
            "k: v\n"
        );
    }
}
