//! The Jinja dialect of transformers' `apply_chat_template`, on minijinja: trimmed and
//! left-stripped blocks, loop controls, namespaces, `raise_exception`, `strftime_now`, a
//! Python-style `tojson`, Python string methods, Python's way of printing `None`, booleans, lists
//! and dicts (those printers are in `python.rs`), and the `{% generation %}` tag. This module owns
//! the environment; which template is rendered with which values is `template.rs`'s business.
//!
//! Sandboxing: the environment has no loader, no filesystem or environment access, and a fuel
//! limit, so a template sees only the values passed in and cannot run forever.
//!
//! `{% generation %}`…`{% endgeneration %}` marks text the model generates. minijinja has no such
//! tag, so the source is rewritten before compiling: each tag becomes a block tag with the same
//! whitespace control (`{%- if true %}…{% endif -%}`, so trimming stays exactly as it was) that
//! prints a private-use marker character. After rendering, the markers are removed and their byte
//! positions become the generation spans.

use std::fmt::Write as _;
use std::ops::Range;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::python::{python_formatter, strftime, tojson};

/// Printed where a `{% generation %}` block starts.
pub(crate) const GENERATION_START: char = '\u{F0000}';
/// Printed where a `{% generation %}` block ends.
pub(crate) const GENERATION_END: char = '\u{F0001}';

/// Upper bound on template work, so a hostile template cannot loop forever.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A new environment with the transformers dialect.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| -> Result<Value, Error> {
        Ok(Value::from(strftime(&format, render_time()?)))
    });
    env.add_filter("tojson", tojson);
    // Python's `None` is not iterable (minijinja iterates `none` as empty).
    env.add_test("iterable", |v: Value| {
        !v.is_none() && (v.is_undefined() || v.try_iter().is_ok())
    });
    env
}

/// The environment variable that pins the time `strftime_now` renders (seconds since the Unix
/// epoch, the reproducible-builds convention): data prepared from a template that prints
/// today's date is then the same whatever day it is prepared.
pub const SOURCE_DATE_EPOCH: &str = "SOURCE_DATE_EPOCH";

/// The time `strftime_now` renders: [`SOURCE_DATE_EPOCH`] when set, the current UTC time
/// otherwise (as transformers renders it).
fn render_time() -> Result<time::OffsetDateTime, Error> {
    match std::env::var(SOURCE_DATE_EPOCH) {
        Ok(pinned) => pinned_time(&pinned),
        Err(_) => Ok(time::OffsetDateTime::now_utc()),
    }
}

/// The time a [`SOURCE_DATE_EPOCH`] value names.
fn pinned_time(value: &str) -> Result<time::OffsetDateTime, Error> {
    value
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(|seconds| time::OffsetDateTime::from_unix_timestamp(seconds).ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "{SOURCE_DATE_EPOCH}={value:?} is not a time in seconds since 1970-01-01; \
                     set it to a whole number of seconds (`date +%s`) or unset it"
                ),
            )
        })
}

/// Rewrites `{% generation %}` and `{% endgeneration %}` tags into marker-printing blocks; the
/// second value says whether the source had any.
pub(crate) fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        match parse_generation_tag(tag) {
            Some((len, left, right, end)) => {
                let marker = if end {
                    GENERATION_END
                } else {
                    GENERATION_START
                };
                write!(out, "{{%{left} if true %}}{marker}{{% endif {right}%}}")
                    .expect("writing to a String cannot fail");
                rest = &tag[len..];
                found = true;
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `s`: (length, left whitespace
/// control, right whitespace control, is the end tag).
fn parse_generation_tag(s: &str) -> Option<(usize, &str, &str, bool)> {
    let body = s.strip_prefix("{%")?;
    let (left, body) = match body.chars().next() {
        Some(c @ ('-' | '+')) => (&s[2..2 + c.len_utf8()], &body[1..]),
        _ => ("", body),
    };
    let trimmed = body.trim_start();
    let (end, after) = if let Some(a) = trimmed.strip_prefix("endgeneration") {
        (true, a)
    } else if let Some(a) = trimmed.strip_prefix("generation") {
        (false, a)
    } else {
        return None;
    };
    let after_ws = after.trim_start();
    if after_ws.len() == after.len() && !after.starts_with(['-', '+', '%']) {
        return None; // e.g. `generation_prompt`
    }
    let (right, close) = match after_ws.chars().next() {
        Some(c @ ('-' | '+')) => (&after_ws[..1], &after_ws[c.len_utf8()..]),
        _ => ("", after_ws),
    };
    let close = close.strip_prefix("%}")?;
    Some((s.len() - close.len(), left, right, end))
}

/// Removes the generation markers from `text`, returning the byte spans they enclosed.
pub(crate) fn extract_generation_spans(text: &str) -> Result<(String, Vec<Range<usize>>), String> {
    let mut out = String::with_capacity(text.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            GENERATION_START => {
                if depth == 0 {
                    open = Some(out.len());
                }
                depth += 1;
            }
            GENERATION_END => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("`{% endgeneration %}` without a matching `{% generation %}`")?;
                if depth == 0
                    && let Some(start) = open.take()
                {
                    spans.push(start..out.len());
                }
            }
            c => out.push(c),
        }
    }
    if depth != 0 {
        return Err("`{% generation %}` without a matching `{% endgeneration %}`".into());
    }
    Ok((out, spans))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_render_time_is_seconds_since_the_epoch_or_an_error_naming_the_variable() {
        let pinned = pinned_time(" 1795651200 ").unwrap();
        assert_eq!(strftime("%Y-%m-%d %H:%M", pinned), "2026-11-26 00:00");
        let error = pinned_time("tomorrow").unwrap_err().to_string();
        assert!(error.contains("SOURCE_DATE_EPOCH=\"tomorrow\""), "{error}");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        let (src, found) = rewrite_generation_tags("a{%- generation -%} b {% endgeneration %}");
        assert!(found);
        assert_eq!(
            src,
            "a{%- if true %}\u{F0000}{% endif -%} b {% if true %}\u{F0001}{% endif %}"
        );
        let (src, found) = rewrite_generation_tags("{% if generation_prompt %}x{% endif %}");
        assert!(!found);
        assert_eq!(src, "{% if generation_prompt %}x{% endif %}");
    }

    #[test]
    fn generation_spans_are_byte_ranges_of_the_clean_text() {
        let (text, spans) =
            extract_generation_spans("é\u{F0000}ab\u{F0001}c\u{F0000}d\u{F0001}").unwrap();
        assert_eq!(text, "éabcd");
        assert_eq!(spans, vec![2..4, 5..6]);
        assert!(extract_generation_spans("\u{F0000}x").is_err());
        assert!(extract_generation_spans("x\u{F0001}").is_err());
    }
}
