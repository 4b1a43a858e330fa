//! A dataset end to end: the data settings of a recipe ([`DataConfig`]), and [`load`], which
//! reads the files, turns rows into samples, renders and tokenizes them in parallel, applies
//! `max_length`, and reports what happened (rows, tokens, trained tokens, truncated rows, rejected
//! rows with file, line and reason). Bad rows are errors or counted skips, as configured.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::{shuffle, split_eval};
use crate::error::{DataError, Result};
use crate::example::{
    Encoded, Encoder, Example, LabeledExample, PairExample, PromptExample, TrainOn, check_labeled,
    check_pair,
};
use crate::format::{AlpacaStyle, Fields, RowFormat, parse_row, with_row_fields};
use crate::reader::read_rows;

/// What to do with a row that cannot become an example.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBadRow {
    /// Stop with an error naming the file, line and reason.
    #[default]
    Error,
    /// Skip it, count it, and list it in the report.
    Skip,
}

/// What to do with an example longer than `max_length`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// Keep the first `max_length` tokens (counted as truncated).
    #[default]
    KeepStart,
    /// Reject the row (a bad row, so `on_bad_row` applies).
    Drop,
}

/// The data settings of a recipe. Every field has a default; unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Row shape (default `auto`: decided per row).
    pub format: RowFormat,
    /// Field names (default: the usual names of each shape).
    pub fields: Fields,
    /// How Alpaca rows are rendered (default `chat`).
    pub alpaca_style: AlpacaStyle,
    /// Which tokens are trained (default `assistant`).
    pub train_on: TrainOn,
    /// Longest example in tokens (default: no limit).
    pub max_length: Option<usize>,
    /// What to do above `max_length` (default `keep-start`).
    pub truncation: Truncation,
    /// What to do with bad rows (default `error`).
    pub on_bad_row: OnBadRow,
    /// Fraction of examples held out for evaluation when there is no eval file (default 0);
    /// see [`Dataset::split_eval`].
    pub eval_ratio: f64,
    /// Seed of the shuffle before splitting and of the batch order (default 0).
    pub seed: u64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: RowFormat::Auto,
            fields: Fields::default(),
            alpaca_style: AlpacaStyle::Chat,
            train_on: TrainOn::Assistant,
            max_length: None,
            truncation: Truncation::KeepStart,
            on_bad_row: OnBadRow::Error,
            eval_ratio: 0.0,
            seed: 0,
        }
    }
}

impl DataConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.eval_ratio) {
            return Err(DataError::Config {
                key: "data.eval_ratio".into(),
                detail: format!("must be in [0, 1), got {}", self.eval_ratio),
            });
        }
        if let Some(n @ (0 | 1)) = self.max_length {
            return Err(DataError::Config {
                key: "data.max_length".into(),
                detail: format!(
                    "must be at least 2, got {n}: a causal loss predicts each token from the ones before it"
                ),
            });
        }
        Ok(())
    }
}

/// A skipped row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub path: PathBuf,
    pub line: usize,
    pub reason: String,
}

/// What loading did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Rows read.
    pub rows: usize,
    /// Tokens in the kept examples (both sequences of a pair, prompt counted twice).
    pub tokens: usize,
    /// Trained tokens in the kept examples.
    pub trained_tokens: usize,
    /// Rows cut to `max_length`.
    pub truncated: usize,
    /// Rows skipped, with why.
    pub rejected: Vec<Rejection>,
}

/// Where a row came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub path: PathBuf,
    pub line: usize,
}

/// Examples of a dataset and what loading them did: `examples[i]` came from
/// `example_sources[i]`, `pairs[i]` from `pair_sources[i]`, `labeled[i]` from
/// `labeled_sources[i]`, `prompts[i]` from `prompt_sources[i]`. A loaded dataset holds one kind
/// of row.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub example_sources: Vec<Source>,
    pub pairs: Vec<PairExample>,
    pub pair_sources: Vec<Source>,
    pub labeled: Vec<LabeledExample>,
    pub labeled_sources: Vec<Source>,
    pub prompts: Vec<PromptExample>,
    pub prompt_sources: Vec<Source>,
    pub report: Report,
}

impl Dataset {
    /// Shuffles with `seed`, then holds out `eval_ratio` of the examples and of the pairs:
    /// `(train, eval)`. The report stays with the training part. For a split by file, load the
    /// eval file on its own instead.
    pub fn split_eval(self, eval_ratio: f64, seed: u64) -> (Dataset, Dataset) {
        fn part<T, U>(
            items: Vec<T>,
            sources: Vec<U>,
            ratio: f64,
            seed: u64,
        ) -> [(Vec<T>, Vec<U>); 2] {
            let mut both: Vec<(T, U)> = items.into_iter().zip(sources).collect();
            shuffle(&mut both, seed);
            let (train, eval) = split_eval(both, ratio);
            [train.into_iter().unzip(), eval.into_iter().unzip()]
        }
        let [
            (examples, example_sources),
            (eval_examples, eval_example_sources),
        ] = part(self.examples, self.example_sources, eval_ratio, seed);
        let [(pairs, pair_sources), (eval_pairs, eval_pair_sources)] =
            part(self.pairs, self.pair_sources, eval_ratio, seed);
        let [
            (labeled, labeled_sources),
            (eval_labeled, eval_labeled_sources),
        ] = part(self.labeled, self.labeled_sources, eval_ratio, seed);
        let [
            (prompts, prompt_sources),
            (eval_prompts, eval_prompt_sources),
        ] = part(self.prompts, self.prompt_sources, eval_ratio, seed);
        (
            Dataset {
                examples,
                example_sources,
                pairs,
                pair_sources,
                labeled,
                labeled_sources,
                prompts,
                prompt_sources,
                report: self.report,
            },
            Dataset {
                examples: eval_examples,
                example_sources: eval_example_sources,
                pairs: eval_pairs,
                pair_sources: eval_pair_sources,
                labeled: eval_labeled,
                labeled_sources: eval_labeled_sources,
                prompts: eval_prompts,
                prompt_sources: eval_prompt_sources,
                report: Report::default(),
            },
        )
    }

    /// The dataset with each preference pair split in two labeled completions, its chosen one
    /// desirable and its rejected one not, after those it already holds: every pair's chosen
    /// completion first, then every rejected one, as TRL's `unpair_preference_dataset` orders
    /// them (so a shuffle-free batch of neighbours never holds both sides of one prompt).
    pub fn unpaired(mut self) -> Self {
        let pairs = std::mem::take(&mut self.pairs);
        let sources = std::mem::take(&mut self.pair_sources);
        for desirable in [true, false] {
            for (pair, source) in pairs.iter().zip(&sources) {
                self.labeled.push(LabeledExample {
                    prompt_ids: pair.prompt_ids.clone(),
                    completion_ids: if desirable {
                        pair.chosen_ids.clone()
                    } else {
                        pair.rejected_ids.clone()
                    },
                    desirable,
                });
                self.labeled_sources.push(source.clone());
            }
        }
        self
    }
}

/// A row's outcome, with its file and line.
type RowOutcome<'a> = (
    std::result::Result<(Encoded, bool), String>,
    &'a PathBuf,
    usize,
);

/// Reads, renders and tokenizes every row of `paths` (in parallel; the order is the files').
pub fn load(paths: &[&Path], encoder: &Encoder, config: &DataConfig) -> Result<Dataset> {
    config.validate()?;
    let mut rows = Vec::new();
    for p in paths {
        rows.extend(read_rows(p)?);
    }
    let results: Vec<RowOutcome> = rows
        .par_iter()
        .map(|row| {
            let out = row
                .parse()
                .and_then(|v| {
                    let sample = parse_row(&v, config.format, &config.fields, config.alpaca_style)?;
                    with_row_fields(encoder.encode(&sample)?, &v, &config.fields)
                })
                .and_then(|e| limit(e, config));
            (out, &row.path, row.line)
        })
        .collect();
    let wanted = majority_kind(&results);
    let mut ds = Dataset {
        report: Report {
            rows: rows.len(),
            ..Default::default()
        },
        ..Default::default()
    };
    for (result, path, line) in results {
        let result = result.and_then(|(encoded, truncated)| {
            let kind = RowKind::of(&encoded);
            if kind == wanted {
                Ok((encoded, truncated))
            } else {
                Err(format!(
                    "{} in a dataset of {}: a dataset holds one kind of row; move such rows to a file of their own",
                    kind.one(),
                    wanted.many()
                ))
            }
        });
        match result {
            Ok((encoded, truncated)) => {
                ds.report.truncated += truncated as usize;
                let source = Source {
                    path: path.clone(),
                    line,
                };
                match encoded {
                    Encoded::Single(e) => {
                        ds.report.tokens += e.len();
                        ds.report.trained_tokens += e.trained();
                        ds.examples.push(e);
                        ds.example_sources.push(source);
                    }
                    Encoded::Pair(p) => {
                        ds.report.tokens +=
                            2 * p.prompt_ids.len() + p.chosen_ids.len() + p.rejected_ids.len();
                        ds.report.trained_tokens += p.chosen().trained() + p.rejected().trained();
                        ds.pairs.push(p);
                        ds.pair_sources.push(source);
                    }
                    Encoded::Labeled(l) => {
                        let sequence = l.example();
                        ds.report.tokens += sequence.len();
                        ds.report.trained_tokens += sequence.trained();
                        ds.labeled.push(l);
                        ds.labeled_sources.push(source);
                    }
                    Encoded::Prompt(p) => {
                        ds.report.tokens += p.prompt_ids.len();
                        ds.prompts.push(p);
                        ds.prompt_sources.push(source);
                    }
                }
            }
            Err(reason) => match config.on_bad_row {
                OnBadRow::Error => {
                    return Err(DataError::BadRow {
                        path: path.clone(),
                        line,
                        reason,
                    });
                }
                OnBadRow::Skip => {
                    tracing::warn!("{}:{line}: skipped: {reason}", path.display());
                    ds.report.rejected.push(Rejection {
                        path: path.clone(),
                        line,
                        reason,
                    });
                }
            },
        }
    }
    Ok(ds)
}

/// The kinds of row a dataset can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKind {
    Single,
    Pair,
    Labeled,
    Prompt,
}

impl RowKind {
    fn of(encoded: &Encoded) -> Self {
        match encoded {
            Encoded::Single(_) => Self::Single,
            Encoded::Pair(_) => Self::Pair,
            Encoded::Labeled(_) => Self::Labeled,
            Encoded::Prompt(_) => Self::Prompt,
        }
    }

    fn one(self) -> &'static str {
        match self {
            Self::Single => "a single sequence",
            Self::Pair => "a preference pair",
            Self::Labeled => "a labeled completion",
            Self::Prompt => "a prompt alone",
        }
    }

    fn many(self) -> &'static str {
        match self {
            Self::Single => "single sequences",
            Self::Pair => "preference pairs",
            Self::Labeled => "labeled completions",
            Self::Prompt => "prompts alone",
        }
    }
}

/// The kind of row the dataset holds: the kind most good rows have (the first good row's on a
/// tie); rows of another kind are then bad rows, never silently unused.
fn majority_kind(results: &[RowOutcome]) -> RowKind {
    let kind = |r: &RowOutcome| r.0.as_ref().ok().map(|(e, _)| RowKind::of(e));
    // Counted once, indexed by the kind's discriminant: the tie-break looks counts up.
    let mut counts = [0usize; 4];
    for k in results.iter().filter_map(kind) {
        counts[k as usize] += 1;
    }
    let most = counts.into_iter().max().unwrap_or(0);
    results
        .iter()
        .filter_map(kind)
        .find(|&k| counts[k as usize] == most)
        .unwrap_or(RowKind::Single)
}

/// Applies `max_length`: `(example, was truncated)` or the reason the row is rejected.
fn limit(encoded: Encoded, config: &DataConfig) -> std::result::Result<(Encoded, bool), String> {
    let Some(max) = config.max_length else {
        return Ok((encoded, false));
    };
    let len = match &encoded {
        Encoded::Single(e) => e.len(),
        Encoded::Pair(p) => p.prompt_ids.len() + p.chosen_ids.len().max(p.rejected_ids.len()),
        Encoded::Labeled(l) => l.prompt_ids.len() + l.completion_ids.len(),
        Encoded::Prompt(p) => p.prompt_ids.len(),
    };
    if len <= max {
        return Ok((encoded, false));
    }
    if let Encoded::Prompt(_) = encoded {
        // A cut prompt would be completed where it was cut, whatever `truncation` says.
        return Err(format!(
            "the prompt has {len} tokens, more than max_length = {max}; completions follow whole \
             prompts: raise data.max_length or leave the row out"
        ));
    }
    if config.truncation == Truncation::Drop {
        return Err(format!(
            "{len} tokens, longer than max_length = {max} (truncation = \"drop\")"
        ));
    }
    let encoded = match encoded {
        Encoded::Single(mut e) => {
            e.input_ids.truncate(max);
            e.labels_mask.truncate(max);
            if e.trained() == 0 {
                return Err(format!(
                    "no trained token left in the first max_length = {max} of {len} tokens"
                ));
            }
            Encoded::Single(e)
        }
        Encoded::Pair(mut p) => {
            let room = completion_room(&p.prompt_ids, max)?;
            p.chosen_ids.truncate(room);
            p.rejected_ids.truncate(room);
            if p.chosen_ids == p.rejected_ids {
                return Err(format!(
                    "`chosen` and `rejected` are identical after truncation to max_length = {max}; raise data.max_length"
                ));
            }
            check_pair(&p)?;
            Encoded::Pair(p)
        }
        Encoded::Labeled(mut l) => {
            let room = completion_room(&l.prompt_ids, max)?;
            l.completion_ids.truncate(room);
            check_labeled(&l)?;
            Encoded::Labeled(l)
        }
        Encoded::Prompt(p) => Encoded::Prompt(p),
    };
    Ok((encoded, true))
}

/// The tokens a completion keeps after `prompt` within `max` (at least one), or why none fit.
fn completion_room(prompt: &[u32], max: usize) -> std::result::Result<usize, String> {
    max.checked_sub(prompt.len())
        .filter(|&r| r > 0)
        .ok_or_else(|| {
            format!(
                "the prompt alone has {} tokens, max_length = {max}",
                prompt.len()
            )
        })
}
