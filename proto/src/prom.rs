//! The Prometheus text exposition format, read side.
//!
//! The proxies and the controller publish metrics in this format on their admin ports; the CLI
//! (`conduit stat`, the demo's live table) and the controller's public API read them back with
//! [`parse`]. Only what the exposition format defines is accepted: `# HELP` / `# TYPE` comments
//! are skipped, each other line is `name{label="value",...} value [timestamp]`. Input comes
//! from the network, so it is bounded ([`MAX_EXPOSITION_BYTES`]) and a malformed line is an
//! error naming its line number, never a panic.

use std::collections::BTreeMap;

/// The largest exposition accepted: far above what one proxy publishes with bounded labels.
pub const MAX_EXPOSITION_BYTES: usize = 32 * 1024 * 1024;

/// One sample: a metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric name (with any `_bucket`, `_sum`, `_count` suffix).
    pub name: String,
    /// Labels, ordered by name.
    pub labels: BTreeMap<String, String>,
    /// The value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    #[must_use]
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A malformed exposition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PromError {
    /// The text is larger than [`MAX_EXPOSITION_BYTES`].
    #[error("metrics exposition is {0} bytes, above the limit")]
    TooLarge(usize),
    /// A line could not be read.
    #[error("metrics line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Parses a whole exposition.
///
/// # Errors
///
/// [`PromError`] for oversized input or the first malformed line.
pub fn parse(text: &str) -> Result<Vec<Sample>, PromError> {
    if text.len() > MAX_EXPOSITION_BYTES {
        return Err(PromError::TooLarge(text.len()));
    }
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(parse_line(line).map_err(|reason| PromError::Line {
            line: i + 1,
            reason,
        })?);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("invalid metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        other => other.parse().map_err(|_| "invalid value")?,
    };
    // An optional timestamp may follow; anything more is malformed.
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().map_err(|_| "invalid timestamp")?;
    }
    if fields.next().is_some() {
        return Err("trailing text");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `name="value",...}` and returns what follows the closing brace.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let eq = rest.find('=').ok_or("label without a value")?;
        let key = rest[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("invalid label name");
        }
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    _ => return Err("invalid escape in label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected `,` or `}` after a label");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exposition_format() {
        let text = r#"
# HELP response_total Responses.
# TYPE response_total counter
response_total{direction="outbound",authority="web.default:80",status_code="200",classification="success"} 42
response_latency_ms_bucket{le="+Inf",authority="a\"b\\c"} 7 1700000000000
process_cpu_seconds_total 1.5e0
"#;
        let samples = parse(text).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("authority"), Some("web.default:80"));
        assert!((samples[0].value - 42.0).abs() < f64::EPSILON);
        assert_eq!(samples[1].label("le"), Some("+Inf"));
        assert_eq!(samples[1].label("authority"), Some("a\"b\\c"));
        assert!(samples[2].labels.is_empty());
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        for (text, reason) in [
            ("x{a=\"1", "unterminated label value"),
            ("x{a=\"1\"", "expected `,` or `}` after a label"),
            ("x{a=1} 2", "label value not quoted"),
            ("x 1 2 3", "trailing text"),
            ("x", "no value"),
            ("x{a=\"1\" b=\"2\"} 1", "expected `,` or `}` after a label"),
            ("x{} one", "invalid value"),
            ("x-y 1", "invalid metric name"),
        ] {
            assert_eq!(
                parse(text),
                Err(PromError::Line { line: 1, reason }),
                "{text}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }
    }
}
