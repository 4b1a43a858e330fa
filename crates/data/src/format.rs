//! Row shapes: how one JSON row becomes a [`Sample`] (a conversation, a prompt/completion text, a
//! preference pair, or a completion labeled desirable or not). Shapes are `messages` (OpenAI
//! style), ShareGPT (`conversations` with `from`/`value`), Alpaca (`instruction`/`input`/
//! `output`), `prompt`/`completion`, preference pairs (`prompt` + `chosen`/`rejected`, or full
//! `chosen`/`rejected` conversations sharing a prefix) and unpaired preferences (`prompt` +
//! `completion` + a boolean `label`, TRL's KTO rows); a preference pair may carry a numeric
//! `margin` (TRL's reward-model column). Field names are configurable. A message keeps its keys other than the role and the
//! content, and a conversational row its `tools` list, for the template, as transformers'
//! `apply_chat_template(messages, tools=...)` gets them (ShareGPT rows keep their role and
//! value only). Every problem is a reason string; the caller adds the file and line.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::example::Encoded;
use crate::message::{Content, ContentPart, Message, ROLES};

/// Which shape rows have.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowFormat {
    /// Decided per row from the fields present and not null (preference, unpaired, messages,
    /// ShareGPT, Alpaca, prompt/completion, text, prompt alone, in that order).
    #[default]
    Auto,
    Messages,
    Sharegpt,
    Alpaca,
    PromptCompletion,
    Preference,
    /// `prompt`, `completion` and `label`: true for a desirable completion, false for an
    /// undesirable one (KTO's unpaired preference rows).
    Unpaired,
    /// A plain document in one field (`text`), no template, every token trained (language
    /// modelling, as TRL's `text` datasets).
    Text,
    /// A `prompt` alone, as text or messages: what GRPO completes (TRL's prompt-only rows).
    Prompt,
}

/// How Alpaca rows are rendered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlpacaStyle {
    /// As a user turn (instruction, then input after a blank line) and an assistant turn,
    /// through the chat template.
    #[default]
    Chat,
    /// As the plain Stanford Alpaca prompt (`### Instruction:` … `### Response:`), no template.
    Plain,
}

/// Field names of each row shape; every one defaults to the usual name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fields {
    pub messages: String,
    pub role: String,
    pub content: String,
    pub conversations: String,
    pub from: String,
    pub value: String,
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub prompt: String,
    pub completion: String,
    pub chosen: String,
    pub rejected: String,
    pub text: String,
    /// An unpaired completion's desirability (true or false).
    pub label: String,
    /// A preference pair's margin: the reward gap a reward model must score the chosen
    /// sequence above the rejected one by (optional).
    pub margin: String,
    /// The row's list of tool schemas, passed to the template as `tools`.
    pub tools: String,
}

impl Default for Fields {
    fn default() -> Self {
        let s = String::from;
        Self {
            messages: s("messages"),
            role: s("role"),
            content: s("content"),
            conversations: s("conversations"),
            from: s("from"),
            value: s("value"),
            instruction: s("instruction"),
            input: s("input"),
            output: s("output"),
            prompt: s("prompt"),
            completion: s("completion"),
            chosen: s("chosen"),
            rejected: s("rejected"),
            text: s("text"),
            label: s("label"),
            margin: s("margin"),
            tools: s("tools"),
        }
    }
}

/// What one row is, before templating and tokenization. `tools` is the row's list of tool
/// schemas (the template's `tools`; `None` when the row has none, as transformers passes
/// `tools=None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// A conversation; `prompt_len` messages form the prompt when the row said so
    /// (prompt/completion rows), else the prompt is everything before the last assistant turn.
    Chat {
        messages: Vec<Message>,
        prompt_len: Option<usize>,
        tools: Option<Vec<Value>>,
    },
    /// Plain text, no template: `prompt` then `completion` (EOS is appended when encoding).
    Text { prompt: String, completion: String },
    /// A preference pair of conversations: shared prompt messages, then each completion's.
    Pair {
        prompt: Vec<Message>,
        chosen: Vec<Message>,
        rejected: Vec<Message>,
        tools: Option<Vec<Value>>,
    },
    /// A preference pair of plain texts.
    TextPair {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// A completion of a conversation's prompt messages, desirable or not.
    Labeled {
        prompt: Vec<Message>,
        completion: Vec<Message>,
        desirable: bool,
        tools: Option<Vec<Value>>,
    },
    /// A completion of a plain-text prompt, desirable or not.
    TextLabeled {
        prompt: String,
        completion: String,
        desirable: bool,
    },
    /// A conversation's prompt messages alone, to be completed.
    Prompt {
        prompt: Vec<Message>,
        tools: Option<Vec<Value>>,
    },
    /// A plain-text prompt alone, to be completed.
    TextPrompt { prompt: String },
}

/// The Stanford Alpaca preambles.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

/// Turns one JSON row into a sample.
pub fn parse_row(
    row: &Value,
    format: RowFormat,
    fields: &Fields,
    alpaca: AlpacaStyle,
) -> Result<Sample, String> {
    let obj = row
        .as_object()
        .ok_or_else(|| format!("a row must be a JSON object, found {}", kind(row)))?;
    // A null field is an absent one (exports of mixed datasets fill missing columns with null).
    let has = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    let format = match format {
        RowFormat::Auto if has(&fields.chosen) && has(&fields.rejected) => RowFormat::Preference,
        RowFormat::Auto if has(&fields.prompt) && has(&fields.completion) && has(&fields.label) => {
            RowFormat::Unpaired
        }
        RowFormat::Auto if has(&fields.messages) => RowFormat::Messages,
        RowFormat::Auto if has(&fields.conversations) => RowFormat::Sharegpt,
        RowFormat::Auto if has(&fields.instruction) && has(&fields.output) => RowFormat::Alpaca,
        RowFormat::Auto if has(&fields.prompt) && has(&fields.completion) => {
            RowFormat::PromptCompletion
        }
        RowFormat::Auto if has(&fields.text) => RowFormat::Text,
        RowFormat::Auto if has(&fields.prompt) => RowFormat::Prompt,
        RowFormat::Auto => {
            return Err(format!(
                "cannot tell the row's shape from its fields ({}); set `format`",
                obj.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        f => f,
    };
    let field = |k: &str| obj.get(k).ok_or_else(|| format!("missing field `{k}`"));
    // ShareGPT rows keep their role and value only, so they carry no tools either.
    let row_tools = match format {
        RowFormat::Sharegpt => None,
        _ => tools(obj.get(&fields.tools), &fields.tools)?,
    };
    let sample = match format {
        RowFormat::Messages => {
            let messages = messages(field(&fields.messages)?, &fields.messages, fields, false)?;
            nonempty(&messages, &fields.messages)?;
            Sample::Chat {
                messages,
                prompt_len: None,
                tools: None,
            }
        }
        RowFormat::Sharegpt => {
            let messages = messages(
                field(&fields.conversations)?,
                &fields.conversations,
                fields,
                true,
            )?;
            nonempty(&messages, &fields.conversations)?;
            Sample::Chat {
                messages,
                prompt_len: None,
                tools: None,
            }
        }
        RowFormat::Alpaca => {
            let instruction = text(field(&fields.instruction)?, &fields.instruction)?;
            let input = match obj.get(&fields.input) {
                None | Some(Value::Null) => String::new(),
                Some(v) => text(v, &fields.input)?,
            };
            let output = text(field(&fields.output)?, &fields.output)?;
            match alpaca {
                AlpacaStyle::Chat => {
                    let user = if input.is_empty() {
                        instruction
                    } else {
                        format!("{instruction}\n\n{input}")
                    };
                    Sample::Chat {
                        messages: vec![
                            Message::new("user", user),
                            Message::new("assistant", output),
                        ],
                        prompt_len: Some(1),
                        tools: None,
                    }
                }
                AlpacaStyle::Plain if input.is_empty() => Sample::Text {
                    prompt: format!(
                        "{ALPACA_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n"
                    ),
                    completion: output,
                },
                AlpacaStyle::Plain => Sample::Text {
                    prompt: format!(
                        "{ALPACA_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
                    ),
                    completion: output,
                },
            }
        }
        RowFormat::PromptCompletion => {
            let (p, c) = (field(&fields.prompt)?, field(&fields.completion)?);
            match (p, c) {
                (Value::String(p), Value::String(c)) => Sample::Text {
                    prompt: p.clone(),
                    completion: c.clone(),
                },
                _ => {
                    let mut all = turns(p, &fields.prompt, fields)?;
                    let prompt_len = all.len();
                    all.extend(turns(c, &fields.completion, fields)?);
                    nonempty(&all, &fields.prompt)?;
                    Sample::Chat {
                        messages: all,
                        prompt_len: Some(prompt_len),
                        tools: None,
                    }
                }
            }
        }
        RowFormat::Preference => preference(obj, fields)?,
        RowFormat::Unpaired => {
            let desirable = label(field(&fields.label)?, &fields.label)?;
            match (field(&fields.prompt)?, field(&fields.completion)?) {
                (Value::String(p), Value::String(c)) => Sample::TextLabeled {
                    prompt: p.clone(),
                    completion: c.clone(),
                    desirable,
                },
                (p, c) => {
                    let completion = turns(c, &fields.completion, fields)?;
                    nonempty(&completion, &fields.completion)?;
                    Sample::Labeled {
                        prompt: turns(p, &fields.prompt, fields)?,
                        completion,
                        desirable,
                        tools: None,
                    }
                }
            }
        }
        RowFormat::Text => Sample::Text {
            prompt: String::new(),
            completion: text(field(&fields.text)?, &fields.text)?,
        },
        RowFormat::Prompt => match field(&fields.prompt)? {
            Value::String(p) if p.is_empty() => {
                return Err(format!(
                    "`{}` is empty: there is nothing to complete",
                    fields.prompt
                ));
            }
            Value::String(p) => Sample::TextPrompt { prompt: p.clone() },
            p => {
                let prompt = turns(p, &fields.prompt, fields)?;
                nonempty(&prompt, &fields.prompt)?;
                Sample::Prompt {
                    prompt,
                    tools: None,
                }
            }
        },
        RowFormat::Auto => unreachable!("resolved above"),
    };
    with_tools(sample, row_tools, &fields.tools)
}

/// `encoded` with what else its row holds that a trainer reads: a preference pair's margin (a
/// finite number, or absent or null for none), a prompt's other columns (for reward functions
/// that compare a completion with them).
pub fn with_row_fields(encoded: Encoded, row: &Value, fields: &Fields) -> Result<Encoded, String> {
    if let Encoded::Prompt(mut prompt) = encoded {
        if let Some(obj) = row.as_object() {
            prompt.columns = obj
                .iter()
                .filter(|(k, _)| **k != fields.prompt && **k != fields.tools)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        return Ok(Encoded::Prompt(prompt));
    }
    let Encoded::Pair(mut pair) = encoded else {
        return Ok(encoded);
    };
    let key = &fields.margin;
    pair.margin = match row.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64().map(|x| x as f32) {
            Some(x) if x.is_finite() => Some(x),
            _ => return Err(format!("`{key}` must be a finite number, found {n}")),
        },
        Some(other) => {
            return Err(format!(
                "`{key}` must be a number (the reward gap the chosen sequence must clear), found {}",
                kind(other)
            ));
        }
    };
    Ok(Encoded::Pair(pair))
}

/// `sample` carrying the row's tools; a plain-text sample cannot (no template renders it).
fn with_tools(
    mut sample: Sample,
    row_tools: Option<Vec<Value>>,
    key: &str,
) -> Result<Sample, String> {
    match &mut sample {
        Sample::Chat { tools, .. }
        | Sample::Pair { tools, .. }
        | Sample::Labeled { tools, .. }
        | Sample::Prompt { tools, .. } => *tools = row_tools,
        Sample::Text { .. }
        | Sample::TextPair { .. }
        | Sample::TextLabeled { .. }
        | Sample::TextPrompt { .. }
            if row_tools.is_some() =>
        {
            return Err(format!(
                "the row has `{key}`, but it is plain text, which no chat template renders, so the tools would be lost; give the row as messages or remove `{key}`"
            ));
        }
        Sample::Text { .. }
        | Sample::TextPair { .. }
        | Sample::TextLabeled { .. }
        | Sample::TextPrompt { .. } => {}
    }
    Ok(sample)
}

/// A row's list of tool schemas: absent or null is none; otherwise a list of JSON objects.
fn tools(v: Option<&Value>, key: &str) -> Result<Option<Vec<Value>>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) => {
            if let Some((i, t)) = list.iter().enumerate().find(|(_, t)| !t.is_object()) {
                return Err(format!(
                    "`{key}[{i}]` must be a tool's JSON schema (an object), found {}",
                    kind(t)
                ));
            }
            Ok(Some(list.clone()))
        }
        Some(Value::String(_)) => Err(format!(
            "`{key}` must be a list of tool schemas (JSON objects), found a string; if it holds JSON text, decode it into a list"
        )),
        Some(other) => Err(format!(
            "`{key}` must be a list of tool schemas (JSON objects), found {}",
            kind(other)
        )),
    }
}

fn preference(obj: &serde_json::Map<String, Value>, fields: &Fields) -> Result<Sample, String> {
    let get = |k: &str| obj.get(k).ok_or_else(|| format!("missing field `{k}`"));
    let (chosen, rejected) = (get(&fields.chosen)?, get(&fields.rejected)?);
    let prompt = obj.get(&fields.prompt).filter(|v| !v.is_null());
    let sample = match (prompt, chosen, rejected) {
        (Some(Value::String(p)), Value::String(c), Value::String(r)) => Sample::TextPair {
            prompt: p.clone(),
            chosen: c.clone(),
            rejected: r.clone(),
        },
        (Some(p), c, r) => Sample::Pair {
            prompt: turns(p, &fields.prompt, fields)?,
            chosen: turns(c, &fields.chosen, fields)?,
            rejected: turns(r, &fields.rejected, fields)?,
            tools: None,
        },
        (None, c, r) => {
            // Full conversations sharing a prefix: the shared messages are the prompt.
            let c = messages(c, &fields.chosen, fields, false)?;
            let r = messages(r, &fields.rejected, fields, false)?;
            let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if shared == 0 {
                return Err(format!(
                    "`{}` and `{}` share no prompt messages and there is no `{}`",
                    fields.chosen, fields.rejected, fields.prompt
                ));
            }
            Sample::Pair {
                prompt: c[..shared].to_vec(),
                chosen: c[shared..].to_vec(),
                rejected: r[shared..].to_vec(),
                tools: None,
            }
        }
    };
    match &sample {
        Sample::TextPair {
            chosen, rejected, ..
        } if chosen == rejected => Err("`chosen` is identical to `rejected`".into()),
        Sample::Pair {
            chosen, rejected, ..
        } if chosen == rejected => Err("`chosen` is identical to `rejected`".into()),
        Sample::Pair {
            chosen, rejected, ..
        } if chosen.is_empty() || rejected.is_empty() => {
            Err("a completion of the pair has no messages".into())
        }
        _ => Ok(sample),
    }
}

/// A prompt or completion given as text (one user or assistant turn) or as messages.
fn turns(v: &Value, key: &str, fields: &Fields) -> Result<Vec<Message>, String> {
    match v {
        Value::String(s) => {
            let role = if key == fields.prompt {
                "user"
            } else {
                "assistant"
            };
            Ok(vec![Message::new(role, s.clone())])
        }
        other => messages(other, key, fields, false),
    }
}

fn nonempty(messages: &[Message], key: &str) -> Result<(), String> {
    if messages.is_empty() {
        Err(format!("`{key}` is an empty conversation"))
    } else {
        Ok(())
    }
}

/// A list of messages; `sharegpt` reads `from`/`value` and maps ShareGPT's role names.
fn messages(v: &Value, key: &str, fields: &Fields, sharegpt: bool) -> Result<Vec<Message>, String> {
    let list = v
        .as_array()
        .ok_or_else(|| format!("`{key}` must be a list of messages, found {}", kind(v)))?;
    let (role_key, content_key) = if sharegpt {
        (&fields.from, &fields.value)
    } else {
        (&fields.role, &fields.content)
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("`{key}[{i}]`");
            let obj = m
                .as_object()
                .ok_or_else(|| format!("{at} must be an object, found {}", kind(m)))?;
            let role = obj
                .get(role_key)
                .ok_or_else(|| format!("{at} has no `{role_key}`"))?
                .as_str()
                .ok_or_else(|| format!("{at}.{role_key} must be a string"))?;
            let role = if sharegpt {
                match role {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "chatgpt" | "bing" | "bard" => "assistant",
                    "system" => "system",
                    "tool" | "function" | "observation" => "tool",
                    other => return Err(format!("{at} has unknown ShareGPT role `{other}`")),
                }
            } else if ROLES.contains(&role) {
                role
            } else {
                return Err(format!(
                    "{at} has unknown role `{role}` (expected one of {})",
                    ROLES.join(", ")
                ));
            };
            // ShareGPT messages keep their role and value only.
            let extra: Map<String, Value> = if sharegpt {
                Map::new()
            } else {
                let mut extra = Map::new();
                for (k, v) in obj {
                    if k == role_key || k == content_key {
                        continue;
                    }
                    if k == "role" || k == "content" {
                        return Err(format!(
                            "{at} has `{k}` besides the configured `{role_key}` and `{content_key}`; rename or remove one"
                        ));
                    }
                    extra.insert(k.clone(), v.clone());
                }
                extra
            };
            let mut message = Message {
                role: role.to_string(),
                content: Content::Text(String::new()),
                extra,
            };
            message.content = match obj.get(content_key) {
                // An assistant turn that calls tools may have no text.
                None | Some(Value::Null) if role == "assistant" && message.has_tool_calls() => {
                    Content::Text(String::new())
                }
                Some(Value::String(s)) => Content::Text(s.clone()),
                Some(Value::Array(parts)) => Content::Parts(
                    parts
                        .iter()
                        .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(ContentPart {
                                kind: "text".into(),
                                text: t.clone(),
                            }),
                            _ => Err(format!(
                                "{at}.{content_key}: only {{\"type\": \"text\", \"text\": ...}} parts are supported"
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Some(other) => {
                    return Err(format!(
                        "{at}.{content_key} must be a string or a list of text parts, found {}",
                        kind(other)
                    ));
                }
                None => return Err(format!("{at} has no `{content_key}`")),
            };
            Ok(message)
        })
        .collect()
}

/// An unpaired completion's label: `true` or `false` (or 1 and 0, as tables export booleans).
fn label(v: &Value, key: &str) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        other => Err(format!(
            "`{key}` must be true (a desirable completion) or false (an undesirable one), found {}",
            match other {
                Value::Number(n) => format!("the number {n}"),
                _ => kind(other).to_string(),
            }
        )),
    }
}

fn text(v: &Value, key: &str) -> Result<String, String> {
    v.as_str()
        .map(String::from)
        .ok_or_else(|| format!("`{key}` must be a string, found {}", kind(v)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(row: Value) -> Result<Sample, String> {
        parse_row(&row, RowFormat::Auto, &Fields::default(), AlpacaStyle::Chat)
    }

    #[test]
    fn every_shape_is_recognised() {
        let chat = parse(json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]})).unwrap();
        assert!(
            matches!(chat, Sample::Chat { ref messages, prompt_len: None, tools: None } if messages[1].text() == "b")
        );
        let share = parse(json!({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})).unwrap();
        assert_eq!(
            share,
            Sample::Chat {
                messages: vec![Message::new("user", "a"), Message::new("assistant", "b")],
                prompt_len: None,
                tools: None,
            }
        );
        let alpaca = parse(json!({"instruction": "Do", "input": "x", "output": "done"})).unwrap();
        assert_eq!(
            alpaca,
            Sample::Chat {
                messages: vec![
                    Message::new("user", "Do\n\nx"),
                    Message::new("assistant", "done")
                ],
                prompt_len: Some(1),
                tools: None,
            }
        );
        let plain = parse_row(
            &json!({"instruction": "Do", "output": "done"}),
            RowFormat::Alpaca,
            &Fields::default(),
            AlpacaStyle::Plain,
        )
        .unwrap();
        assert!(
            matches!(plain, Sample::Text { ref prompt, ref completion } if prompt.ends_with("### Instruction:\nDo\n\n### Response:\n") && completion == "done")
        );
        let doc = parse(json!({"text": "one two three"})).unwrap();
        assert_eq!(
            doc,
            Sample::Text {
                prompt: String::new(),
                completion: "one two three".into()
            }
        );
        let pc = parse(json!({"prompt": "p", "completion": "c"})).unwrap();
        assert_eq!(
            pc,
            Sample::Text {
                prompt: "p".into(),
                completion: "c".into()
            }
        );
        let pcm = parse(json!({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]})).unwrap();
        assert!(
            matches!(pcm, Sample::Chat { prompt_len: Some(1), ref messages, .. } if messages.len() == 2)
        );
        let exported = parse(json!({"chosen": null, "rejected": null, "prompt": null, "messages": [{"role": "user", "content": "a"}]})).unwrap();
        assert!(matches!(exported, Sample::Chat { ref messages, .. } if messages.len() == 1));
        let no_prompt = parse(json!({"prompt": null,
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
            "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}))
        .unwrap();
        assert!(matches!(no_prompt, Sample::Pair { ref prompt, .. } if prompt.len() == 1));
        let pair = parse(json!({"prompt": "p", "chosen": "c", "rejected": "r"})).unwrap();
        assert!(matches!(pair, Sample::TextPair { .. }));
        let implicit = parse(json!({
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "bad"}]
        }))
        .unwrap();
        assert_eq!(
            implicit,
            Sample::Pair {
                prompt: vec![Message::new("user", "p")],
                chosen: vec![Message::new("assistant", "good")],
                rejected: vec![Message::new("assistant", "bad")],
                tools: None,
            }
        );
    }

    /// A pair's margin is a finite number or absent; other rows keep no margin.
    #[test]
    fn preference_pairs_carry_their_margin() {
        let pair = || {
            Encoded::Pair(crate::example::PairExample {
                prompt_ids: vec![1],
                chosen_ids: vec![2],
                rejected_ids: vec![3],
                margin: None,
            })
        };
        let margin = |row: Value| match with_row_fields(pair(), &row, &Fields::default()) {
            Ok(Encoded::Pair(p)) => Ok(p.margin),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(margin(json!({"margin": 1.5})), Ok(Some(1.5)));
        assert_eq!(margin(json!({"margin": -2})), Ok(Some(-2.0)));
        assert_eq!(margin(json!({"margin": null})), Ok(None));
        assert_eq!(margin(json!({})), Ok(None));
        let err = margin(json!({"margin": "high"})).unwrap_err();
        assert!(err.contains("`margin` must be a number"), "{err}");
        let err = margin(json!({"margin": 1e300})).unwrap_err();
        assert!(err.contains("finite"), "{err}");
    }

    /// A `prompt` alone is a prompt to complete, as text or messages; an empty one is refused.
    #[test]
    fn prompt_only_rows_are_prompts() {
        assert_eq!(
            parse(json!({"prompt": "Once upon a time"})).unwrap(),
            Sample::TextPrompt {
                prompt: "Once upon a time".into()
            }
        );
        let chat = parse(json!({"prompt": [{"role": "user", "content": "hi"}], "answer": "42"}));
        assert!(matches!(chat, Ok(Sample::Prompt { ref prompt, .. }) if prompt.len() == 1));
        // A completion makes it a prompt/completion row.
        assert!(matches!(
            parse(json!({"prompt": "p", "completion": "c"})),
            Ok(Sample::Text { .. })
        ));
        let err = parse(json!({"prompt": ""})).unwrap_err();
        assert!(err.contains("nothing to complete"), "{err}");
    }

    #[test]
    fn unpaired_rows_are_labeled_completions() {
        let text = parse(json!({"prompt": "p", "completion": "c", "label": false})).unwrap();
        assert_eq!(
            text,
            Sample::TextLabeled {
                prompt: "p".into(),
                completion: "c".into(),
                desirable: false
            }
        );
        let tool = json!({"type": "function", "function": {"name": "f", "parameters": {}}});
        let chat = parse(json!({
            "prompt": [{"role": "user", "content": "p"}],
            "completion": [{"role": "assistant", "content": "c"}],
            "label": 1,
            "tools": [tool]
        }))
        .unwrap();
        assert_eq!(
            chat,
            Sample::Labeled {
                prompt: vec![Message::new("user", "p")],
                completion: vec![Message::new("assistant", "c")],
                desirable: true,
                tools: Some(vec![tool]),
            }
        );
        let unpaired = |row: Value| {
            parse_row(
                &row,
                RowFormat::Unpaired,
                &Fields::default(),
                AlpacaStyle::Chat,
            )
            .unwrap_err()
        };
        for (row, reason) in [
            (
                json!({"prompt": "p", "completion": "c", "label": "yes"}),
                "`label` must be true (a desirable completion) or false (an undesirable one), found a string",
            ),
            (
                json!({"prompt": "p", "completion": "c", "label": 2}),
                "found the number 2",
            ),
            (
                json!({"prompt": "p", "completion": "c"}),
                "missing field `label`",
            ),
            (
                json!({"prompt": [{"role": "user", "content": "p"}], "completion": [], "label": true}),
                "`completion` is an empty conversation",
            ),
        ] {
            let err = unpaired(row);
            assert!(err.contains(reason), "{err}");
        }
    }

    #[test]
    fn other_message_keys_and_row_tools_are_kept() {
        let call = json!({"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
        let tool =
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {}}});
        let row = json!({
            "messages": [
                {"role": "user", "content": "Weather?", "name": "ann"},
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
                {"role": "assistant", "content": "Sunny.", "reasoning_content": "easy", "tool_calls": null}
            ],
            "tools": [tool]
        });
        let Sample::Chat {
            messages, tools, ..
        } = parse(row).unwrap()
        else {
            panic!("a conversation")
        };
        assert_eq!(tools, Some(vec![tool.clone()]));
        assert_eq!(messages[0].extra["name"], "ann");
        assert_eq!(messages[1].content, Content::Text(String::new()));
        assert_eq!(messages[1].extra["tool_calls"], json!([call]));
        assert!(messages[1].has_tool_calls());
        assert_eq!(messages[2].extra["tool_call_id"], "c1");
        assert_eq!(messages[3].extra["reasoning_content"], "easy");
        assert!(messages[3].extra["tool_calls"].is_null());
        assert!(!messages[3].has_tool_calls());
        // A conversational preference pair carries the row's tools too.
        let pair = parse(json!({
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
            "rejected": [{"role": "assistant", "content": "no"}],
            "tools": [tool]
        }))
        .unwrap();
        assert!(
            matches!(pair, Sample::Pair { ref chosen, tools: Some(ref t), .. } if t.len() == 1 && chosen[0].has_tool_calls())
        );
        // ShareGPT messages keep their role and value only.
        let share = parse(json!({"conversations": [{"from": "human", "value": "a", "weight": 0}]}))
            .unwrap();
        assert!(matches!(share, Sample::Chat { ref messages, .. } if messages[0].extra.is_empty()));
    }

    #[test]
    fn field_names_are_configurable() {
        let fields: Fields = serde_json::from_value(
            json!({"messages": "dialog", "role": "speaker", "content": "text", "tools": "functions"}),
        )
        .unwrap();
        let s = parse_row(
            &json!({"dialog": [{"speaker": "user", "text": "a"}], "functions": [{"name": "f"}]}),
            RowFormat::Messages,
            &fields,
            AlpacaStyle::Chat,
        )
        .unwrap();
        assert!(
            matches!(s, Sample::Chat { ref messages, tools: Some(ref t), .. } if messages[0] == Message::new("user", "a") && t[0] == json!({"name": "f"}))
        );
        let err = parse_row(
            &json!({"dialog": [{"speaker": "user", "text": "a", "role": "user"}]}),
            RowFormat::Messages,
            &fields,
            AlpacaStyle::Chat,
        )
        .unwrap_err();
        assert!(
            err.contains("`dialog[0]` has `role` besides the configured `speaker` and `text`"),
            "{err}"
        );
        assert!(serde_json::from_value::<Fields>(json!({"mesages": "x"})).is_err());
    }

    #[test]
    fn bad_rows_say_why() {
        let cases = [
            (json!([1]), "must be a JSON object"),
            (json!({"messages": "hi"}), "must be a list of messages"),
            (json!({"messages": []}), "empty conversation"),
            (
                json!({"messages": [{"role": "robot", "content": "a"}]}),
                "unknown role `robot`",
            ),
            (
                json!({"messages": [{"role": "user", "content": 3}]}),
                "must be a string or a list",
            ),
            (json!({"messages": [{"role": "user"}]}), "has no `content`"),
            (
                json!({"conversations": [{"from": "alien", "value": "a"}]}),
                "unknown ShareGPT role",
            ),
            (
                json!({"instruction": 1, "output": "x"}),
                "`instruction` must be a string",
            ),
            (
                json!({"prompt": "p", "chosen": "same", "rejected": "same"}),
                "identical",
            ),
            (json!({"body": "x"}), "cannot tell the row's shape"),
            (json!({"text": 1}), "`text` must be a string"),
            (
                json!({"messages": [{"role": "assistant", "content": null}]}),
                "`messages[0]`.content must be a string or a list of text parts, found null",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": []}]}),
                "`messages[0]` has no `content`",
            ),
            (
                json!({"messages": ["hi"]}),
                "`messages[0]` must be an object",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "tools": "[{}]"}),
                "`tools` must be a list of tool schemas (JSON objects), found a string; if it holds JSON text, decode it",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}], "tools": [1]}),
                "`tools[0]` must be a tool's JSON schema (an object), found a number",
            ),
            (
                json!({"text": "doc", "tools": [{"name": "f"}]}),
                "the row has `tools`, but it is plain text",
            ),
        ];
        for (row, reason) in cases {
            let err = parse(row.clone()).unwrap_err();
            assert!(err.contains(reason), "{row}: {err}");
        }
    }
}
