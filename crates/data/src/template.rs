//! Chat templates: the checkpoint's own Jinja template (`chat_template.jinja`, or
//! `tokenizer_config.json`'s `chat_template`, a string or a list of named templates) rendered with
//! minijinja in the dialect of transformers' `apply_chat_template`: trimmed and left-stripped
//! blocks, `raise_exception`, a `tojson` that leaves text unescaped, Python string methods.
//! Rendering is sandboxed: templates see only the values passed in, and a fuel limit bounds them.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tokenizer::{SpecialTokens, TokenizerConfig};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Upper bound on template work, so a hostile template cannot loop forever.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A chat template's source and the name it is reported under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub name: String,
    pub source: String,
}

impl ChatTemplate {
    /// The template a checkpoint directory ships: `chat_template.jinja` (transformers 5) first,
    /// then `tokenizer_config.json`'s `chat_template` (its `default` entry when it is a list).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source = std::fs::read_to_string(&jinja).map_err(|source| DataError::Io {
                path: jinja.clone(),
                source,
            })?;
            return Ok(Self {
                name: jinja.display().to_string(),
                source,
            });
        }
        let name = dir.join("tokenizer_config.json").display().to_string();
        let source = match TokenizerConfig::from_dir(dir)?.chat_template {
            Some(serde_json::Value::String(s)) => s,
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from)
                .ok_or_else(|| DataError::Template {
                    name: name.clone(),
                    detail: "a list of templates without one named `default`".into(),
                })?,
            _ => {
                return Err(DataError::NoChatTemplate {
                    dir: dir.to_path_buf(),
                });
            }
        };
        Ok(Self { name, source })
    }

    /// Renders `messages` as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` would.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String> {
        let fail = |e: Error| DataError::Template {
            name: self.name.clone(),
            detail: describe(&e),
        };
        let env = environment();
        let template = env.template_from_str(&self.source).map_err(fail)?;
        template
            .render(context! {
                messages => Value::from(Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &special.bos_token,
                eos_token => &special.eos_token,
                pad_token => &special.pad_token,
                unk_token => &special.unk_token,
            })
            .map_err(fail)
    }
}

/// A template error with its cause chain, which carries `raise_exception`'s message.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn environment() -> Environment<'static> {
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
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_filter("tojson", tojson);
    env
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent)`,
/// without the HTML escaping of minijinja's built-in filter.
fn tojson(value: Value, indent: Option<usize>) -> std::result::Result<Value, Error> {
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = match indent {
        None => python_compact_json(&json),
        Some(n) => {
            let indent = " ".repeat(n);
            let mut out = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            serde::Serialize::serialize(&json, &mut ser)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(out).expect("serde_json writes UTF-8")
        }
    };
    Ok(Value::from_safe_string(text))
}

/// Python's default `json.dumps` separators: `", "` and `": "`.
fn python_compact_json(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    match v {
        J::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(python_compact_json)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        J::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", J::String(k.clone()), python_compact_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate {
            name: "test".into(),
            source: source.into(),
        }
    }

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let out = template(CHATML)
            .render(
                &[Message::new("user", "Hi")],
                true,
                &SpecialTokens::default(),
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_message_reaches_the_error() {
        let err = template("{{ raise_exception('Roles must alternate') }}")
            .render(&[], false, &SpecialTokens::default())
            .unwrap_err();
        assert!(err.to_string().contains("Roles must alternate"), "{err}");
    }

    #[test]
    fn tojson_is_python_style_and_unescaped() {
        let out = template("{{ messages[0] | tojson }}")
            .render(
                &[Message::new("user", "<b>é</b>")],
                false,
                &SpecialTokens::default(),
            )
            .unwrap();
        assert_eq!(out, r#"{"role": "user", "content": "<b>é</b>"}"#);
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        let source = "{% for m in messages %}\n  {{ m.content.strip() }}\n{% endfor %}";
        let out = template(source)
            .render(
                &[Message::new("user", "  a ")],
                false,
                &SpecialTokens::default(),
            )
            .unwrap();
        assert_eq!(out, "  a\n");
    }

    #[test]
    fn runaway_templates_are_stopped() {
        let err = template(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .render(&[], false, &SpecialTokens::default())
        .unwrap_err();
        assert!(err.to_string().contains("test"), "{err}");
    }
}
