//! Tokenization and loss masks: a [`Sample`] becomes an [`Example`] (token ids and which of them
//! are trained), a [`PairExample`] for preference training, or a [`LabeledExample`] for training
//! on unpaired preferences. Assistant spans come from the
//! template's `{% generation %}` blocks when it has them, otherwise from rendering prefixes of the
//! conversation (the text an assistant turn adds is what the prefix with the generation prompt
//! does not already hold). A token is trained when its bytes overlap a trained span, exactly as
//! transformers' `return_assistant_tokens_mask` decides, so a BPE merge across a role boundary is
//! trained. The end-of-turn token lies inside the span, so it is trained.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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

    /// Number of tokens the loss is computed on: trained tokens after position 0 (the first token
    /// is never predicted, whatever its mask says).
    pub fn trained(&self) -> usize {
        self.labels_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// A preference pair: the shared prompt's ids, then each completion's ids (the whole completion
/// is trained, its end-of-turn token included). `prompt_ids + chosen_ids` is the chosen sequence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairExample {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    /// The reward gap the chosen sequence must clear (TRL's reward-model `margin` column);
    /// read by reward models only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f32>,
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

/// A completion labeled desirable or not (unpaired preference training, KTO): the prompt's ids,
/// then the completion's (all of it trained, as a pair's sides are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabeledExample {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub desirable: bool,
}

impl LabeledExample {
    /// The sequence with its completion mask.
    pub fn example(&self) -> Example {
        join(&self.prompt_ids, &self.completion_ids)
    }
}

/// A prompt to be completed (GRPO's rows): its ids (the conversation rendered with the
/// generation prompt, or the text), and what a reward model re-reads with a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptExample {
    pub prompt_ids: Vec<u32>,
    pub source: PromptSource,
    /// The row's other fields (an `answer` a reward function compares completions with, ...).
    pub columns: serde_json::Map<String, Value>,
}

/// A prompt as its row gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSource {
    /// Messages (and the row's tools), to which a completion is one more assistant turn.
    Chat {
        messages: Vec<Message>,
        tools: Option<Vec<Value>>,
    },
    /// Plain text, which a completion continues.
    Text(String),
}

impl Encoder {
    /// The text of `prompt` followed by `completion` (decoded), as a reward model reads it: the
    /// conversation with the completion as an assistant turn, through the template without the
    /// generation prompt, or the prompt's text with the completion's appended (TRL's GRPO).
    pub fn completed_text(
        &self,
        prompt: &PromptSource,
        completion: &str,
    ) -> Result<String, String> {
        match prompt {
            PromptSource::Chat { messages, tools } => {
                let mut all = messages.clone();
                all.push(Message::new("assistant", completion));
                Ok(self.render(&all, tools.as_deref(), false)?.text)
            }
            PromptSource::Text(text) => Ok(format!("{text}{completion}")),
        }
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
#[derive(Debug, Clone, PartialEq)]
pub enum Encoded {
    Single(Example),
    Pair(PairExample),
    Labeled(LabeledExample),
    Prompt(PromptExample),
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
                tools,
            } => self
                .encode_chat(messages, tools.as_deref(), *prompt_len)
                .map(Encoded::Single),
            Sample::Text { prompt, completion } => {
                self.encode_text(prompt, completion).map(Encoded::Single)
            }
            Sample::Pair {
                prompt,
                chosen,
                rejected,
                tools,
            } => self
                .encode_pair(prompt, chosen, rejected, tools.as_deref())
                .map(Encoded::Pair),
            Sample::TextPair {
                prompt,
                chosen,
                rejected,
            } => self
                .encode_text_pair(prompt, chosen, rejected)
                .map(Encoded::Pair),
            Sample::Labeled {
                prompt,
                completion,
                desirable,
                tools,
            } => {
                self.check_completion_turns("completion", completion)?;
                let prompt_text = self.render(prompt, tools.as_deref(), true)?.text;
                let labeled = LabeledExample {
                    prompt_ids: self.tokenize(&prompt_text)?.0,
                    completion_ids: self.chat_completion_ids(
                        prompt,
                        &prompt_text,
                        completion,
                        tools.as_deref(),
                    )?,
                    desirable: *desirable,
                };
                check_labeled(&labeled)?;
                Ok(Encoded::Labeled(labeled))
            }
            Sample::Prompt { prompt, tools } => {
                let text = self.render(prompt, tools.as_deref(), true)?.text;
                Ok(Encoded::Prompt(PromptExample {
                    prompt_ids: self.tokenize(&text)?.0,
                    source: PromptSource::Chat {
                        messages: prompt.clone(),
                        tools: tools.clone(),
                    },
                    columns: Default::default(),
                }))
            }
            Sample::TextPrompt { prompt } => Ok(Encoded::Prompt(PromptExample {
                prompt_ids: self.tokenize(prompt)?.0,
                source: PromptSource::Text(prompt.clone()),
                columns: Default::default(),
            })),
            Sample::TextLabeled {
                prompt,
                completion,
                desirable,
            } => {
                let labeled = LabeledExample {
                    prompt_ids: self.tokenize(prompt)?.0,
                    completion_ids: self.text_completion_ids("completion", completion)?,
                    desirable: *desirable,
                };
                check_labeled(&labeled)?;
                Ok(Encoded::Labeled(labeled))
            }
        }
    }

    /// `text` ending with the end-of-sequence token exactly once.
    fn with_eos(&self, text: &str) -> String {
        match self.tokenizer.special.eos_token.as_deref() {
            Some(eos) if !text.ends_with(eos) => format!("{text}{eos}"),
            _ => text.to_string(),
        }
    }

    /// Whether `text` holds nothing but (at most) the end-of-sequence token.
    fn is_blank_completion(&self, text: &str) -> bool {
        let eos = self.tokenizer.special.eos_token.as_deref().unwrap_or("");
        text.is_empty() || text == eos
    }

    fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        agp: bool,
    ) -> Result<crate::Rendered, String> {
        self.template
            .render_spans(
                messages,
                tools,
                agp,
                &self.tokenizer.special,
                &self.template_vars,
            )
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

    /// Byte spans of the assistant turns of `rendered` (the render of `messages` with `tools`,
    /// without the generation prompt): its `{% generation %}` spans, or else found by rendering
    /// prefixes.
    pub fn assistant_spans(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        rendered: &crate::Rendered,
    ) -> Result<Vec<Range<usize>>, String> {
        if self.template.has_generation_blocks() {
            Ok(rendered.generation_spans.clone())
        } else {
            self.prefix_spans(messages, tools, &rendered.text)
        }
    }

    /// Span of the text each assistant turn adds, found by rendering prefixes.
    fn prefix_spans(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        full: &str,
    ) -> Result<Vec<Range<usize>>, String> {
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], tools, true)?.text;
            let upto = self.render(&messages[..=i], tools, false)?.text;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(format!(
                    "the chat template renders message {i} differently once later messages follow, so its assistant tokens cannot be found; use a template with {{% generation %}} blocks (`data.chat_template`; TRL ships such training templates) or train_on = \"all\""
                ));
            }
            spans.push(before.len()..upto.len());
        }
        Ok(spans)
    }

    /// Indices of the assistant turns `train_on` trains on (none for `all`, which trains the text
    /// as a whole); `prompt_len` is the row's prompt length when it gave one.
    fn trained_turns(&self, messages: &[Message], prompt_len: Option<usize>) -> Vec<usize> {
        let assistant = |(i, m): (usize, &Message)| (m.role == "assistant").then_some(i);
        let all: Vec<usize> = messages.iter().enumerate().filter_map(assistant).collect();
        match (self.train_on, prompt_len) {
            (TrainOn::All, _) => Vec::new(),
            (TrainOn::Assistant, _) => all,
            (TrainOn::Completion, Some(n)) => all.into_iter().filter(|&i| i >= n).collect(),
            (TrainOn::LastTurn | TrainOn::Completion, _) => {
                all.last().copied().into_iter().collect()
            }
        }
    }

    /// Rejects conversations whose trained part would be an end-of-turn token alone (an
    /// assistant turn with neither text nor tool calls), or (for
    /// `train_on = "completion"`, which trains everything after the prompt) a trailing turn that is
    /// not the assistant's.
    fn check_conversation(
        &self,
        messages: &[Message],
        prompt_len: Option<usize>,
    ) -> Result<(), String> {
        for i in self.trained_turns(messages, prompt_len) {
            if is_blank_turn(&messages[i]) {
                return Err(format!(
                    "the assistant turn at message {i} (counting from 0) is empty (no text and no tool calls): there is no answer to train on"
                ));
            }
        }
        if self.train_on == TrainOn::Completion
            && let Some(last) = messages.last()
            && last.role != "assistant"
        {
            return Err(format!(
                "the conversation ends on a `{}` turn; the last message must be the assistant's (train_on = \"completion\" trains everything after the prompt)",
                last.role
            ));
        }
        Ok(())
    }

    fn encode_chat(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        prompt_len: Option<usize>,
    ) -> Result<Example, String> {
        self.check_conversation(messages, prompt_len)?;
        let rendered = self.render(messages, tools, false)?;
        let text = &rendered.text;
        let spans: Vec<Range<usize>> = match self.train_on {
            TrainOn::All => vec![whole(text)],
            TrainOn::Assistant | TrainOn::LastTurn => {
                let mut spans = self.assistant_spans(messages, tools, &rendered)?;
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
                let prompt = self.render(&messages[..prompt_len], tools, true)?.text;
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
        if self.is_blank_completion(completion) {
            return Err(if prompt.is_empty() {
                "the text is empty: nothing to train on".into()
            } else {
                "the completion is empty: nothing to train on".into()
            });
        }
        let text = self.with_eos(&format!("{prompt}{completion}"));
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
            return Err(
                "nothing to train on: the text is a single token, and the first token is never predicted"
                    .into(),
            );
        }
        Ok(example)
    }

    fn encode_text_pair(
        &self,
        prompt: &str,
        chosen: &str,
        rejected: &str,
    ) -> Result<PairExample, String> {
        let pair = PairExample {
            prompt_ids: self.tokenize(prompt)?.0,
            chosen_ids: self.text_completion_ids("chosen", chosen)?,
            rejected_ids: self.text_completion_ids("rejected", rejected)?,
            margin: None,
        };
        check_pair(&pair)?;
        Ok(pair)
    }

    /// The ids of the plain-text completion `key` (`text`), ending with the end-of-sequence token.
    fn text_completion_ids(&self, key: &str, text: &str) -> Result<Vec<u32>, String> {
        if self.is_blank_completion(text) {
            return Err(format!("`{key}` is empty: there is no answer to train on"));
        }
        let ids = self
            .tokenizer
            .encode(&self.with_eos(text), false)
            .map_err(|e| e.to_string())?;
        if ids.is_empty() {
            return Err(format!("`{key}` renders to no tokens"));
        }
        Ok(ids)
    }

    /// Rejects a completion `key` holding an assistant turn with nothing to train on.
    fn check_completion_turns(&self, key: &str, completion: &[Message]) -> Result<(), String> {
        match completion
            .iter()
            .position(|m| m.role == "assistant" && is_blank_turn(m))
        {
            Some(i) => Err(format!(
                "the `{key}` assistant turn at completion message {i} (counting from 0) is empty (no text and no tool calls): there is no answer to train on"
            )),
            None => Ok(()),
        }
    }

    /// The ids of what `completion` adds to the conversation `prompt` (rendered, with the
    /// generation prompt, as `prompt_text`).
    fn chat_completion_ids(
        &self,
        prompt: &[Message],
        prompt_text: &str,
        completion: &[Message],
        tools: Option<&[Value]>,
    ) -> Result<Vec<u32>, String> {
        let all: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
        let full = self.render(&all, tools, false)?.text;
        let rest = full.strip_prefix(prompt_text).ok_or(
            "the rendered prompt is not a prefix of the rendered conversation, so the completion cannot be found",
        )?;
        let ids = self
            .tokenizer
            .encode(rest, false)
            .map_err(|e| e.to_string())?;
        if ids.is_empty() {
            return Err("a completion renders to no tokens".into());
        }
        Ok(ids)
    }

    fn encode_pair(
        &self,
        prompt: &[Message],
        chosen: &[Message],
        rejected: &[Message],
        tools: Option<&[Value]>,
    ) -> Result<PairExample, String> {
        for (key, side) in [("chosen", chosen), ("rejected", rejected)] {
            self.check_completion_turns(key, side)?;
        }
        let prompt_text = self.render(prompt, tools, true)?.text;
        let (prompt_ids, _) = self.tokenize(&prompt_text)?;
        let pair = PairExample {
            chosen_ids: self.chat_completion_ids(prompt, &prompt_text, chosen, tools)?,
            rejected_ids: self.chat_completion_ids(prompt, &prompt_text, rejected, tools)?,
            prompt_ids,
            margin: None,
        };
        check_pair(&pair)?;
        Ok(pair)
    }
}

/// Whether a turn has nothing to train on: no text and no tool calls.
fn is_blank_turn(m: &Message) -> bool {
    m.content.is_empty() && !m.has_tool_calls()
}

/// Rejects a pair that gives the loss nothing to compare: a side without a token after
/// position 0 to predict, or sides that are the same tokens.
pub(crate) fn check_pair(pair: &PairExample) -> Result<(), String> {
    check_trainable("the `chosen` sequence", &pair.chosen())?;
    check_trainable("the `rejected` sequence", &pair.rejected())?;
    if pair.chosen_ids == pair.rejected_ids {
        return Err("`chosen` and `rejected` give the same tokens".into());
    }
    Ok(())
}

/// Rejects a labeled completion with no token to train on after position 0.
pub(crate) fn check_labeled(labeled: &LabeledExample) -> Result<(), String> {
    check_trainable("the sequence", &labeled.example())
}

/// Rejects a prompt + completion `sequence` (named `what`) with no token to train on after
/// position 0.
fn check_trainable(what: &str, sequence: &Example) -> Result<(), String> {
    if sequence.trained() == 0 {
        return Err(format!(
            "{what} has no token to train on after its first (prompt and completion together are {} token(s))",
            sequence.len()
        ));
    }
    Ok(())
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
    fn a_pair_side_without_a_predicted_token_is_rejected() {
        let pair = |prompt: Vec<u32>, chosen: Vec<u32>| PairExample {
            prompt_ids: prompt,
            chosen_ids: chosen,
            rejected_ids: vec![7, 8],
            margin: None,
        };
        let err = check_pair(&pair(vec![], vec![5])).unwrap_err();
        assert!(
            err.contains("`chosen` sequence has no token to train on"),
            "{err}"
        );
        assert!(check_pair(&pair(vec![1], vec![5])).is_ok());
        let err = check_pair(&pair(vec![1], vec![7, 8])).unwrap_err();
        assert!(err.contains("same tokens"), "{err}");
    }

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
