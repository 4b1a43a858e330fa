//! Named built-in chat templates for checkpoints that ship none. Each renders exactly what the
//! model family's own template renders for plain conversations (checked against the originals in
//! the golden tests) and wraps every assistant turn, end-of-turn token included, in
//! `{% generation %}` so loss masks come straight from the template. None renders tool calls,
//! tool schemas or reasoning, and only some render `tool` turns; [`Builtin::check`] rejects a
//! conversation holding what its template would leave out.

use serde_json::Value;

use crate::message::Message;

/// The names [`crate::ChatTemplate::builtin`] accepts.
pub const BUILTIN_TEMPLATES: [&str; 7] = [
    "chatml", "llama3", "mistral", "gemma", "phi3", "zephyr", "alpaca",
];

/// ChatML (Qwen, SmolLM, many fine-tunes): `<|im_start|>role\n…<|im_end|>\n`.
const CHATML: &str = concat!(
    "{%- for message in messages -%}",
    "{{- '<|im_start|>' + message.role + '\\n' -}}",
    "{%- if message.role == 'assistant' -%}",
    "{%- generation -%}{{- message.content + '<|im_end|>\\n' -}}{%- endgeneration -%}",
    "{%- else -%}{{- message.content + '<|im_end|>\\n' -}}{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
);

/// Llama 3 / 3.1 without tools or date header: BOS, then
/// `<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`, contents trimmed.
const LLAMA3: &str = concat!(
    "{{- bos_token -}}",
    "{%- for message in messages -%}",
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' -}}",
    "{%- if message.role == 'assistant' -%}",
    "{%- generation -%}{{- message.content | trim + '<|eot_id|>' -}}{%- endgeneration -%}",
    "{%- else -%}{{- message.content | trim + '<|eot_id|>' -}}{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}",
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
    "{%- endif -%}",
);

/// Mistral instruct (v0.1–v0.3 style): `<s>[INST] user [/INST]assistant</s>`; a system message
/// is prepended to the first user turn; roles must alternate.
const MISTRAL: &str = concat!(
    "{%- if messages and messages[0].role == 'system' -%}",
    "{%- set system = messages[0].content + '\\n\\n' -%}{%- set turns = messages[1:] -%}",
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}",
    "{{- bos_token -}}",
    "{%- for message in turns -%}",
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}",
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}",
    "{%- endif -%}",
    "{%- if message.role == 'user' -%}",
    "{%- if loop.first -%}{{- '[INST] ' + system + message.content + ' [/INST]' -}}",
    "{%- else -%}{{- '[INST] ' + message.content + ' [/INST]' -}}{%- endif -%}",
    "{%- elif message.role == 'assistant' -%}",
    "{%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}",
    "{%- else -%}{{- raise_exception('Only user and assistant roles are supported') -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
);

/// Gemma / Gemma 2: BOS, `<start_of_turn>user|model\n…<end_of_turn>\n`, contents trimmed; no
/// system role; roles must alternate.
const GEMMA: &str = concat!(
    "{{- bos_token -}}",
    "{%- if messages and messages[0].role == 'system' -%}",
    "{{- raise_exception('System role not supported') -}}{%- endif -%}",
    "{%- for message in messages -%}",
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}",
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}",
    "{%- endif -%}",
    "{%- if message.role == 'assistant' -%}",
    "{{- '<start_of_turn>model\\n' -}}",
    "{%- generation -%}{{- message.content | trim + '<end_of_turn>\\n' -}}{%- endgeneration -%}",
    "{%- else -%}",
    "{{- '<start_of_turn>' + message.role + '\\n' + message.content | trim + '<end_of_turn>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}",
);

/// Phi-3: `<|role|>\n…<|end|>\n`, then `<|assistant|>\n` as the prompt or EOS after the last turn.
const PHI3: &str = concat!(
    "{%- for message in messages -%}",
    "{%- if message.role == 'assistant' -%}",
    "{{- '<|assistant|>\\n' -}}",
    "{%- generation -%}{{- message.content + '<|end|>\\n' -}}{%- endgeneration -%}",
    "{%- elif message.role in ['system', 'user'] -%}",
    "{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}",
);

/// Zephyr: `<|role|>\n…</s>\n` (EOS as end of turn).
const ZEPHYR: &str = concat!(
    "{%- for message in messages -%}",
    "{{- '<|' + message.role + '|>\\n' -}}",
    "{%- if message.role == 'assistant' -%}",
    "{%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}{{- '\\n' -}}",
    "{%- else -%}{{- message.content + eos_token + '\\n' -}}{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}",
);

/// Alpaca: the Stanford Alpaca preamble (or the system message), `### Instruction:` for user
/// turns and `### Response:` for assistant turns, which end with EOS.
const ALPACA: &str = concat!(
    "{%- if messages and messages[0].role == 'system' -%}",
    "{{- messages[0].content + '\\n\\n' -}}{%- set turns = messages[1:] -%}",
    "{%- else -%}",
    "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' -}}",
    "{%- set turns = messages -%}",
    "{%- endif -%}",
    "{%- for message in turns -%}",
    "{%- if message.role == 'user' -%}{{- '### Instruction:\\n' + message.content + '\\n\\n' -}}",
    "{%- elif message.role == 'assistant' -%}",
    "{{- '### Response:\\n' -}}",
    "{%- generation -%}{{- message.content + eos_token -}}{%- endgeneration -%}{{- '\\n\\n' -}}",
    "{%- else -%}{{- raise_exception('Alpaca supports system, user and assistant roles only') -}}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}",
);

/// Message keys other templates render as text, which no built-in renders.
const UNRENDERED_KEYS: [&str; 3] = ["tool_calls", "reasoning_content", "thinking"];

/// A built-in template and what it can render.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Builtin {
    pub source: &'static str,
    /// Whether `tool` turns are rendered (as a turn of their own role); the others raise on
    /// them, or leave them out.
    tool_turns: bool,
}

impl Builtin {
    /// The built-in named `name`.
    pub(crate) fn get(name: &str) -> Option<Self> {
        let (source, tool_turns) = match name {
            "chatml" => (CHATML, true),
            "llama3" => (LLAMA3, true),
            "mistral" => (MISTRAL, false),
            "gemma" => (GEMMA, false),
            "phi3" => (PHI3, false),
            "zephyr" => (ZEPHYR, true),
            "alpaca" => (ALPACA, false),
            _ => return None,
        };
        Some(Self { source, tool_turns })
    }

    /// Rejects a conversation holding what this template would not render: tool schemas, a
    /// message's tool calls or reasoning, or (where it has no such turn) a `tool` turn.
    pub(crate) fn check(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
    ) -> Result<(), String> {
        const ADVICE: &str = "which this built-in template does not render; use the model's own chat template instead";
        if tools.is_some_and(|t| !t.is_empty()) {
            return Err(format!("the row has `tools`, {ADVICE}"));
        }
        for (i, m) in messages.iter().enumerate() {
            if let Some(key) = UNRENDERED_KEYS.iter().find(|k| m.field(k).is_some()) {
                return Err(format!(
                    "message {i} (counting from 0) has `{key}`, {ADVICE}"
                ));
            }
            if m.role == "tool" && !self.tool_turns {
                return Err(format!(
                    "message {i} (counting from 0) has role `tool`, {ADVICE}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatTemplate, Message, SpecialTokens};

    fn special() -> SpecialTokens {
        SpecialTokens {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            ..Default::default()
        }
    }

    fn chat() -> Vec<Message> {
        vec![
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello"),
            Message::new("user", "Bye"),
        ]
    }

    #[test]
    fn every_builtin_compiles_and_marks_assistant_turns() {
        for name in BUILTIN_TEMPLATES {
            let t = ChatTemplate::builtin(name).unwrap();
            assert!(t.has_generation_blocks(), "{name}");
            let r = t
                .render_spans(&chat(), None, true, &special(), &Default::default())
                .unwrap();
            assert_eq!(r.generation_spans.len(), 1, "{name}: {}", r.text);
            assert!(
                r.text[r.generation_spans[0].clone()].starts_with("Hello"),
                "{name}"
            );
        }
        assert!(ChatTemplate::builtin("vicuna").is_err());
    }

    #[test]
    fn mistral_and_zephyr_render_their_layout() {
        let mistral = ChatTemplate::builtin("mistral").unwrap();
        assert_eq!(
            mistral.render(&chat(), false, &special()).unwrap(),
            "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]"
        );
        let zephyr = ChatTemplate::builtin("zephyr").unwrap();
        assert_eq!(
            zephyr.render(&chat()[..2], true, &special()).unwrap(),
            "<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|assistant|>\n"
        );
    }
}
