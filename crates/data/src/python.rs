//! Python's way of printing template values, which is what Jinja2 under transformers prints:
//! `str()` of `None`, booleans, lists and dicts, `json.dumps` for `tojson`, and
//! `datetime.strftime` for `strftime_now`. The environment that uses them is `jinja.rs`'s.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Output, State, Value};

/// Prints values as Python's `str()` does, which is what Jinja2 under transformers prints:
/// `None`, `True`, `[1, 'a']`, `{'k': 'v'}`; strings as they are.
pub(crate) fn python_formatter(
    out: &mut Output,
    _state: &mut State,
    value: &Value,
) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => {
            return out
                .write_str(value.as_str().unwrap_or_default())
                .map_err(Error::from);
        }
        _ => python_repr(value),
    };
    out.write_str(&text).map_err(Error::from)
}

/// Python's `repr()` of a template value.
fn python_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') {
                '"'
            } else {
                '\''
            };
            let mut r = String::with_capacity(s.len() + 2);
            r.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => r.push_str("\\\\"),
                    '\n' => r.push_str("\\n"),
                    '\r' => r.push_str("\\r"),
                    '\t' => r.push_str("\\t"),
                    c if c == quote => {
                        r.push('\\');
                        r.push(c);
                    }
                    c => r.push(c),
                }
            }
            r.push(quote);
            r
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = value
                .try_iter()
                .map(|it| it.map(|v| python_repr(&v)).collect())
                .unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let items: Vec<String> = value
                .try_iter()
                .map(|keys| {
                    keys.map(|k| {
                        let v = value.get_item(&k).unwrap_or_default();
                        format!("{}: {}", python_repr(&k), python_repr(&v))
                    })
                    .collect()
                })
                .unwrap_or_default();
            format!("{{{}}}", items.join(", "))
        }
        _ => value.to_string(),
    }
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, without the HTML escaping of minijinja's own filter.
pub(crate) fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    if let Some(n) = indent.filter(|&n| n > MAX_INDENT) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: indent = {n} is above the largest supported, {MAX_INDENT}"),
        ));
    }
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: `separators` must be a pair of strings",
            ));
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut text = String::new();
    style.write(&mut text, &json, 0)?;
    Ok(Value::from_safe_string(text))
}

/// The widest `tojson` indent accepted, so a template cannot make a value print as gigabytes of
/// spaces.
const MAX_INDENT: usize = 64;

/// The options of Python's `json.dumps` that templates use.
struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonStyle {
    fn write(&self, out: &mut String, v: &serde_json::Value, level: usize) -> Result<(), Error> {
        use serde_json::Value as J;
        match v {
            J::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i > 0, level + 1)?;
                    self.write(out, item, level + 1)?;
                }
                self.newline(out, level)?;
                out.push(']');
            }
            J::Object(map) if !map.is_empty() => {
                let mut entries: Vec<_> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i > 0, level + 1)?;
                    self.write_string(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, item, level + 1)?;
                }
                self.newline(out, level)?;
                out.push('}');
            }
            J::String(s) => self.write_string(out, s),
            other => out.push_str(&other.to_string()),
        }
        Ok(())
    }

    fn separate(&self, out: &mut String, not_first: bool, level: usize) -> Result<(), Error> {
        if not_first {
            out.push_str(&self.item_sep);
        }
        self.newline(out, level)
    }

    /// A newline and the indent of `level`, when indenting.
    fn newline(&self, out: &mut String, level: usize) -> Result<(), Error> {
        if let Some(n) = self.indent {
            let width = n.checked_mul(level).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: the value is nested too deeply to indent",
                )
            })?;
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', width));
        }
        Ok(())
    }

    fn write_string(&self, out: &mut String, s: &str) {
        let quoted = serde_json::Value::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    write!(out, "\\u{unit:04x}").expect("writing to a String cannot fail");
                }
            }
        }
    }
}

/// Python's `datetime.strftime` for the directives chat templates use (`%d %b %Y` and friends);
/// an unknown directive is printed as written, as glibc does.
pub(crate) fn strftime(format: &str, t: time::OffsetDateTime) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let day = DAYS[t.weekday().number_days_from_monday() as usize];
    let month = MONTHS[u8::from(t.month()) as usize - 1];
    let hour12 = match t.hour() % 12 {
        0 => 12,
        h => h,
    };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match d {
            'a' => write!(out, "{}", &day[..3]),
            'A' => write!(out, "{day}"),
            'b' | 'h' => write!(out, "{}", &month[..3]),
            'B' => write!(out, "{month}"),
            'd' => write!(out, "{:02}", t.day()),
            'e' => write!(out, "{:>2}", t.day()),
            'm' => write!(out, "{:02}", u8::from(t.month())),
            'y' => write!(out, "{:02}", t.year().rem_euclid(100)),
            'Y' => write!(out, "{}", t.year()),
            'H' => write!(out, "{:02}", t.hour()),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{:02}", t.minute()),
            'S' => write!(out, "{:02}", t.second()),
            'p' => write!(out, "{}", if t.hour() < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{:03}", t.ordinal()),
            'F' => write!(
                out,
                "{}-{:02}-{:02}",
                t.year(),
                u8::from(t.month()),
                t.day()
            ),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jinja::environment;

    #[test]
    fn strftime_formats_like_python() {
        let t = time::macros::datetime!(2024-07-26 15:04:05 UTC);
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %I:%M:%S %p %j %y %% %Q", t),
            "Friday July 26 03:04:05 PM 208 24 % %Q"
        );
    }

    #[test]
    fn tojson_options_follow_json_dumps() {
        let env = environment();
        let render = |src: &str| {
            env.template_from_str(src)
                .unwrap()
                .render(minijinja::context! { v => minijinja::value::Serde(serde_json::json!({"b": [1, "é"], "a": {}})) })
                .unwrap()
        };
        assert_eq!(render("{{ v | tojson }}"), r#"{"b": [1, "é"], "a": {}}"#);
        assert_eq!(
            render("{{ v | tojson(indent=2) }}"),
            "{\n  \"b\": [\n    1,\n    \"é\"\n  ],\n  \"a\": {}\n}"
        );
        assert_eq!(
            render("{{ v | tojson(sort_keys=true, separators=(',', ':'), ensure_ascii=true) }}"),
            r#"{"a":{},"b":[1,"\u00e9"]}"#
        );
        let err = env
            .template_from_str("{{ v | tojson(indent=100000000000) }}")
            .unwrap()
            .render(minijinja::context! { v => vec![1] })
            .unwrap_err();
        assert!(err.to_string().contains("indent = 100000000000"), "{err}");
        assert_eq!(
            env.template_from_str("{{ v | tojson(indent=64) }}")
                .unwrap()
                .render(minijinja::context! { v => vec![1] })
                .unwrap(),
            format!("[\n{}1\n]", " ".repeat(64))
        );
    }

    #[test]
    fn values_print_as_python_does() {
        let env = environment();
        let out = env
            .template_from_str(
                "{{ none }}|{{ true }}|{{ [1, 'a', none] }}|{{ {'k': false} }}|{{ missing }}",
            )
            .unwrap()
            .render(minijinja::context! {})
            .unwrap();
        assert_eq!(out, "None|True|[1, 'a', None]|{'k': False}|");
    }
}
