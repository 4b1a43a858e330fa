//! Tokenization and loss masks: a [`Sample`] becomes an [`Example`] (token ids and which of them
//! are trained) or a [`PairExample`] for preference training. Assistant spans come from the
//! template's `{% generation %}` blocks when it has them, otherwise from rendering prefixes of the
//! conversation (the text an assistant turn adds is what the prefix with the generation prompt
//! does not already hold). A token is trained when its bytes overlap a trained span, exactly as
//! transformers' `return_assistant_tokens_mask` decides, so a BPE merge across a role boundary is
//! trained. The end-of-turn token lies inside the span, so it is trained.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::format::Sample;
use crate::message::Message;
use crate::template::ChatTemplate;
use crate::tokenizer::{Offsets, Tokenizer};

/// Which tokens the loss is computed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainOn {
    /// Every token.
    All,
    /// Every assistant turn, its end-of-turn token included.
    #[default]
    Assistant,
    /// The last assistant turn only.
    LastTurn,
    /// Everything after the prompt.
    Completion,
}

/// One training sequence. `labels_mask[i]` says whether token `i` is a target: the trainer
/// predicts `input_ids[i]` from `input_ids[..i]` where it is true (position 0 is never a target
/// of a causal loss, whatever its mask says).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels_mask: Vec<bool>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.labels_mask.iter().filter(|&&m| m).count()
    }
}

/// A preference pair: the shared prompt's ids, then each completion's ids (the whole completion
/// is trained, its end-of-turn token included). `prompt_ids + chosen_ids` is the chosen sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairExample {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

impl PairExample {
    /// The chosen sequence with its completion mask.
    pub fn chosen(&self) -> Example {
        join(&self.prompt_ids, &self.chosen_ids)
    }

    /// The rejected sequence with its completion mask.
    pub fn rejected(&self) -> Example {
        join(&self.prompt_ids, &self.rejected_ids)
    }
}

fn join(prompt: &[u32], completion: &[u32]) -> Example {
    Example {
        input_ids: prompt.iter().chain(completion).copied().collect(),
        labels_mask: std::iter::repeat_n(false, prompt.len())
            .chain(std::iter::repeat_n(true, completion.len()))
            .collect(),
    }
}

/// An encoded sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoded {
    Single(Example),
    Pair(PairExample),
}

/// Renders and tokenizes samples; cheap to share across threads.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub train_on: TrainOn,
    /// Extra template variables (`apply_chat_template`'s keyword arguments).
    pub template_vars: serde_json::Map<String, serde_json::Value>,
}

impl Encoder {
    /// A new encoder with no extra template variables.
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate, train_on: TrainOn) -> Self {
        Self {
            tokenizer,
            template,
            train_on,
            template_vars: Default::default(),
        }
    }

    /// Encodes one sample; the error is the reason the row cannot be used.
    pub fn encode(&self, sample: &Sample) -> Result<Encoded, String> {
        match sample {
            Sample::Chat {
                messages,
                prompt_len,
            } => self.encode_chat(messages, *prompt_len).map(Encoded::Single),
            Sample::Text { prompt, completion } => {
                self.encode_text(prompt, completion).map(Encoded::Single)
            }
            Sample::Pair {
                prompt,
                chosen,
                rejected,
            } => self
                .encode_pair(prompt, chosen, rejected)
                .map(Encoded::Pair),
            Sample::TextPair {
                prompt,
                chosen,
                rejected,
            } => {
                let eos = self.tokenizer.special.eos_token.clone().unwrap_or_default();
                let prompt_ids = self.tokenize(prompt)?.0;
                let completion = |c: &str| {
                    self.tokenizer
                        .encode(&format!("{c}{eos}"), false)
                        .map_err(|e| e.to_string())
                };
                Ok(Encoded::Pair(PairExample {
                    prompt_ids,
                    chosen_ids: completion(chosen)?,
                    rejected_ids: completion(rejected)?,
                }))
            }
        }
    }

    fn render(&self, messages: &[Message], agp: bool) -> Result<crate::Rendered, String> {
        self.template
            .render_spans(messages, agp, &self.tokenizer.special, &self.template_vars)
            .map_err(|e| e.to_string())
    }

    /// Tokens and byte offsets of `text`, with the tokenizer's BOS exactly once: the
    /// post-processor runs unless the text already starts with the BOS token.
    fn tokenize(&self, text: &str) -> Result<(Vec<u32>, Vec<Offsets>), String> {
        let bos = self.tokenizer.special.bos_token.as_deref();
        let add_special = !bos.is_some_and(|b| !b.is_empty() && text.starts_with(b));
        self.tokenizer
            .encode_with_offsets(text, add_special)
            .map_err(|e| e.to_string())
    }

    /// Byte spans of the assistant turns of `rendered` (the render of `messages` without the
    /// generation prompt): its `{% generation %}` spans, or else found by rendering prefixes.
    pub fn assistant_spans(
        &self,
        messages: &[Message],
        rendered: &crate::Rendered,
    ) -> Result<Vec<Range<usize>>, String> {
        if self.template.has_generation_blocks() {
            Ok(rendered.generation_spans.clone())
        } else {
            self.prefix_spans(messages, &rendered.text)
        }
    }

    /// Span of the text each assistant turn adds, found by rendering prefixes.
    fn prefix_spans(&self, messages: &[Message], full: &str) -> Result<Vec<Range<usize>>, String> {
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?.text;
            let upto = self.render(&messages[..=i], false)?.text;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(format!(
                    "the chat template renders message {i} differently once later messages follow, so its assistant tokens cannot be found; use a template with {{% generation %}} blocks or train_on = \"all\""
                ));
            }
            spans.push(before.len()..upto.len());
        }
        Ok(spans)
    }

    fn encode_chat(
        &self,
        messages: &[Message],
        prompt_len: Option<usize>,
    ) -> Result<Example, String> {
        let rendered = self.render(messages, false)?;
        let text = &rendered.text;
        let spans: Vec<Range<usize>> = match self.train_on {
            TrainOn::All => vec![whole(text)],
            TrainOn::Assistant | TrainOn::LastTurn => {
                let mut spans = self.assistant_spans(messages, &rendered)?;
                if self.train_on == TrainOn::LastTurn {
                    spans = spans.pop().into_iter().collect();
                }
                spans
            }
            TrainOn::Completion => {
                let prompt_len = match prompt_len {
                    Some(n) => n,
                    None => messages
                        .iter()
                        .rposition(|m| m.role == "assistant")
                        .ok_or("no assistant turn to train on")?,
                };
                let prompt = self.render(&messages[..prompt_len], true)?.text;
                if !text.starts_with(&prompt) {
                    return Err("the rendered prompt is not a prefix of the rendered conversation, so the completion cannot be found".into());
                }
                vec![Range {
                    start: prompt.len(),
                    end: text.len(),
                }]
            }
        };
        let (ids, offsets) = self.tokenize(text)?;
        let example = Example {
            labels_mask: mask_from_spans(&offsets, &spans),
            input_ids: ids,
        };
        if example.trained() == 0 {
            return Err("no assistant turn to train on".into());
        }
        Ok(example)
    }

    fn encode_text(&self, prompt: &str, completion: &str) -> Result<Example, String> {
        let eos = self.tokenizer.special.eos_token.as_deref().unwrap_or("");
        let text = if completion.ends_with(eos) {
            format!("{prompt}{completion}")
        } else {
            format!("{prompt}{completion}{eos}")
        };
        let span = match self.train_on {
            TrainOn::All => whole(&text),
            _ => Range {
                start: prompt.len(),
                end: text.len(),
            },
        };
        let (ids, offsets) = self.tokenize(&text)?;
        let example = Example {
            labels_mask: mask_from_spans(&offsets, &[span]),
            input_ids: ids,
        };
        if example.trained() == 0 {
            return Err("the completion is empty: nothing to train on".into());
        }
        Ok(example)
    }

    fn encode_pair(
        &self,
        prompt: &[Message],
        chosen: &[Message],
        rejected: &[Message],
    ) -> Result<PairExample, String> {
        let prompt_text = self.render(prompt, true)?.text;
        let (prompt_ids, _) = self.tokenize(&prompt_text)?;
        let completion = |c: &[Message]| -> Result<Vec<u32>, String> {
            let all: Vec<Message> = prompt.iter().chain(c).cloned().collect();
            let full = self.render(&all, false)?.text;
            let rest = full.strip_prefix(prompt_text.as_str()).ok_or(
                "the rendered prompt is not a prefix of the rendered conversation, so the completion cannot be found",
            )?;
            let ids = self
                .tokenizer
                .encode(rest, false)
                .map_err(|e| e.to_string())?;
            if ids.is_empty() {
                return Err("a completion of the pair renders to no tokens".into());
            }
            Ok(ids)
        };
        Ok(PairExample {
            chosen_ids: completion(chosen)?,
            rejected_ids: completion(rejected)?,
            prompt_ids,
        })
    }
}

/// The span of all of `text`.
fn whole(text: &str) -> Range<usize> {
    Range {
        start: 0,
        end: text.len(),
    }
}

/// `true` for every token whose byte range overlaps one of `spans` (both sorted).
pub fn mask_from_spans(offsets: &[Offsets], spans: &[Range<usize>]) -> Vec<bool> {
    let mut mask = vec![false; offsets.len()];
    let mut s = 0;
    for (i, &(start, end)) in offsets.iter().enumerate() {
        while s < spans.len() && start >= spans[s].end {
            s += 1;
        }
        if s == spans.len() {
            break;
        }
        mask[i] = end > spans[s].start;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_rule_marks_straddling_tokens() {
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (0, 0)];
        assert_eq!(
            mask_from_spans(&offsets, &[Range { start: 3, end: 6 }]),
            vec![false, true, true, false, false]
        );
        // Like transformers: an empty offset inside a span counts when it lies past its start.
        assert_eq!(
            mask_from_spans(&offsets, &[0..1, 6..7]),
            vec![true, false, false, true, false]
        );
    }
}
