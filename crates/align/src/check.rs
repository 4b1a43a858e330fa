//! The held-out check of a recipe's `[check]` section: the model answers each held-out prompt
//! greedily, before training and after it, and each answer is compared token for token with the
//! expected one (up to and including the first end token). On preference pairs it also counts the
//! pairs whose chosen completion the model scores above the rejected one.

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::backend::Backend;
use burnish_data::{
    DataConfig, Encoded, Encoder, Sample, Tokenizer, TrainOn, parse_row, read_rows,
};
use burnish_model::{Decoder, GenerateOptions, generate, token_logprobs};

use crate::error::RunError;

/// One held-out prompt and what the model should answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckCase {
    /// The prompt as a person reads it: the last user turn, or the text prompt.
    pub prompt: String,
    /// The expected answer, decoded as the model's answers are.
    pub expected: String,
    prompt_ids: Vec<u32>,
    expected_ids: Vec<u32>,
    /// The rejected completion of a preference pair.
    rejected_ids: Option<Vec<u32>>,
}

/// What the model answered to one case.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckAnswer {
    pub prompt: String,
    pub expected: String,
    pub answer: String,
    pub correct: bool,
    /// For a preference pair: whether the chosen completion has the higher log-probability.
    pub prefers_chosen: Option<bool>,
}

/// The answers to every case, in order, and their tallies.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    pub answers: Vec<CheckAnswer>,
    /// Exactly right answers.
    pub exact: usize,
    /// Pairs whose chosen completion the model prefers (preference checks only).
    pub preferred: Option<usize>,
}

impl CheckReport {
    /// `exact` as a fraction of the cases.
    pub fn exact_rate(&self) -> f64 {
        self.exact as f64 / self.answers.len().max(1) as f64
    }

    /// `preferred` as a fraction of the cases.
    pub fn preferred_rate(&self) -> Option<f64> {
        self.preferred
            .map(|p| p as f64 / self.answers.len().max(1) as f64)
    }
}

/// The text of the last message with `role` among `messages`.
fn last_text(messages: &[burnish_data::Message], role: &str) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.role == role)
        .map(|m| m.text())
        .unwrap_or_default()
}

/// Reads the cases of `path` with the recipe's data settings; rows are encoded by the training
/// encoder, so prompts are exactly what training conditions on.
pub fn load_cases(
    path: &Path,
    encoder: &Encoder,
    config: &DataConfig,
) -> Result<Vec<CheckCase>, RunError> {
    let last_turn = Encoder {
        train_on: TrainOn::LastTurn,
        ..encoder.clone()
    };
    let completion = Encoder {
        train_on: TrainOn::Completion,
        ..encoder.clone()
    };
    let mut cases = Vec::new();
    for row in read_rows(path)? {
        let bad = |detail: String| RunError::Check {
            path: path.to_path_buf(),
            line: row.line,
            detail,
        };
        let sample = row
            .parse()
            .and_then(|v| parse_row(&v, config.format, &config.fields, config.alpaca_style))
            .map_err(bad)?;
        let prompt = match &sample {
            Sample::Chat { messages, .. } => last_text(messages, "user"),
            Sample::Pair { prompt, .. }
            | Sample::Labeled { prompt, .. }
            | Sample::Prompt { prompt, .. } => last_text(prompt, "user"),
            Sample::Text { prompt, .. }
            | Sample::TextPair { prompt, .. }
            | Sample::TextLabeled { prompt, .. }
            | Sample::TextPrompt { prompt } => prompt.clone(),
        };
        let encoder = match sample {
            Sample::Text { .. } => &completion,
            _ => &last_turn,
        };
        let (prompt_ids, expected_ids, rejected_ids) = match encoder.encode(&sample).map_err(bad)? {
            Encoded::Single(example) => {
                let start = example
                    .labels_mask
                    .iter()
                    .position(|&m| m)
                    .ok_or_else(|| bad("the row has no answer to check against".into()))?;
                let expected = example.input_ids[start..]
                    .iter()
                    .zip(&example.labels_mask[start..])
                    .take_while(|(_, m)| **m)
                    .map(|(&id, _)| id)
                    .collect();
                (example.input_ids[..start].to_vec(), expected, None)
            }
            Encoded::Pair(pair) => (pair.prompt_ids, pair.chosen_ids, Some(pair.rejected_ids)),
            Encoded::Labeled(l) if l.desirable => (l.prompt_ids, l.completion_ids, None),
            Encoded::Prompt(_) => {
                return Err(bad(
                    "the row is a prompt alone, with no expected answer to check against; give \
                     check rows with their answer"
                        .into(),
                ));
            }
            Encoded::Labeled(_) => {
                return Err(bad(
                    "the row's completion is labeled undesirable, so it is no answer to check                      against; give check rows whose completion is desirable"
                        .into(),
                ));
            }
        };
        let case = CheckCase {
            prompt,
            // Shown as the model's answers are: decoded, special tokens left out.
            expected: encoder
                .tokenizer
                .decode(&expected_ids, true)?
                .trim()
                .to_string(),
            prompt_ids,
            expected_ids,
            rejected_ids,
        };
        if case.prompt_ids.is_empty() {
            return Err(bad(
                "the prompt is empty: the model needs something to answer".into(),
            ));
        }
        cases.push(case);
    }
    if cases.is_empty() {
        return Err(RunError::Mismatch(format!(
            "{}: the check file holds no rows",
            path.display()
        )));
    }
    Ok(cases)
}

/// The summed log-probability of `completion` after `prompt`.
fn completion_logp<B: Backend>(
    model: &Decoder<B>,
    prompt: &[u32],
    completion: &[u32],
) -> Result<f64, RunError> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let logps = token_logprobs(model, &ids)?;
    Ok(logps[prompt.len() - 1..]
        .iter()
        .map(|&l| f64::from(l))
        .sum())
}

/// Answers every case greedily (at most `max_new_tokens`, stopping at any of `stop_tokens`) and
/// compares the answers with the expected ones.
pub fn run_check<B: Backend>(
    model: &Decoder<B>,
    tokenizer: &Tokenizer,
    cases: &[CheckCase],
    max_new_tokens: usize,
    stop_tokens: &[u32],
) -> Result<CheckReport, RunError> {
    let options = GenerateOptions {
        max_new_tokens,
        stop_tokens: stop_tokens.to_vec(),
        ..Default::default()
    };
    let mut answers = Vec::with_capacity(cases.len());
    for case in cases {
        let got = generate(model, &case.prompt_ids, &options, |_| {
            ControlFlow::Continue(())
        })?;
        // The expected answer ends at its first end token, as generation does.
        let end = case
            .expected_ids
            .iter()
            .position(|t| stop_tokens.contains(t));
        let correct = match end {
            Some(i) => got == case.expected_ids[..=i],
            None => got.starts_with(&case.expected_ids),
        };
        let shown: Vec<u32> = got
            .iter()
            .copied()
            .filter(|t| !stop_tokens.contains(t))
            .collect();
        let answer = tokenizer.decode(&shown, true)?.trim().to_string();
        let prefers_chosen = match &case.rejected_ids {
            Some(rejected) => Some(
                completion_logp(model, &case.prompt_ids, &case.expected_ids)?
                    > completion_logp(model, &case.prompt_ids, rejected)?,
            ),
            None => None,
        };
        answers.push(CheckAnswer {
            prompt: case.prompt.clone(),
            expected: case.expected.clone(),
            answer,
            correct,
            prefers_chosen,
        });
    }
    let exact = answers.iter().filter(|a| a.correct).count();
    let preferred = answers
        .iter()
        .map(|a| a.prefers_chosen)
        .collect::<Option<Vec<bool>>>()
        .map(|all| all.iter().filter(|&&p| p).count());
    Ok(CheckReport {
        answers,
        exact,
        preferred,
    })
}
