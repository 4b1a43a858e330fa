//! Chat templates: where a checkpoint keeps its template (`chat_template.jinja`, or
//! `tokenizer_config.json`'s `chat_template`, a string or a list of named templates), compiling it
//! once, and rendering conversations (and a row's tools) as transformers' `apply_chat_template`
//! does, with the byte spans of `{% generation %}` blocks. The Jinja dialect itself is in `jinja.rs`; named built-in
//! templates are in `builtin.rs`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, Error, Value};

use crate::builtin::Builtin;
use crate::error::{DataError, Result};
use crate::jinja::{self, GENERATION_END, GENERATION_START};
use crate::message::{Content, Message};
use crate::tokenizer::{SpecialTokens, TokenizerConfig};

/// The name the compiled template is stored under in its environment.
const ENTRY: &str = "chat_template";

/// A compiled chat template and the name errors report it under.
///
/// ```
/// use burnish_data::{ChatTemplate, Message, SpecialTokens};
/// let t = ChatTemplate::builtin("chatml").unwrap();
/// let text = t.render(&[Message::new("user", "Hi")], true, &SpecialTokens::default()).unwrap();
/// assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
/// ```
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    name: String,
    source: String,
    has_generation: bool,
    /// Set for a built-in: list contents reach it joined into one string (its template
    /// concatenates `message.content` as a string), and conversations holding what it does not
    /// render are rejected. A checkpoint's own template gets the list, as transformers passes it.
    builtin: Option<Builtin>,
    env: Arc<Environment<'static>>,
}

/// A rendered conversation: the text, and the byte ranges of its `{% generation %}` blocks (empty
/// when the template has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub generation_spans: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source`; `name` is what errors call it (a path or a built-in's name).
    pub fn new(name: impl Into<String>, source: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let source = source.into();
        let (compiled, has_generation) = jinja::rewrite_generation_tags(&source);
        let mut env = jinja::environment();
        env.add_template_owned(ENTRY, compiled)
            .map_err(|e| DataError::Template {
                name: name.clone(),
                detail: describe(&e),
            })?;
        Ok(Self {
            name,
            source,
            has_generation,
            builtin: None,
            env: Arc::new(env),
        })
    }

    /// Reads a template file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(path.display().to_string(), source)
    }

    /// The template a checkpoint directory ships: `chat_template.jinja` (transformers 5) first,
    /// then `tokenizer_config.json`'s `chat_template` (its `default` entry when it is a list).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            return Self::from_file(&jinja);
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
        Self::new(name, source)
    }

    /// A named built-in template (see [`crate::BUILTIN_TEMPLATES`]). A message whose content is
    /// a list of text parts reaches it as the parts' text joined; tools, tool calls and
    /// reasoning, which built-ins do not render, are errors.
    pub fn builtin(name: &str) -> Result<Self> {
        let builtin = Builtin::get(name).ok_or_else(|| DataError::UnknownTemplate {
            name: name.to_string(),
        })?;
        Ok(Self {
            builtin: Some(builtin),
            ..Self::new(name, builtin.source)?
        })
    }

    /// The name errors report this template under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template source as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks generated text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// Renders `messages` as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` would.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String> {
        Ok(self
            .render_spans(
                messages,
                None,
                add_generation_prompt,
                special,
                &Default::default(),
            )?
            .text)
    }

    /// Renders with a list of tool schemas (the template's `tools`, as
    /// `apply_chat_template(messages, tools=...)` passes them; `None` passes none) and extra
    /// template variables (`extra`, e.g. `date_string` or `enable_thinking`, passed like
    /// `apply_chat_template`'s keyword arguments), and returns the generation spans.
    pub fn render_spans(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        special: &SpecialTokens,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Rendered> {
        let fail = |detail: String| DataError::Template {
            name: self.name.clone(),
            detail,
        };
        if let Some(builtin) = &self.builtin {
            builtin.check(messages, tools).map_err(fail)?;
        }
        if self.has_generation
            && (messages.iter().any(holds_marker)
                || tools.is_some_and(|t| t.iter().any(json_holds_marker)))
        {
            return Err(fail(
                "a message or tool contains a reserved private-use character (U+F0000 or U+F0001)"
                    .into(),
            ));
        }
        let joined: Vec<Message>;
        let messages = if self.builtin.is_some()
            && messages
                .iter()
                .any(|m| matches!(m.content, Content::Parts(_)))
        {
            joined = messages
                .iter()
                .enumerate()
                .map(|(i, m)| join_text_parts(i, m))
                .collect::<Result<_, String>>()
                .map_err(fail)?;
            &joined[..]
        } else {
            messages
        };
        // The variables `apply_chat_template` passes: special tokens first (only those that are
        // set), then keyword arguments over them, then messages, tools, documents and the prompt flag.
        let mut vars: BTreeMap<String, Value> = BTreeMap::new();
        for (key, token) in [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("unk_token", &special.unk_token),
            ("pad_token", &special.pad_token),
        ] {
            if let Some(t) = token {
                vars.insert(key.into(), Value::from(t.as_str()));
            }
        }
        for (k, v) in extra {
            vars.insert(k.clone(), Value::from(Serde(v)));
        }
        vars.insert("messages".into(), Value::from(Serde(messages)));
        vars.insert(
            "tools".into(),
            tools.map_or(Value::from(()), |t| Value::from(Serde(t))),
        );
        vars.insert("documents".into(), Value::from(()));
        vars.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let ctx = Value::from(vars);
        let template = self
            .env
            .get_template(ENTRY)
            .map_err(|e| fail(describe(&e)))?;
        let text = template.render(ctx).map_err(|e| fail(describe(&e)))?;
        if !self.has_generation {
            return Ok(Rendered {
                text,
                generation_spans: Vec::new(),
            });
        }
        let (text, generation_spans) = jinja::extract_generation_spans(&text).map_err(fail)?;
        Ok(Rendered {
            text,
            generation_spans,
        })
    }
}

/// `m` with a list content joined into one string; only text parts can be joined.
fn join_text_parts(i: usize, m: &Message) -> Result<Message, String> {
    if let Content::Parts(parts) = &m.content
        && let Some(part) = parts.iter().find(|p| p.kind != "text")
    {
        return Err(format!(
            "message {i} (counting from 0) has a `{}` part; built-in templates render text only",
            part.kind
        ));
    }
    Ok(Message {
        content: Content::Text(m.text()),
        ..m.clone()
    })
}

fn has_marker(s: &str) -> bool {
    s.contains([GENERATION_START, GENERATION_END])
}

fn holds_marker(m: &Message) -> bool {
    has_marker(&m.role)
        || match &m.content {
            Content::Text(t) => has_marker(t),
            Content::Parts(parts) => parts
                .iter()
                .any(|p| has_marker(&p.text) || has_marker(&p.kind)),
        }
        || m.extra
            .iter()
            .any(|(k, v)| has_marker(k) || json_holds_marker(v))
}

/// Whether a string anywhere in `v`, key or value, holds a generation marker.
fn json_holds_marker(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => has_marker(s),
        serde_json::Value::Array(a) => a.iter().any(json_holds_marker),
        serde_json::Value::Object(o) => {
            o.iter().any(|(k, v)| has_marker(k) || json_holds_marker(v))
        }
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new("test", source).unwrap()
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

    #[test]
    fn generation_blocks_give_spans_and_leave_no_trace() {
        let source = "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}!{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}";
        let r = template(source)
            .render_spans(
                &[Message::new("user", "hi"), Message::new("assistant", "yo")],
                None,
                false,
                &SpecialTokens::default(),
                &Default::default(),
            )
            .unwrap();
        // As in Jinja2, trim_blocks eats the newline after `{% endgeneration %}`.
        assert_eq!(r.text, "U: hi\nA: yo!");
        assert_eq!(&r.text[r.generation_spans[0].clone()], "yo!");
        let err = template(source)
            .render_spans(
                &[Message::new("assistant", "\u{F0001}")],
                None,
                false,
                &SpecialTokens::default(),
                &Default::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("private-use"), "{err}");
        let mut call = Message::new("assistant", "");
        call.extra.insert(
            "tool_calls".into(),
            serde_json::json!([{"function": {"name": "\u{F0000}"}}]),
        );
        let err = template(source)
            .render_spans(
                &[call],
                None,
                false,
                &SpecialTokens::default(),
                &Default::default(),
            )
            .unwrap_err();
        assert!(err.to_string().contains("private-use"), "{err}");
    }

    #[test]
    fn tokenizer_config_list_of_templates_uses_default() {
        let dir = std::env::temp_dir().join(format!("burnish-tpl-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D{{ messages | length }}"}
        ]});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap();
        assert_eq!(
            t.render(&[], false, &SpecialTokens::default()).unwrap(),
            "D0"
        );
        std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
        let err = ChatTemplate::from_dir(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(err, DataError::NoChatTemplate { .. }), "{err}");
    }

    #[test]
    fn templates_cannot_reach_outside() {
        for source in [
            "{% include '/etc/passwd' %}",
            "{% import 'x' as y %}",
            "{% extends 'base' %}",
        ] {
            let out = template(source).render(&[], false, &SpecialTokens::default());
            assert!(out.is_err(), "{source}: {out:?}");
        }
        let out = template("{{ env }}{{ environ }}{{ os }}")
            .render(&[], false, &SpecialTokens::default())
            .unwrap();
        assert_eq!(out, "");
    }
}
