//! A whole training run from a validated recipe: load the base and the adapter, prepare the data
//! with the shared loader, run the optimizer steps of the recipe's strategy over epochs or
//! `max_steps`, evaluate, and write the run directory (resolved recipe, `metrics.jsonl`, the
//! adapter in PEFT's format or the full model, and a model card).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burnish_data::{
    Batch, BatchConfig, ChatTemplate, DataConfig, Dataset, Encoder, Example, LabeledExample,
    PairExample, PromptExample, Report, Tokenizer, TrainOn, load, make_batches,
    pack_best_fit_decreasing, shuffle,
};
use burnish_model::{
    Decoder, GenerateOptions, HfConfig, ModelError, Pretrained, linear_module_names, save_decoder,
};
use burnish_peft::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LoraConfig, LoraInit, SaveDtype, Targets, Task,
    f32_values, first_value, save_adapter, select_targets,
};
use serde_json::json;

use crate::check::{CheckReport, load_cases, run_check};
use crate::checkpoint::{
    Progress, checkpoints, read_checkpoint, read_identity, remove_partial_checkpoints,
    save_checkpoint,
};
use crate::continuation::{RunIdentity, check_init_from, model_files_digest};
use crate::error::{RunError, TrainError};
use crate::grpo::{
    Grpo, GrpoLossKind, RewardFunction, RewardModel, RewardNames, Rewards, Rollouts, Sampling,
    rollouts,
};
use crate::optimizer::{AdamW, AdamWConfig};
use crate::recipe::{
    AdapterInit, AdapterSection, GrpoSection, KtoSection, ModelInit, OnNonFinite, Recipe,
    RewardSpec, Rows, StrategyKind, TargetModules,
};
use crate::reward::ScoredPairs;
use crate::reward_program::RewardProgram;
use crate::schedule::Schedule;
use crate::strategy::{
    Kto, LabeledBatch, Orpo, PairBatch, Preference, Sft, Strategy, TokenBatch, adapters_off,
    frozen_logps,
};
use crate::tensorboard::{EventFile, tagged_scalars};
use crate::trainer::{Activations, MetricMeans, StepMetrics, optimizer_step};

/// Added to `train.seed` for the draws of GRPO's evaluation, far from the training steps'
/// (`train.seed` plus the step).
const EVAL_SEEDS: u64 = 1 << 40;

/// Where a run directory keeps the chat template it was trained with, when the recipe chose one.
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Files a model directory carries besides weights and config.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// What happened during a run, reported to the caller as it goes.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// Data prepared: examples (or pairs) for training and evaluation, optimizer steps planned,
    /// and what a person should know before the run starts (rows cut or skipped, a warmup
    /// longer than the run).
    Prepared {
        train: usize,
        eval: usize,
        steps: usize,
        notices: Vec<String>,
    },
    /// An optimizer step, with the tokens per second it ran at.
    Step {
        metrics: StepMetrics,
        tokens_per_s: f64,
    },
    /// A checkpoint was written after `step`.
    Checkpoint { step: usize, path: PathBuf },
    /// Evaluation after `step`: the loss per unit and the strategy's metrics.
    Eval {
        step: usize,
        loss: f64,
        metrics: Vec<(&'static str, f64)>,
    },
    /// The `[check]` prompts answered before training (`after = false`) or after it.
    Check { after: bool, report: CheckReport },
}

/// The final numbers of a run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: usize,
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub eval_metrics: Vec<(&'static str, f64)>,
    /// The `[check]` reports before and after training (before is absent on a resumed run).
    pub check_before: Option<CheckReport>,
    pub check_after: Option<CheckReport>,
    pub dir: PathBuf,
}

/// The PEFT configuration of a recipe's `[adapter]` section.
pub fn lora_config(section: &AdapterSection, base: &Path) -> LoraConfig {
    LoraConfig {
        r: section.r,
        lora_alpha: section.alpha,
        lora_dropout: section.dropout,
        targets: match &section.target_modules {
            TargetModules::List(list) => Targets::List(list.clone()),
            TargetModules::Named(name) if name == "all-linear" => Targets::AllLinear,
            TargetModules::Named(regex) => Targets::Regex(regex.clone()),
        },
        layers_to_transform: section.layers_to_transform.clone(),
        use_rslora: section.use_rslora,
        use_dora: section.use_dora,
        init: match section.init {
            AdapterInit::Kaiming => LoraInit::Kaiming,
            AdapterInit::Gaussian => LoraInit::Gaussian,
        },
        base_model_name_or_path: Some(base.display().to_string()),
        ..Default::default()
    }
}

/// What loading `report` cut or skipped, in words, naming the first rows skipped.
fn data_notices(report: &Report, which: &str, config: &DataConfig) -> Vec<String> {
    const SHOWN: usize = 3;
    let mut notices = Vec::new();
    if report.truncated > 0 {
        notices.push(format!(
            "{} {which} rows were longer than `data.max_length` and were cut to their first {} \
             tokens (`data.truncation = \"keep-start\"`)",
            report.truncated,
            config.max_length.unwrap_or_default(),
        ));
    }
    if !report.rejected.is_empty() {
        let first: Vec<String> = report
            .rejected
            .iter()
            .take(SHOWN)
            .map(|r| format!("{}:{}: {}", r.path.display(), r.line, r.reason))
            .collect();
        notices.push(format!(
            "{} {which} rows were skipped (`data.on_bad_row = \"skip\"`); first: {}",
            report.rejected.len(),
            first.join("; ")
        ));
    }
    notices
}

/// Advice when the desirable and undesirable completions are unbalanced and neither weight
/// evens them out in the range the KTO paper (its eq. 8) gives: `desirable_weight ×
/// desirable` from 1 to 4/3 times `undesirable_weight × undesirable`.
fn kto_balance_notice(rows: &[LabeledExample], kto: &KtoSection) -> Option<String> {
    let desirable = rows.iter().filter(|r| r.desirable).count();
    let undesirable = rows.len() - desirable;
    if desirable == undesirable {
        return None;
    }
    let (d, u) = (desirable.max(1) as f64, undesirable.max(1) as f64);
    let (wd, wu) = (kto.desirable_weight, kto.undesirable_weight);
    let desirable_range = (u * wu / d, u * wu / d * 4.0 / 3.0);
    let undesirable_range = (d * wd / u * 3.0 / 4.0, d * wd / u);
    let within = |w: f64, (low, high): (f64, f64)| (low..=high).contains(&w);
    if within(wd, desirable_range) || within(wu, undesirable_range) {
        return None;
    }
    Some(format!(
        "the training data holds {desirable} desirable and {undesirable} undesirable \
         completions, and the KTO weights do not balance them: set either \
         `kto.desirable_weight` in [{:.2}, {:.2}] or `kto.undesirable_weight` in \
         [{:.2}, {:.2}], not both",
        desirable_range.0, desirable_range.1, undesirable_range.0, undesirable_range.1
    ))
}

/// Refuses token ids the model has no embedding for (a tokenizer that does not belong to the
/// model), naming the first row that holds one.
fn check_vocabulary(data: &Dataset, vocab_size: usize, base: &Path) -> Result<(), RunError> {
    let examples = data
        .examples
        .iter()
        .map(|e| e.input_ids.as_slice())
        .zip(&data.example_sources);
    let pairs = data
        .pairs
        .iter()
        .zip(&data.pair_sources)
        .flat_map(|(p, source)| {
            [&p.prompt_ids, &p.chosen_ids, &p.rejected_ids].map(|ids| (ids.as_slice(), source))
        });
    let labeled = data
        .labeled
        .iter()
        .zip(&data.labeled_sources)
        .flat_map(|(l, source)| {
            [&l.prompt_ids, &l.completion_ids].map(|ids| (ids.as_slice(), source))
        });
    let prompts = data
        .prompts
        .iter()
        .map(|p| p.prompt_ids.as_slice())
        .zip(&data.prompt_sources);
    for (ids, source) in examples.chain(pairs).chain(labeled).chain(prompts) {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(RunError::Mismatch(format!(
                "{}:{}: token id {id} is outside the model's vocabulary (`vocab_size` = \
                 {vocab_size} in {}): the tokenizer does not belong to this model; use the \
                 model's own tokenizer files",
                source.path.display(),
                source.line,
                base.join("config.json").display()
            )));
        }
    }
    Ok(())
}

/// Token batches for SFT and instruction tuning, one `Vec` per optimizer step.
fn token_batches<B: AutodiffBackend>(batches: &[Batch], device: &B::Device) -> Vec<TokenBatch<B>> {
    batches
        .iter()
        .filter(|b| b.seq_len >= 2)
        .map(|b| TokenBatch::from_batch(b, device))
        .collect()
}

/// Pair batches for DPO: chosen and rejected rows padded separately, row for row.
/// `reference`, when given, holds each pair's precomputed reference log-probs (chosen,
/// rejected) by pair index; `seed` `None` keeps the data's order.
fn pair_batches<B: AutodiffBackend>(
    data: &Dataset,
    micro: usize,
    pad_id: u32,
    seed: Option<u64>,
    reference: Option<&[(f32, f32)]>,
    device: &B::Device,
) -> Vec<PairBatch<B>> {
    let mut order: Vec<usize> = (0..data.pairs.len()).collect();
    if let Some(seed) = seed {
        shuffle(&mut order, seed);
    }
    order
        .chunks(micro)
        .map(|chunk| {
            let pairs: Vec<&PairExample> = chunk.iter().map(|&i| &data.pairs[i]).collect();
            let precomputed = reference.map(|r| {
                let column = |pick: fn(&(f32, f32)) -> f32| {
                    let values: Vec<f32> = chunk.iter().map(|&i| pick(&r[i])).collect();
                    let n = values.len();
                    Tensor::from_data(TensorData::new(values, [n]), device)
                };
                (column(|p| p.0), column(|p| p.1))
            });
            PairBatch {
                reference: precomputed,
                ..PairBatch::from_pairs(&pairs, pad_id, device)
            }
        })
        .collect()
}

/// Pair batches for a reward model: whole sequences, shuffled with `seed`.
fn scored_batches<B: AutodiffBackend>(
    data: &Dataset,
    micro: usize,
    pad_id: u32,
    seed: u64,
    device: &B::Device,
) -> Vec<ScoredPairs<B>> {
    let mut order: Vec<usize> = (0..data.pairs.len()).collect();
    shuffle(&mut order, seed);
    order
        .chunks(micro)
        .map(|chunk| {
            let pairs: Vec<&PairExample> = chunk.iter().map(|&i| &data.pairs[i]).collect();
            ScoredPairs::from_pairs(&pairs, pad_id, device)
        })
        .collect()
}

/// Batches of labeled completions for KTO, shuffled with `seed`, with their mismatched rows when
/// `mismatched`. A lone row left at the end joins the batch before it: a row's mismatched
/// completion comes from another row of its batch.
fn labeled_batches<B: AutodiffBackend>(
    data: &Dataset,
    micro: usize,
    pad_id: u32,
    seed: u64,
    mismatched: bool,
    max_length: Option<usize>,
    device: &B::Device,
) -> Vec<LabeledBatch<B>> {
    let mut order: Vec<usize> = (0..data.labeled.len()).collect();
    shuffle(&mut order, seed);
    let n = labeled_batch_count(order.len(), micro);
    (0..n)
        .map(|b| {
            let end = if b + 1 == n {
                order.len()
            } else {
                (b + 1) * micro
            };
            let rows: Vec<&LabeledExample> = order[b * micro..end]
                .iter()
                .map(|&i| &data.labeled[i])
                .collect();
            LabeledBatch::from_labeled(&rows, pad_id, mismatched, max_length, device)
        })
        .collect()
}

/// How many micro-batches [`labeled_batches`] makes of `rows` rows.
fn labeled_batch_count(rows: usize, micro: usize) -> usize {
    let n = rows.div_ceil(micro);
    if n >= 2 && rows % micro == 1 {
        n - 1
    } else {
        n
    }
}

/// Every pair's log-probs (chosen, rejected) under the frozen reference `model`, computed once,
/// in pair order.
fn precompute_reference<B: AutodiffBackend>(
    model: &Decoder<B>,
    data: &Dataset,
    micro: usize,
    pad_id: u32,
    ld_alpha: Option<f64>,
    device: &B::Device,
) -> Vec<(f32, f32)> {
    pair_batches::<B>(data, micro, pad_id, None, None, device)
        .iter()
        .flat_map(|batch| {
            let (chosen, rejected) = frozen_logps(model, batch, ld_alpha);
            f32_values(chosen)
                .into_iter()
                .zip(f32_values(rejected))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// GRPO's reward functions with their names and weights, every prompt row holding the columns
/// they read; and its reward programs, started.
#[allow(clippy::type_complexity)]
fn reward_functions(
    section: &GrpoSection,
    data: &Dataset,
) -> Result<(Vec<(RewardFunction, RewardNames, f64)>, Vec<RewardProgram>), RunError> {
    let (mut out, mut programs) = (Vec::new(), Vec::new());
    for spec in &section.reward_functions {
        let function = match spec.function().map_err(RunError::Mismatch)? {
            RewardSpec::Rule(function) => function,
            RewardSpec::Program { name, command, dir } => {
                programs.push(RewardProgram::start(&command, &dir, &name, spec.weight)?);
                continue;
            }
        };
        if let Some(field) = function.column()
            && let Some((_, source)) = data
                .prompts
                .iter()
                .zip(&data.prompt_sources)
                .find(|(p, _)| function.score("", 0, &p.columns).is_none())
        {
            return Err(RunError::Mismatch(format!(
                "{}:{}: the row has no `{field}` (text or number), which a `contains` reward \
                 function compares completions with; give every prompt row that column",
                source.path.display(),
                source.line
            )));
        }
        let names = RewardNames::of(&function.name());
        out.push((function, names, spec.weight));
    }
    Ok((out, programs))
}

/// GRPO's reward models, each a one-label sequence classifier read with its own tokenizer and
/// chat template, before the pad token its config names (else its tokenizer's pad, else EOS).
fn load_reward_models<B: burn::tensor::backend::Backend>(
    section: &GrpoSection,
    device: &B::Device,
) -> Result<Vec<RewardModel<B>>, RunError> {
    let mut out = Vec::new();
    for (i, dir) in section.reward_models.iter().enumerate() {
        let mut loaded = Pretrained::<B>::load(dir, device)?;
        if loaded.model.config.classifier_labels != Some(1) {
            return Err(RunError::Mismatch(format!(
                "`grpo.reward_models` names {}, which is not a one-label sequence classifier \
                 (its config.json's `architectures` should end in ForSequenceClassification): \
                 train one with `train.strategy = \"reward\"` and fold its adapter in with \
                 `burnish merge`",
                dir.display()
            )));
        }
        // As TRL reads a reward model: before its tokenizer's pad token (else EOS).
        let tokenizer = Tokenizer::from_dir(dir)?;
        if let Some(pad) = tokenizer.pad_id() {
            loaded.model.config.pad_token_id = Some(pad);
        }
        let encoder = Encoder::new(tokenizer, ChatTemplate::from_dir(dir)?, TrainOn::default());
        let mut stem = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("model{i}"));
        let clashes = section.reward_models[..i]
            .iter()
            .any(|other| other.file_name() == dir.file_name());
        if clashes {
            stem = format!("{stem}-{i}");
        }
        out.push(RewardModel {
            names: RewardNames::of(&stem),
            model: loaded.model,
            encoder,
            weight: section.reward_weights.as_ref().map_or(1.0, |w| w[i]),
        });
    }
    Ok(out)
}

/// One pass of micro-batches over a dataset, of the strategy's kind of row.
enum Batches<B: AutodiffBackend> {
    Tokens(Vec<TokenBatch<B>>),
    Pairs(Vec<PairBatch<B>>),
    Labeled(Vec<LabeledBatch<B>>),
    Scored(Vec<ScoredPairs<B>>),
    /// The prompts of each optimizer step (indices), completed when the step comes.
    Prompts(Vec<Vec<usize>>),
}

impl<B: AutodiffBackend> Batches<B> {
    fn len(&self) -> usize {
        match self {
            Self::Tokens(b) => b.len(),
            Self::Pairs(b) => b.len(),
            Self::Labeled(b) => b.len(),
            Self::Scored(b) => b.len(),
            Self::Prompts(b) => b.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a micro-batch counts toward throughput (input tokens that are not padding) and toward
/// the run's trained tokens.
trait Counted {
    fn tokens(&self) -> usize;
    fn trained_tokens(&self) -> usize;
}

impl<B: AutodiffBackend> Counted for TokenBatch<B> {
    fn tokens(&self) -> usize {
        self.tokens
    }

    fn trained_tokens(&self) -> usize {
        self.trained_tokens
    }
}

impl<B: AutodiffBackend> Counted for PairBatch<B> {
    fn tokens(&self) -> usize {
        self.chosen.tokens + self.rejected.tokens
    }

    fn trained_tokens(&self) -> usize {
        self.chosen.trained_tokens + self.rejected.trained_tokens
    }
}

/// A KTO batch counts its trained rows; its mismatched rows are only scored.
impl<B: AutodiffBackend> Counted for LabeledBatch<B> {
    fn tokens(&self) -> usize {
        self.matched.tokens
    }

    fn trained_tokens(&self) -> usize {
        self.matched.trained_tokens
    }
}

/// A reward model's pairs count every token: each one feeds the scores.
impl<B: AutodiffBackend> Counted for ScoredPairs<B> {
    fn tokens(&self) -> usize {
        self.tokens
    }

    fn trained_tokens(&self) -> usize {
        self.tokens
    }
}

/// GRPO's completions count as their rows of prompt and completion do.
impl<B: AutodiffBackend> Counted for Rollouts<B> {
    fn tokens(&self) -> usize {
        self.tokens.tokens()
    }

    fn trained_tokens(&self) -> usize {
        self.tokens.trained_tokens()
    }
}

/// [`optimizer_step`] over the micro-batches of `batches` in `range` (cut at the end), with the
/// trained tokens it took (when it succeeded) and the input tokens it read.
#[allow(clippy::type_complexity)]
fn counted_step<B, S>(
    model: Decoder<B>,
    strategy: &S,
    batches: &[S::Batch],
    range: std::ops::Range<usize>,
    optimizer: &mut AdamW<B>,
    schedule: &Schedule,
    activations: Activations,
) -> (
    Result<((Decoder<B>, StepMetrics), usize), TrainError>,
    usize,
)
where
    B: AutodiffBackend,
    S: Strategy<B>,
    S::Batch: Counted,
{
    let micro_batches = &batches[range.start..range.end.min(batches.len())];
    let tokens = micro_batches.iter().map(Counted::tokens).sum();
    let trained = micro_batches.iter().map(Counted::trained_tokens).sum();
    let result = optimizer_step(
        model,
        strategy,
        micro_batches,
        optimizer,
        schedule,
        activations,
    );
    (result.map(|done| (done, trained)), tokens)
}

/// Mean loss per unit and mean metrics of `strategy` over `batches`.
fn evaluate<B: AutodiffBackend, S: Strategy<B>>(
    model: &Decoder<B>,
    strategy: &S,
    batches: &[S::Batch],
) -> (f64, Vec<(&'static str, f64)>) {
    let (mut sum, mut units) = (0.0, 0.0);
    let mut metrics = MetricMeans::default();
    for batch in batches {
        let out = strategy.loss(model, batch, None);
        sum += first_value(out.loss_sum);
        units += out.units;
        metrics.add(out.metrics);
    }
    (sum / units.max(1.0), metrics.means())
}

/// `metrics.jsonl`, one JSON object per line, counting what it has written; and the same
/// values as TensorBoard scalars when the recipe asks for them.
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    lines: usize,
    tensorboard: Option<EventFile>,
}

impl MetricsLog {
    fn write(&mut self, line: serde_json::Value) -> Result<(), RunError> {
        writeln!(self.file, "{line}").map_err(io_err(&self.path))?;
        self.lines += 1;
        if let Some(events) = &mut self.tensorboard
            && let Some((step, values)) = tagged_scalars(&line)
        {
            let path = events.path().to_path_buf();
            events.scalars(step, &values).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

/// Reports a `[check]` result to the caller and to `metrics.jsonl`.
fn log_check(
    log: &mut MetricsLog,
    on_event: &mut impl FnMut(&RunEvent),
    after: bool,
    step: usize,
    report: &CheckReport,
) -> Result<(), RunError> {
    let mut line = json!({
        "check": if after { "after" } else { "before" },
        "step": step,
        "exact_match": report.exact_rate(),
    });
    if let Some(p) = report.preferred_rate() {
        line["prefers_chosen"] = json!(p);
    }
    on_event(&RunEvent::Check {
        after,
        report: report.clone(),
    });
    log.write(line)
}

fn files(paths: &[PathBuf]) -> Vec<&Path> {
    paths.iter().map(PathBuf::as_path).collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the recipe on `device`, reporting progress to `on_event`. With `resume`, the run continues
/// from the newest complete checkpoint in its output directory, to the same numbers as an
/// uninterrupted run.
pub fn train<B: AutodiffBackend>(
    recipe: &Recipe,
    device: &B::Device,
    resume: bool,
    mut on_event: impl FnMut(&RunEvent),
) -> Result<RunSummary, RunError> {
    let base = recipe.model.dir();
    let t = &recipe.train;
    if recipe.model.hub_id().is_some() && recipe.model.local.is_none() {
        return Err(RunError::Mismatch(format!(
            "`model.base = \"{}\"` is not a local directory and was not downloaded from the Hub",
            recipe.model.base.display()
        )));
    }

    // The adapter's targets, or the adapter it continues, are checked against the config before
    // anything is loaded.
    let config_path = base.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
        path: config_path.clone(),
        source,
    })?;
    let hf_config = HfConfig::from_json_str(&config_text, &config_path)?;
    let reward = t.strategy == StrategyKind::Reward;
    match hf_config.decoder.classifier_labels {
        Some(_) if !reward => {
            return Err(RunError::Mismatch(format!(
                "{} is a sequence classifier (a reward model), which has no LM head: only \
                 `train.strategy = \"reward\"` trains it",
                config_path.display()
            )));
        }
        Some(labels) if labels != 1 => {
            return Err(RunError::Mismatch(format!(
                "{} is a classifier with {labels} labels, and a reward model has one: start \
                 from its causal LM, or from a one-label classifier",
                config_path.display()
            )));
        }
        _ => {}
    }
    if let Some(section) = &recipe.adapter {
        let modules = linear_module_names(&hf_config.decoder);
        match &section.init_from {
            None => {
                select_targets(&modules, &lora_config(section, &recipe.model.base))?;
            }
            Some(from) => {
                let loaded = LoraConfig::from_file(&from.join(ADAPTER_CONFIG_FILE))?;
                check_init_from(section, &loaded, from, &modules, &recipe.model.base)?;
            }
        }
    }

    // Data next: it is cheap, and its errors should not wait for the model.
    let tokenizer = Tokenizer::from_dir(base)?;
    let pad_id = tokenizer.pad_id().unwrap_or(0);
    let template = match &recipe.data.chat_template {
        Some(choice) => choice.load()?,
        None => ChatTemplate::from_dir(base)?,
    };
    let encoder = Encoder::new(tokenizer, template, recipe.data.loader.train_on);
    let train_files = recipe.data.files(&recipe.data.train);
    let eval_files = recipe.data.files(&recipe.data.eval);
    let checked = recipe.check.iter().map(|c| ("check.file", &c.file));
    let named = train_files
        .iter()
        .map(|f| ("data.train", f))
        .chain(eval_files.iter().map(|f| ("data.eval", f)))
        .chain(checked);
    for (key, file) in named {
        if !file.exists() {
            return Err(RunError::Mismatch(format!(
                "`{key}` names {}, which does not exist; paths in a recipe are relative to the \
                 recipe file (a Hub dataset is `owner/name` or `hf://datasets/owner/name/path`)",
                file.display()
            )));
        }
    }
    let loaded = load(&files(&train_files), &encoder, &recipe.data.loader)?;
    let (train_data, eval_data) = if !recipe.data.eval.is_empty() {
        (
            loaded,
            load(&files(&eval_files), &encoder, &recipe.data.loader)?,
        )
    } else if recipe.data.loader.eval_ratio > 0.0 {
        loaded.split_eval(recipe.data.loader.eval_ratio, recipe.data.loader.seed)
    } else {
        (loaded, Dataset::default())
    };
    // KTO trains on labeled completions; preference pairs become two of them.
    let rows = t.strategy.rows();
    let (train_data, eval_data) = match rows {
        Rows::Labeled => (train_data.unpaired(), eval_data.unpaired()),
        Rows::Examples | Rows::Pairs | Rows::Prompts => (train_data, eval_data),
    };
    for data in [&train_data, &eval_data] {
        check_vocabulary(data, hf_config.decoder.vocab_size, base)?;
    }
    let reference_weights = match recipe.reference_adapter() {
        Some((key, dir)) => {
            let path = dir.join(ADAPTER_WEIGHTS_FILE);
            Some(std::fs::read(&path).map_err(|source| {
                RunError::Mismatch(format!(
                    "`{key}`: cannot read {}: {source}; it must be a PEFT-format adapter \
                     directory",
                    path.display()
                ))
            })?)
        }
        None => None,
    };
    let reward_models = match recipe.grpo.reward_models.as_slice() {
        [] => None,
        dirs => Some(model_files_digest(dirs, "grpo.reward_models")?),
    };
    let identity = RunIdentity::of(
        recipe,
        config_text.as_bytes(),
        reference_weights.as_deref(),
        reward_models,
        &train_data,
    );
    drop(reference_weights);
    let count_of = |data: &Dataset| match rows {
        Rows::Examples => data.examples.len(),
        Rows::Pairs => data.pairs.len(),
        Rows::Labeled => data.labeled.len(),
        Rows::Prompts => data.prompts.len(),
    };
    let count = count_of(&train_data);
    if count == 0 {
        let want = match rows {
            Rows::Examples => "examples",
            Rows::Pairs => "preference pairs",
            Rows::Labeled => "labeled completions (or preference pairs)",
            Rows::Prompts => "prompts alone (rows with a `prompt` and nothing to answer it)",
        };
        return Err(RunError::Mismatch(format!(
            "`train.strategy = \"{}\"` needs {want}, but the training files hold none ({} \
             examples, {} preference pairs, {} labeled completions, {} prompts); check \
             `train.strategy` and `data.format`",
            t.strategy.name(),
            train_data.examples.len(),
            train_data.pairs.len(),
            train_data.labeled.len(),
            train_data.prompts.len(),
        )));
    }
    let kto_uses_kl = t.strategy == StrategyKind::Kto && recipe.kto.loss().uses_kl;
    if kto_uses_kl && count < 2 {
        return Err(RunError::Mismatch(
            "`kto.loss = \"kto\"` estimates its KL term from prompts paired with other rows' \
             completions, and the training files hold one row: add rows or use \
             `kto.loss = \"apo_zero_unpaired\"`"
                .into(),
        ));
    }
    let check_cases = match &recipe.check {
        Some(c) => load_cases(&c.file, &encoder, &recipe.data.loader)?,
        None => Vec::new(),
    };

    // Then the model, its adapter, and the optimizer.
    let dir = &recipe.output.dir;
    if !resume && let Some(earlier) = checkpoints(dir).pop() {
        return Err(RunError::Checkpoint(format!(
            "{} holds a checkpoint of an earlier run: continue that run with --resume, or \
             start afresh after removing {} (or pick another `output.dir`)",
            earlier.display(),
            dir.join("checkpoints").display()
        )));
    }
    let checkpoint = if resume {
        let latest = checkpoints(dir).pop().ok_or_else(|| {
            RunError::Checkpoint(format!(
                "{}: no complete checkpoint to resume from; run without --resume",
                dir.join("checkpoints").display()
            ))
        })?;
        let changed = read_identity(&latest)?.compare(&identity, &latest)?;
        let (progress, moments) = read_checkpoint(&latest)?;
        Some((latest, progress, moments, changed))
    } else {
        None
    };
    let mut pretrained = match recipe.model.init {
        ModelInit::Pretrained => Pretrained::<B>::load_in(base, recipe.model.dtype, device)?,
        ModelInit::Random => Pretrained::<B>::random_in(base, t.seed, recipe.model.dtype, device)?,
    };
    // A reward model starts from the base as a one-label classifier: a causal LM gets a fresh
    // head, drawn with the config's `initializer_range` as transformers draws it.
    if reward && !pretrained.model.is_classifier() {
        let std = pretrained.config.initializer_range(&config_path)?;
        pretrained.model = pretrained.model.into_reward_model(t.seed, std);
    }
    let config = pretrained.config.clone();
    let stop_tokens = pretrained.eos_token_ids();
    let check = |model: &Decoder<B>| -> Result<Option<CheckReport>, RunError> {
        match &recipe.check {
            Some(c) => run_check(
                &model.valid(),
                &encoder.tokenizer,
                &check_cases,
                c.max_new_tokens,
                &stop_tokens,
            )
            .map(Some),
            None => Ok(None),
        }
    };
    // DPO's and KTO's reference is the base: the trained model with its adapter off. A full
    // fine-tune has no adapter to switch off, and a `reference_adapter` goes on a base of its
    // own: those references are a copy of the base as loaded (never the training state, so a
    // resumed run gets the same), with that adapter on it. DPO computes their log-probs once
    // before training; KTO keeps the copy, since its mismatched rows change with every batch.
    let dpo = t.strategy == StrategyKind::Dpo;
    let grpo_kl = t.strategy == StrategyKind::Grpo && recipe.grpo.beta != 0.0;
    if t.strategy == StrategyKind::Grpo && !grpo_kl && recipe.grpo.reference_adapter.is_some() {
        return Err(RunError::Mismatch(
            "`grpo.reference_adapter` is the KL term's reference, and `grpo.beta` is 0: set \
             `grpo.beta` or remove the reference adapter"
                .into(),
        ));
    }
    let separate_reference = (matches!(t.strategy, StrategyKind::Dpo | StrategyKind::Kto)
        || grpo_kl)
        && (recipe.adapter.is_none() || recipe.reference_adapter().is_some());
    let precompute_ref = dpo && (recipe.dpo.precompute_ref || separate_reference);
    let reference_base = separate_reference.then(|| pretrained.model.clone());
    let mut adapter_config = None;
    let resumed_from = checkpoint.as_ref().map(|(path, ..)| path.as_path());
    let mut model = match (&recipe.adapter, resumed_from) {
        (None, None) => pretrained.model,
        (None, Some(path)) => Pretrained::<B>::load_in(path, recipe.model.dtype, device)?.model,
        (Some(_), Some(path)) => {
            let (model, loaded) = pretrained.model.with_adapter(path)?;
            adapter_config = Some(loaded);
            model
        }
        (Some(section), None) => match &section.init_from {
            Some(dir) => {
                let (model, loaded) = pretrained.model.with_adapter(dir)?;
                adapter_config = Some(loaded);
                model
            }
            None => {
                let lora = lora_config(section, &recipe.model.base);
                let (model, _) = pretrained.model.with_lora(&lora, t.seed)?;
                adapter_config = Some(lora);
                model
            }
        },
    };
    // A reward model's adapter continues only as a reward model, and a reward model scores with
    // one label.
    match (reward, model.config.classifier_labels) {
        (false, Some(_)) => {
            return Err(RunError::Mismatch(format!(
                "`adapter.init_from` (or the checkpoint resumed) holds a reward model's adapter \
                 (task_type SEQ_CLS, with a classifier head): only `train.strategy = \"reward\"` \
                 continues it; strategy \"{}\" needs a language model's adapter",
                t.strategy.name()
            )));
        }
        (true, Some(labels)) if labels != 1 => {
            return Err(RunError::Mismatch(format!(
                "`adapter.init_from` holds a classifier head of {labels} labels, and a reward \
                 model has one: start from a one-label reward adapter or from a language \
                 model's adapter"
            )));
        }
        _ => {}
    }
    if reward {
        // Its head trains whole, and is saved beside the adapter as PEFT saves a SEQ_CLS task's;
        // it scores each row before the pad token the loader pads with, which a saved model's
        // config names.
        model.score = model.score.map(|head| head.set_require_grad(true));
        model.config.pad_token_id = Some(pad_id);
        if let Some(lora) = &mut adapter_config {
            lora.task = Task::SequenceClassification;
        }
    }
    model.neftune_noise_alpha = t.neftune_noise_alpha;
    // GRPO's scorers, loaded and checked against the data before anything is written.
    let rewards = match t.strategy {
        StrategyKind::Grpo => {
            let inner_device = model.embed_tokens.val().inner().device();
            let models = load_reward_models(&recipe.grpo, &inner_device)?;
            let (functions, programs) = reward_functions(&recipe.grpo, &train_data)?;
            Rewards {
                models,
                functions,
                programs,
            }
        }
        _ => Rewards {
            models: Vec::new(),
            functions: Vec::new(),
            programs: Vec::new(),
        },
    };
    // The reference model: the separate one (DPO precomputes its log-probs, KTO keeps it), or,
    // for DPO's precomputed log-probs, the trained model with its adapter off (a copy sharing
    // its weights).
    let reference_model = match (reference_base, recipe.reference_adapter()) {
        (Some(base), adapter) => {
            let reference = match adapter {
                Some((key, dir)) => {
                    let reference = base.with_adapter(dir)?.0;
                    if reference.is_classifier() {
                        return Err(RunError::Mismatch(format!(
                            "`{key}` names {}, a reward model's adapter (task_type SEQ_CLS): a \
                             reference must be a language model's adapter",
                            dir.display()
                        )));
                    }
                    reference
                }
                None => base,
            };
            Some(reference)
        }
        (None, _) => precompute_ref.then(|| adapters_off(model.clone())),
    };
    let mut progress = Progress {
        step: 0,
        skipped: 0,
        epoch: 0,
        next_group: 0,
        trained_tokens: 0,
        metrics_lines: 0,
    };

    let micro = t.micro_batch_size;
    // GRPO: the completions of an optimizer step are its prompts' groups.
    let prompts_per_step =
        (micro * t.gradient_accumulation / recipe.grpo.num_generations.max(1)).max(1);
    // Packed rows, not examples, make the micro-batches of a packed epoch.
    let batches_per_epoch = match (rows, t.pack, recipe.data.loader.max_length) {
        (Rows::Examples, true, Some(capacity)) => {
            let lengths: Vec<usize> = train_data.examples.iter().map(Example::len).collect();
            pack_best_fit_decreasing(&lengths, capacity)
                .len()
                .div_ceil(micro)
        }
        (Rows::Labeled, ..) => labeled_batch_count(count, micro),
        // An optimizer step's prompts make all its micro-batches of completions, and those make
        // `num_iterations` steps.
        (Rows::Prompts, ..) => {
            count.div_ceil(prompts_per_step) * t.gradient_accumulation * recipe.grpo.num_iterations
        }
        _ => count.div_ceil(micro),
    };
    let steps_per_epoch = batches_per_epoch.div_ceil(t.gradient_accumulation);
    let total_steps = match t.max_steps {
        Some(steps) => steps,
        None => t.epochs.checked_mul(steps_per_epoch).ok_or_else(|| {
            RunError::Mismatch(format!(
                "`train.epochs = {}` of {steps_per_epoch} steps each is more steps than can be \
                 counted; lower it or set `train.max_steps`",
                t.epochs
            ))
        })?,
    };
    let warmup = match (t.warmup_steps, t.warmup_ratio) {
        (Some(s), _) => s,
        (None, Some(r)) => Schedule::warmup_from_ratio(r, total_steps),
        (None, None) => 0,
    };
    let schedule = Schedule {
        kind: t.schedule.into(),
        peak_lr: t.lr,
        warmup_steps: warmup,
        total_steps,
    };
    let mut optimizer = AdamW::<B>::new(AdamWConfig {
        beta1: t.betas.0,
        beta2: t.betas.1,
        eps: t.eps,
        weight_decay: t.weight_decay,
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        loraplus_lr_ratio: t.loraplus_lr_ratio,
    });
    let mut notices = Vec::new();
    if let Some((_, saved, moments, changed)) = checkpoint {
        let inner_device = model.embed_tokens.val().inner().device();
        optimizer
            .import_state(&model, saved.step, moments, &inner_device)
            .map_err(RunError::Checkpoint)?;
        progress = saved;
        notices = changed;
    }
    let eval_count = count_of(&eval_data);
    notices.extend(data_notices(
        &train_data.report,
        "training",
        &recipe.data.loader,
    ));
    notices.extend(data_notices(
        &eval_data.report,
        "evaluation",
        &recipe.data.loader,
    ));
    if t.strategy == StrategyKind::Kto {
        notices.extend(kto_balance_notice(&train_data.labeled, &recipe.kto));
    }
    if warmup >= total_steps {
        notices.push(format!(
            "the warmup ({warmup} steps) is as long as the run ({total_steps} steps): the \
             learning rate never reaches `train.lr`"
        ));
    }
    on_event(&RunEvent::Prepared {
        train: count,
        eval: eval_count,
        steps: total_steps,
        notices,
    });
    let check_before = if resume { None } else { check(&model)? };

    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    remove_partial_checkpoints(dir)?;
    let recipe_path = dir.join("recipe.toml");
    burnish_peft::write_atomic(&recipe_path, recipe.to_toml().as_bytes())
        .map_err(io_err(&recipe_path))?;
    let metrics_path = dir.join("metrics.jsonl");
    // On resume, keep exactly the lines written up to the checkpoint.
    let kept: String = match std::fs::read_to_string(&metrics_path) {
        Ok(text) if resume => text
            .lines()
            .take(progress.metrics_lines)
            .map(|l| format!("{l}\n"))
            .collect(),
        _ => String::new(),
    };
    burnish_peft::write_atomic(&metrics_path, kept.as_bytes()).map_err(io_err(&metrics_path))?;
    let metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(io_err(&metrics_path))?;
    // A session's own event file, which drops what earlier files hold from the step it starts
    // at: the points past a resumed checkpoint, or every point of an earlier run in this folder.
    let tensorboard = match recipe.output.tensorboard {
        true => {
            let events = dir.join("tensorboard");
            let from = if resume { progress.step as u64 + 1 } else { 0 };
            Some(EventFile::create(&events, from).map_err(io_err(&events))?)
        }
        false => None,
    };
    let mut metrics_log = MetricsLog {
        file: metrics_file,
        path: metrics_path,
        lines: progress.metrics_lines,
        tensorboard,
    };
    if let Some(report) = &check_before {
        log_check(
            &mut metrics_log,
            &mut on_event,
            false,
            progress.step,
            report,
        )?;
    }
    let metric_map = |m: &[(&'static str, f64)]| {
        m.iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
    };

    let pack = t.pack.then_some(recipe.data.loader.max_length).flatten();
    // One pass over `data` in micro-batches; `reference` holds DPO's precomputed log-probs.
    let batches = |data: &Dataset, seed: u64, reference: Option<&[(f32, f32)]>| match rows {
        Rows::Examples => {
            let config = BatchConfig {
                batch_size: micro,
                pack_length: pack,
                pad_id,
                seed,
            };
            Batches::Tokens(token_batches::<B>(
                &make_batches(&data.examples, &config),
                device,
            ))
        }
        Rows::Pairs if reward => {
            Batches::Scored(scored_batches::<B>(data, micro, pad_id, seed, device))
        }
        Rows::Prompts => {
            let mut order: Vec<usize> = (0..data.prompts.len()).collect();
            shuffle(&mut order, seed);
            Batches::Prompts(
                order
                    .chunks(prompts_per_step)
                    .map(<[usize]>::to_vec)
                    .collect(),
            )
        }
        Rows::Pairs => Batches::Pairs(pair_batches::<B>(
            data,
            micro,
            pad_id,
            Some(seed),
            reference,
            device,
        )),
        Rows::Labeled => Batches::Labeled(labeled_batches::<B>(
            data,
            micro,
            pad_id,
            seed,
            kto_uses_kl,
            recipe.data.loader.max_length,
            device,
        )),
    };
    let activations = Activations::checkpointed_if(t.gradient_checkpointing);
    let reward_strategy = recipe.reward.strategy();
    let preference = match t.strategy {
        StrategyKind::Orpo => Preference::Orpo(Orpo {
            beta: recipe.orpo.beta,
        }),
        StrategyKind::Cpo => Preference::Cpo(recipe.cpo.strategy()),
        _ => Preference::Dpo(recipe.dpo.strategy()),
    };
    let reference_of = |data: &Dataset| {
        reference_model
            .as_ref()
            .filter(|_| precompute_ref)
            .map(|r| precompute_reference(r, data, micro, pad_id, recipe.dpo.ld_alpha, device))
    };
    let eval_batches = batches(&eval_data, t.seed, reference_of(&eval_data).as_deref());
    let train_reference = reference_of(&train_data);
    // KTO keeps its separate reference for the run; DPO's is done with.
    // KTO and GRPO keep their separate reference for the run; DPO's is done with.
    let (kto_reference, grpo_reference) = match t.strategy {
        StrategyKind::Kto => (reference_model.map(|r| r.valid()), None),
        StrategyKind::Grpo => (None, reference_model.map(|r| r.valid())),
        _ => (None, None),
    };
    let kto = Kto {
        loss: recipe.kto.loss(),
        reference: kto_reference,
    };
    let grpo = Grpo {
        reference: grpo_reference,
        ..recipe.grpo.strategy::<B>()
    };
    let sampling = Sampling {
        num_generations: recipe.grpo.num_generations,
        options: GenerateOptions {
            max_new_tokens: recipe.grpo.max_completion_length,
            temperature: recipe.grpo.temperature as f32,
            top_k: recipe.grpo.top_k,
            top_p: (recipe.grpo.top_p < 1.0).then_some(recipe.grpo.top_p as f32),
            seed: 0,
            // The model's end tokens and its tokenizer's, as TRL stops on both.
            stop_tokens: stop_tokens
                .iter()
                .copied()
                .chain(
                    encoder
                        .tokenizer
                        .special
                        .eos_token
                        .as_deref()
                        .and_then(|t| encoder.tokenizer.token_to_id(t)),
                )
                .collect(),
        },
        scale: recipe.grpo.scale(),
        mask_truncated: recipe.grpo.mask_truncated_completions,
        micro,
        pad_id,
    };
    type Evaluation = Option<(f64, Vec<(&'static str, f64)>)>;
    let run_eval = |model: &Decoder<B>| -> Result<Evaluation, RunError> {
        let model = &model.for_evaluation();
        Ok(match &eval_batches {
            _ if eval_batches.is_empty() => None,
            Batches::Tokens(b) => Some(evaluate(model, &Sft, b)),
            Batches::Pairs(b) => Some(evaluate(model, &preference, b)),
            Batches::Labeled(b) => Some(evaluate(model, &kto, b)),
            Batches::Scored(b) => Some(evaluate(model, &reward_strategy, b)),
            // As TRL evaluates GRPO: completions drawn for the held-out prompts (the same draws
            // at every evaluation, from seeds of their own), scored, and the loss and
            // generation metrics of each step's worth averaged.
            Batches::Prompts(steps) => {
                let mut sum = 0.0;
                let mut metrics = MetricMeans::default();
                for (s, indices) in steps.iter().enumerate() {
                    let prompts: Vec<&PromptExample> =
                        indices.iter().map(|&i| &eval_data.prompts[i]).collect();
                    let seed = t.seed.wrapping_add(EVAL_SEEDS).wrapping_add(s as u64);
                    let (batches, generated) = rollouts(
                        model,
                        &prompts,
                        &encoder.tokenizer,
                        &rewards,
                        &sampling,
                        seed,
                        device,
                    )?;
                    let (loss, loss_metrics) = evaluate(model, &grpo, &batches);
                    sum += loss;
                    metrics.add(loss_metrics);
                    metrics.add(generated);
                }
                Some((sum / steps.len() as f64, metrics.means()))
            }
        })
    };

    let mut step = progress.step;
    let mut final_loss = f64::NAN;
    let mut trained_tokens = progress.trained_tokens;
    let mut eval_result = None;
    let mut epoch = progress.epoch;
    let mut skipped = progress.skipped;
    let mut first_group = progress.next_group;
    'epochs: while step + skipped < total_steps {
        let seed = t.seed.wrapping_add(epoch);
        // One epoch of micro-batches, grouped into optimizer steps.
        let epoch_batches = batches(&train_data, seed, train_reference.as_deref());
        let groups = match &epoch_batches {
            Batches::Prompts(steps) => steps.len(),
            other => other.len().div_ceil(t.gradient_accumulation),
        };
        // Optimizer steps per group of batches: GRPO's completions serve `num_iterations`.
        let iterations = match &epoch_batches {
            Batches::Prompts(_) => recipe.grpo.num_iterations,
            _ => 1,
        };
        let units = groups * iterations;
        // The group whose completions were drawn last, and those completions.
        let mut drawn: Option<(usize, Vec<Rollouts<B>>)> = None;
        if groups == 0 {
            return Err(RunError::Mismatch(
                "no training batch holds two tokens, the fewest a next-token loss needs; \
                 raise `data.max_length`"
                    .into(),
            ));
        }
        for unit in std::mem::take(&mut first_group)..units {
            let g = unit / iterations;
            if step + skipped >= total_steps {
                break 'epochs;
            }
            // Dropout draws from a stream fixed by the step, so a resumed run draws the same.
            B::seed(device, t.seed.wrapping_add((step + skipped) as u64));
            let range = g * t.gradient_accumulation..((g + 1) * t.gradient_accumulation);
            let started = Instant::now();
            let backup = model.clone();
            let mut generation_metrics = Vec::new();
            let (result, tokens) = match &epoch_batches {
                Batches::Prompts(steps) => {
                    if drawn.as_ref().is_none_or(|(group, _)| *group != g) {
                        let prompts: Vec<&PromptExample> =
                            steps[g].iter().map(|&i| &train_data.prompts[i]).collect();
                        let (mut rollouts, metrics) = rollouts(
                            &model,
                            &prompts,
                            &encoder.tokenizer,
                            &rewards,
                            &sampling,
                            t.seed.wrapping_add((step + skipped) as u64),
                            device,
                        )?;
                        if iterations > 1 {
                            for batch in &mut rollouts {
                                batch.old_logps = Some(grpo.sampling_logps(&model, &batch.tokens));
                            }
                        }
                        generation_metrics = metrics;
                        drawn = Some((g, rollouts));
                    }
                    let rollouts = &drawn.as_ref().expect("drawn above").1;
                    let n = rollouts.len();
                    let nothing_trains = rollouts.iter().all(|r| r.tokens.trained_tokens == 0);
                    if grpo.loss == GrpoLossKind::Dapo && nothing_trains {
                        // Every completion was cut and masked: nothing to learn from.
                        skipped += 1;
                        metrics_log.write(json!({
                            "skipped_step": step + 1,
                            "reason": "every completion reached `grpo.max_completion_length` \
                                       and `grpo.mask_truncated_completions` masks them all",
                        }))?;
                        continue;
                    }
                    counted_step(
                        model,
                        &grpo,
                        rollouts,
                        0..n,
                        &mut optimizer,
                        &schedule,
                        activations,
                    )
                }
                Batches::Tokens(b) => counted_step(
                    model,
                    &Sft,
                    b,
                    range.clone(),
                    &mut optimizer,
                    &schedule,
                    activations,
                ),
                Batches::Pairs(b) => counted_step(
                    model,
                    &preference,
                    b,
                    range.clone(),
                    &mut optimizer,
                    &schedule,
                    activations,
                ),
                Batches::Labeled(b) => counted_step(
                    model,
                    &kto,
                    b,
                    range.clone(),
                    &mut optimizer,
                    &schedule,
                    activations,
                ),
                Batches::Scored(b) => counted_step(
                    model,
                    &reward_strategy,
                    b,
                    range.clone(),
                    &mut optimizer,
                    &schedule,
                    activations,
                ),
            };
            let ((next, metrics), trained) = match result {
                Ok(done) => done,
                Err(
                    e @ (TrainError::NonFiniteLoss { .. } | TrainError::NonFiniteGradient { .. }),
                ) if t.on_nonfinite == OnNonFinite::Skip => {
                    // The update was never applied: go on from the weights before it.
                    model = backup;
                    skipped += 1;
                    metrics_log
                        .write(json!({"skipped_step": step + 1, "reason": e.to_string()}))?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            trained_tokens += trained;
            model = next;
            step = metrics.step;
            final_loss = metrics.loss;
            let seconds = started.elapsed().as_secs_f64();
            let tokens_per_s = tokens as f64 / seconds;
            let mut line = json!({
                "step": step,
                "epoch": epoch as f64 + (unit + 1) as f64 / units as f64,
                "loss": metrics.loss,
                "lr": metrics.lr,
                "grad_norm": metrics.grad_norm,
                "trained_tokens": trained_tokens,
                "tokens_per_s": tokens_per_s,
                "step_seconds": seconds,
            });
            let mut metrics = metrics;
            metrics.metrics.extend(generation_metrics);
            line.as_object_mut()
                .expect("a JSON object")
                .extend(metric_map(&metrics.metrics));
            metrics_log.write(line)?;
            on_event(&RunEvent::Step {
                metrics,
                tokens_per_s,
            });

            let last = step + skipped == total_steps;
            let due = (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || last;
            let evaluation = match due {
                true => run_eval(&model)?,
                false => None,
            };
            if let Some((loss, m)) = evaluation {
                let mut line = json!({"eval_step": step, "eval_loss": loss});
                line.as_object_mut()
                    .expect("a JSON object")
                    .extend(metric_map(&m));
                metrics_log.write(line)?;
                on_event(&RunEvent::Eval {
                    step,
                    loss,
                    metrics: m.clone(),
                });
                eval_result = Some((loss, m));
            }
            // Never between the steps that reuse one draw of completions: a resumed run could
            // not draw them again.
            let between_draws = (unit + 1).is_multiple_of(iterations);
            if t.save_every > 0 && step.is_multiple_of(t.save_every) && !last && between_draws {
                let at = Progress {
                    step,
                    skipped,
                    epoch,
                    next_group: unit + 1,
                    trained_tokens,
                    metrics_lines: metrics_log.lines,
                };
                let path = save_checkpoint(
                    dir,
                    &model,
                    adapter_config.as_ref(),
                    &config,
                    &optimizer,
                    &at,
                    &identity,
                    t.keep_checkpoints,
                )?;
                on_event(&RunEvent::Checkpoint { step, path });
            }
        }
        epoch += 1;
    }

    let check_after = check(&model)?;
    if let Some(report) = &check_after {
        log_check(&mut metrics_log, &mut on_event, true, step, report)?;
    }

    // Outputs: the adapter (or the whole model), tokenizer files, and a model card; a template
    // of the recipe's own goes with them, as `chat_template.jinja`.
    match &adapter_config {
        Some(lora) => save_adapter(dir, lora, &model.linears(), &model.whole_modules())?,
        None => {
            save_decoder(&model, &config, dir, SaveDtype::F32)?;
            for file in TOKENIZER_FILES {
                let from = base.join(file);
                if from.exists() {
                    let bytes = std::fs::read(&from).map_err(io_err(&from))?;
                    let to = dir.join(file);
                    burnish_peft::write_atomic(&to, &bytes).map_err(io_err(&to))?;
                }
            }
        }
    }
    if recipe.data.chat_template.is_some() {
        let to = dir.join(CHAT_TEMPLATE_FILE);
        burnish_peft::write_atomic(&to, encoder.template.source().as_bytes())
            .map_err(io_err(&to))?;
    }
    let (eval_loss, eval_metrics) = match eval_result {
        Some((l, m)) => (Some(l), m),
        None => (None, Vec::new()),
    };
    let card = model_card(
        recipe,
        step,
        final_loss,
        eval_loss,
        &eval_metrics,
        check_before.as_ref().zip(check_after.as_ref()),
    );
    let card_path = dir.join("README.md");
    burnish_peft::write_atomic(&card_path, card.as_bytes()).map_err(io_err(&card_path))?;
    Ok(RunSummary {
        steps: step,
        final_loss,
        eval_loss,
        eval_metrics,
        check_before,
        check_after,
        dir: dir.clone(),
    })
}

/// The run's `README.md`: Hub metadata, what was trained on what, and the final numbers.
fn model_card(
    recipe: &Recipe,
    steps: usize,
    final_loss: f64,
    eval_loss: Option<f64>,
    eval_metrics: &[(&'static str, f64)],
    check: Option<(&CheckReport, &CheckReport)>,
) -> String {
    let base = recipe.model.base.display();
    let datasets: Vec<String> = recipe
        .data
        .train
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let scratch = recipe.model.init == ModelInit::Random;
    let kind = match (scratch, recipe.train.strategy) {
        (true, _) => "Pre-training from scratch",
        (false, StrategyKind::Sft) => "Chat SFT",
        (false, StrategyKind::Instruct) => "Instruction tuning",
        (false, StrategyKind::Dpo) => "DPO",
        (false, StrategyKind::Orpo) => "ORPO",
        (false, StrategyKind::Cpo) => "CPO",
        (false, StrategyKind::Kto) => "KTO",
        (false, StrategyKind::Reward) => "Reward modelling",
        (false, StrategyKind::Grpo) => "GRPO",
    };
    let mut front = String::from("---\n");
    if !scratch {
        front.push_str(&format!("base_model: {base}\n"));
    }
    if recipe.adapter.is_some() {
        front.push_str("library_name: peft\n");
    }
    // The Hub links datasets by id; local files are named in the text only.
    let mut hub_datasets: Vec<String> = recipe
        .data
        .hub_datasets()
        .into_iter()
        .map(|d| d.repo)
        .collect();
    hub_datasets.sort();
    hub_datasets.dedup();
    if !hub_datasets.is_empty() {
        front.push_str("datasets:\n");
        for d in &hub_datasets {
            front.push_str(&format!("- {d}\n"));
        }
    }
    let method = match (scratch, recipe.adapter.is_some()) {
        (true, _) => "pretraining",
        (false, true) => "lora",
        (false, false) => "full-fine-tune",
    };
    let pipeline = match recipe.train.strategy {
        StrategyKind::Reward => "text-classification",
        _ => "text-generation",
    };
    front.push_str(&format!(
        "pipeline_tag: {pipeline}\ntags:\n- burnish\n- {method}\n---\n"
    ));
    let of = if scratch {
        format!("(the architecture and tokenizer of `{base}`)")
    } else {
        format!("of `{base}`")
    };
    let name = recipe
        .output
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut card = format!(
        "{front}\n# {name}\n\n{kind} {of} with burnish on {}.\n\n## Results\n\n| metric | value |\n|---|---|\n| optimizer steps | {steps} |\n| final training loss | {final_loss:.4} |\n",
        datasets.join(", "),
    );
    if let Some(l) = eval_loss {
        card.push_str(&format!("| eval loss | {l:.4} |\n"));
    }
    for (k, v) in eval_metrics {
        card.push_str(&format!("| eval {k} | {v:.4} |\n"));
    }
    if let Some((before, after)) = check {
        let n = after.answers.len();
        card.push_str(&format!(
            "| held-out exact match, before → after | {}/{n} → {}/{n} |\n",
            before.exact, after.exact
        ));
        if let (Some(b), Some(a)) = (before.preferred, after.preferred) {
            card.push_str(&format!(
                "| held-out pairs preferring the chosen reply, before → after | {b}/{n} → {a}/{n} |\n"
            ));
        }
    }
    card.push_str(&format!(
        "\n## Recipe\n\n```toml\n{}```\n",
        recipe.to_toml()
    ));
    card
}
