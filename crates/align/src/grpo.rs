//! Group relative policy optimisation (TRL's `GRPOTrainer`): every prompt is completed
//! `num_generations` times by the policy itself; reward models score each completion; a
//! completion's advantage is its reward less its group's mean, divided by the group's (or the
//! whole batch's) standard deviation; and the loss raises the log-probability of each completion
//! token in proportion to its advantage, through PPO's clipped ratio `π/π_old`: 1 in value on
//! the first update after the completions were drawn, and against the log-probabilities they
//! were drawn with on the further `num_iterations` updates that reuse them. With `beta > 0` a
//! per-token KL estimate against the reference (the base with the adapter off, or a kept copy
//! for a full fine-tune), `exp(ref − logp) − (ref − logp) − 1`, is added. Log-probabilities are
//! those of the sampling distribution: logits divided by the sampling temperature.
//!
//! The losses, by TRL's names: `dapo` (every completion token of the optimizer step weighs the
//! same), `grpo` (each completion's mean over its tokens, then the mean over completions) and
//! `dr_grpo` (token sums over completions × `max_completion_length`).

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burnish_data::{Batch, Encoder, Example, PromptExample, PromptSource, Tokenizer};
use burnish_model::{ActivationCheckpoints, Decoder, GenerateOptions, batch_rewards, sample_group};
use burnish_peft::f32_values;

use crate::error::RunError;
use crate::reward_program::RewardProgram;
use crate::strategy::{
    StepOutput, Strategy, TokenBatch, adapters_off, hidden_states, inner_batch, token_logprobs,
    token_logprobs_and_stats, trained_hidden_states,
};

/// How GRPO's per-token losses are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLossKind {
    /// Over every completion token of the optimizer step (TRL's default).
    Dapo,
    /// Over each completion's tokens, then over completions.
    Grpo,
    /// Token sums over completions × `max_completion_length` (Dr. GRPO).
    DrGrpo,
}

/// What rewards are divided by to make advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// The standard deviation of the completion's group (TRL's default).
    Group,
    /// The standard deviation of the whole generation batch.
    Batch,
    /// Nothing: advantages are rewards less their group's mean.
    None,
}

/// The unbiased standard deviation of `values` (TRL's `nanstd` without NaNs).
fn std_dev(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (variance * n / (n - 1.0)).sqrt()
}

/// The advantage of each completion (`rewards` in groups of `group` consecutive completions of
/// one prompt), as TRL computes them: the reward less its group's mean, divided by the group's
/// (or the batch's) standard deviation plus 1e-4 unless `scale` is `None`; and the fraction of
/// completions whose standard deviation is zero (their group taught nothing).
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> (Vec<f64>, f64) {
    let batch_std = std_dev(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    let mut zero = 0usize;
    for chunk in rewards.chunks(group) {
        let mean = chunk.iter().sum::<f64>() / chunk.len() as f64;
        let std = match scale {
            ScaleRewards::Batch => batch_std,
            ScaleRewards::Group | ScaleRewards::None => std_dev(chunk),
        };
        // torch.isclose(std, 0): |std| ≤ 1e-8.
        if std.abs() <= 1e-8 {
            zero += chunk.len();
        }
        out.extend(chunk.iter().map(|r| match scale {
            ScaleRewards::None => r - mean,
            _ => (r - mean) / (std + 1e-4),
        }));
    }
    (out, zero as f64 / rewards.len().max(1) as f64)
}

/// Completions of one micro-batch, each after its prompt, with their advantages.
#[derive(Debug, Clone)]
pub struct Rollouts<B: Backend> {
    /// Prompt then completion per row; the completion's tokens are the trained ones.
    pub tokens: TokenBatch<B>,
    /// `[rows]`
    pub advantages: Tensor<B, 1>,
    /// The log-probabilities the completions were drawn with, laid out as the trained ones
    /// (`[rows, positions − 1]`), when an update after the first reuses them; `None` when the
    /// policy being trained drew them.
    pub old_logps: Option<Tensor<B, 2>>,
}

impl<B: Backend> Rollouts<B> {
    /// Rows of `prompt + completion` (each completion's tokens trained, none when
    /// `trained[i]` is false), padded with `pad_id`.
    pub fn new(
        rows: &[(&[u32], &[u32], bool)],
        advantages: &[f64],
        pad_id: u32,
        device: &B::Device,
    ) -> Self {
        let examples: Vec<Example> = rows
            .iter()
            .map(|(prompt, completion, trained)| Example {
                input_ids: prompt.iter().chain(completion.iter()).copied().collect(),
                labels_mask: std::iter::repeat_n(false, prompt.len())
                    .chain(std::iter::repeat_n(*trained, completion.len()))
                    .collect(),
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let values: Vec<f32> = advantages.iter().map(|&a| a as f32).collect();
        Self {
            tokens: TokenBatch::from_batch(&Batch::padded(&refs, pad_id), device),
            advantages: Tensor::from_data(TensorData::new(values, [rows.len()]), device),
            old_logps: None,
        }
    }
}

/// GRPO's objective (see the module documentation).
#[derive(Debug, Clone)]
pub struct Grpo<B: AutodiffBackend> {
    pub loss: GrpoLossKind,
    /// Weight of the KL term (0: no reference pass).
    pub beta: f64,
    /// The ratio is clipped to `[1 − epsilon_low, 1 + epsilon_high]`.
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    /// The sampling temperature the log-probabilities are taken at.
    pub temperature: f64,
    pub max_completion_length: usize,
    /// A reference of its own (a full fine-tune's starting model); `None` for the trained
    /// model with its adapters off.
    pub reference: Option<Decoder<B::InnerBackend>>,
}

impl<B: AutodiffBackend> Strategy<B> for Grpo<B> {
    type Batch = Rollouts<B>;

    fn units(&self, batch: &Rollouts<B>) -> f64 {
        match self.loss {
            GrpoLossKind::Dapo => batch.tokens.trained_tokens as f64,
            GrpoLossKind::Grpo | GrpoLossKind::DrGrpo => batch.tokens.inputs.dims()[0] as f64,
        }
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &Rollouts<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let tokens = &batch.tokens;
        let mask = tokens.mask.clone();
        // Logits at the sampling temperature: the head is linear, so the hidden states scale.
        let hidden = at_temperature(
            trained_hidden_states(model, tokens, checkpoints),
            self.temperature,
        );
        let (logps, stats) = token_logprobs_and_stats(model, hidden, tokens, model.trains(), true);
        let advantages = batch.advantages.clone().unsqueeze_dim::<2>(1);
        // π/π_old with the policy's gradient: 1 in value unless the completions are reused.
        let (ratio, mut metrics) = match &batch.old_logps {
            Some(old) => {
                let ratio = (logps.clone() - old.clone()).exp();
                let metrics = clip_ratios(
                    &f32_values(ratio.clone().detach()),
                    &f32_values(mask.clone()),
                    &f32_values(batch.advantages.clone()),
                    [self.epsilon_low, self.epsilon_high],
                );
                (ratio, metrics)
            }
            // Drawn by the policy being trained, the ratio is exactly 1: nothing is clipped,
            // and nothing need be read back to tell.
            None => (
                (logps.clone() - logps.clone().detach()).exp(),
                CLIP_RATIOS.map(|name| (name, 0.0)).to_vec(),
            ),
        };
        let clipped = ratio
            .clone()
            .clamp(1.0 - self.epsilon_low, 1.0 + self.epsilon_high);
        let mut per_token = (ratio * advantages.clone())
            .min_pair(clipped * advantages)
            .neg();
        if self.beta != 0.0 {
            let reference = self.reference_logps(model, tokens);
            let gap = reference - logps.clone();
            let kl = gap.clone().exp() - gap - 1.0;
            let count = burnish_peft::first_value(mask.clone().sum()).max(1.0);
            metrics.push((
                "kl",
                burnish_peft::first_value((kl.clone() * mask.clone()).sum()) / count,
            ));
            per_token = per_token + kl.mul_scalar(self.beta);
        }
        let masked = per_token * mask.clone();
        let loss_sum = match self.loss {
            GrpoLossKind::Dapo => masked.sum(),
            GrpoLossKind::Grpo => (masked.sum_dim(1) / mask.sum_dim(1).clamp_min(1.0)).sum(),
            GrpoLossKind::DrGrpo => masked.sum().div_scalar(self.max_completion_length as f64),
        };
        if let Some(stats) = stats {
            let totals = stats.total();
            if totals.targets > 0.0 {
                metrics.push(("entropy", totals.entropy / totals.targets));
            }
        }
        StepOutput {
            loss_sum,
            units: self.units(batch),
            metrics,
        }
    }
}

impl<B: AutodiffBackend> Grpo<B> {
    /// `model`'s per-token log-probabilities of `tokens` at the sampling temperature as it is
    /// now, without gradient tracking: `π_old` for the updates that reuse these completions.
    pub fn sampling_logps(&self, model: &Decoder<B>, tokens: &TokenBatch<B>) -> Tensor<B, 2> {
        let inner = inner_batch(tokens);
        let policy = model.valid();
        let hidden = at_temperature(hidden_states(&policy, &inner), self.temperature);
        Tensor::from_inner(token_logprobs(&policy, hidden, &inner, false))
    }

    /// The reference's per-token log-probabilities of `tokens` at the sampling temperature,
    /// without gradient tracking.
    fn reference_logps(&self, model: &Decoder<B>, tokens: &TokenBatch<B>) -> Tensor<B, 2> {
        let inner = inner_batch(tokens);
        let values = |reference: &Decoder<B::InnerBackend>| {
            let hidden = at_temperature(hidden_states(reference, &inner), self.temperature);
            token_logprobs(reference, hidden, &inner, false)
        };
        let logps = match &self.reference {
            Some(reference) => values(reference),
            None => values(&adapters_off(model.valid())),
        };
        Tensor::from_inner(logps)
    }
}

/// TRL's names of [`clip_ratios`]' metrics, in their order.
const CLIP_RATIOS: [&str; 5] = [
    "clip_ratio/low_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_mean",
    "clip_ratio/high_max",
    "clip_ratio/region_mean",
];

/// TRL's clipping metrics of a micro-batch from its ratios `π/π_old` and trained-token mask
/// (`[rows, positions]`, row-major) and its rows' advantages, for the clipping range
/// `[1 − low, 1 + high]`: the fractions of trained tokens clipped below (a ratio under the range
/// where the advantage is negative), above (over it where positive) and either; the fewest
/// clipped below and the most clipped above in one row (rows with no trained token left out).
fn clip_ratios(
    ratios: &[f32],
    mask: &[f32],
    advantages: &[f32],
    [low, high]: [f64; 2],
) -> Vec<(&'static str, f64)> {
    let width = ratios.len() / advantages.len().max(1);
    let (mut low_sum, mut high_sum, mut count) = (0.0, 0.0, 0.0);
    let (mut low_min, mut high_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for (row, &advantage) in advantages.iter().enumerate() {
        let (mut row_low, mut row_high, mut row_count) = (0.0, 0.0, 0.0);
        for j in row * width..(row + 1) * width {
            let (ratio, weight) = (f64::from(ratios[j]), f64::from(mask[j]));
            if ratio < 1.0 - low && advantage < 0.0 {
                row_low += weight;
            }
            if ratio > 1.0 + high && advantage > 0.0 {
                row_high += weight;
            }
            row_count += weight;
        }
        if row_count > 0.0 {
            low_min = low_min.min(row_low / row_count);
            high_max = high_max.max(row_high / row_count);
        }
        (low_sum, high_sum, count) = (low_sum + row_low, high_sum + row_high, count + row_count);
    }
    let count = f64::max(count, 1.0);
    let seen = |v: f64| if v.is_finite() { v } else { 0.0 };
    let values = [
        low_sum / count,
        seen(low_min),
        high_sum / count,
        seen(high_max),
        (low_sum + high_sum) / count,
    ];
    CLIP_RATIOS.into_iter().zip(values).collect()
}

/// Final hidden states whose logits are those at `temperature` (left as they are at 1).
fn at_temperature<B: Backend>(hidden: Tensor<B, 3>, temperature: f64) -> Tensor<B, 3> {
    if temperature == 1.0 {
        hidden
    } else {
        hidden.div_scalar(temperature)
    }
}

/// A scorer's name and the metric names TRL logs for it: `rewards/<name>/mean` and `/std`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RewardNames {
    pub scorer: &'static str,
    pub mean: &'static str,
    pub std: &'static str,
}

impl RewardNames {
    /// The names of the scorer called `scorer`. Metric names live as long as the process: they
    /// are made once per run, a few bytes per scorer.
    pub fn of(scorer: &str) -> Self {
        let keep = |name: String| -> &'static str { Box::leak(name.into_boxed_str()) };
        Self {
            scorer: keep(scorer.to_string()),
            mean: keep(format!("rewards/{scorer}/mean")),
            std: keep(format!("rewards/{scorer}/std")),
        }
    }
}

/// A frozen sequence classifier that scores completions, with what reads them to it.
#[derive(Debug)]
pub struct RewardModel<B: Backend> {
    pub names: RewardNames,
    pub model: Decoder<B>,
    pub encoder: Encoder,
    pub weight: f64,
}

/// A rule that scores a completion without a model: TRL's `trl.rewards` functions, and a check
/// against the prompt row's own columns.
#[derive(Debug, Clone, PartialEq)]
pub enum RewardFunction {
    /// TRL's `think_format_reward`: 1 when the completion opens with `<think>`, holds no other
    /// `<think>` and closes it with `</think>`, else 0.
    ThinkFormat,
    /// TRL's `get_soft_overlong_punishment(max, cache)`: 0 up to `max − cache` tokens, then
    /// `(max − cache − length) / cache` down to −1 at `max`, −1 beyond.
    SoftOverlong { max: usize, cache: usize },
    /// 1 when the completion's text contains the row's `field` (its text, or its number as
    /// written), trimmed, else 0.
    Contains { field: String },
}

impl RewardFunction {
    /// The reward of a completion of `length` tokens decoded as `text`, for a prompt whose row
    /// holds `columns`; `None` when the row lacks the column this function reads.
    pub fn score(
        &self,
        text: &str,
        length: usize,
        columns: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<f64> {
        match self {
            Self::ThinkFormat => {
                let well_formed = text
                    .strip_prefix("<think>")
                    .is_some_and(|rest| !rest.contains("<think>") && rest.contains("</think>"));
                Some(if well_formed { 1.0 } else { 0.0 })
            }
            Self::SoftOverlong { max, cache } => {
                let free = max.saturating_sub(*cache);
                Some(if length <= free {
                    0.0
                } else if length <= *max {
                    (free as f64 - length as f64) / *cache as f64
                } else {
                    -1.0
                })
            }
            Self::Contains { field } => {
                let expected = match columns.get(field)? {
                    serde_json::Value::String(s) => s.trim().to_string(),
                    serde_json::Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                Some(if !expected.is_empty() && text.contains(&expected) {
                    1.0
                } else {
                    0.0
                })
            }
        }
    }

    /// The prompt rows' column it reads, if any.
    pub fn column(&self) -> Option<&str> {
        match self {
            Self::Contains { field } => Some(field),
            Self::ThinkFormat | Self::SoftOverlong { .. } => None,
        }
    }

    /// Its name in the metrics, as TRL names its functions.
    pub fn name(&self) -> String {
        match self {
            Self::ThinkFormat => "think_format_reward".into(),
            Self::SoftOverlong { .. } => "soft_overlong_punishment_reward".into(),
            Self::Contains { field } => format!("contains_{field}"),
        }
    }
}

/// What scores completions: reward models, reward functions and reward programs, each
/// weighted.
#[derive(Debug)]
pub struct Rewards<B: Backend> {
    pub models: Vec<RewardModel<B>>,
    /// With their names and weights.
    pub functions: Vec<(RewardFunction, RewardNames, f64)>,
    pub programs: Vec<RewardProgram>,
}

/// What a reward program is asked about a batch of completions: the keyword arguments TRL
/// passes a reward function. `prompts` and `completions` are messages for a conversation (a
/// completion as one assistant message) and text otherwise; `completion_ids` the completions'
/// tokens; and each of the prompt rows' other columns, one value per completion (`null` where
/// a row lacks it). `rows` holds each completion's prompt, text and tokens.
fn program_request(rows: &[(&PromptExample, &str, &[u32])]) -> serde_json::Value {
    use serde_json::{Value, json};
    const ARGUMENTS: [&str; 3] = ["prompts", "completions", "completion_ids"];
    let mut prompts = Vec::with_capacity(rows.len());
    let mut completions = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut columns: Vec<&str> = Vec::new();
    for (prompt, text, tokens) in rows {
        match &prompt.source {
            PromptSource::Chat { messages, .. } => {
                prompts.push(json!(messages));
                completions.push(json!([{"role": "assistant", "content": text}]));
            }
            PromptSource::Text(prompt) => {
                prompts.push(json!(prompt));
                completions.push(json!(text));
            }
        }
        ids.push(json!(tokens));
        for key in prompt.columns.keys() {
            if !columns.contains(&key.as_str()) && !ARGUMENTS.contains(&key.as_str()) {
                columns.push(key);
            }
        }
    }
    let mut request = serde_json::Map::new();
    request.insert(ARGUMENTS[0].into(), Value::Array(prompts));
    request.insert(ARGUMENTS[1].into(), Value::Array(completions));
    request.insert(ARGUMENTS[2].into(), Value::Array(ids));
    for key in columns {
        let values = rows
            .iter()
            .map(|(prompt, ..)| prompt.columns.get(key).cloned().unwrap_or(Value::Null))
            .collect();
        request.insert(key.into(), Value::Array(values));
    }
    Value::Object(request)
}

/// A reward model's failure to score a completion, naming the model.
fn model_failed<B: Backend>(reward: &RewardModel<B>, detail: String) -> RunError {
    RunError::Mismatch(format!(
        "{} (a reward model) cannot score a completion: {detail}",
        reward.names.scorer
    ))
}

/// How completions are drawn and made into micro-batches.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub num_generations: usize,
    pub options: GenerateOptions,
    pub scale: ScaleRewards,
    /// Completions cut at `max_new_tokens` train on nothing.
    pub mask_truncated: bool,
    /// Completions per micro-batch.
    pub micro: usize,
    pub pad_id: u32,
}

/// The micro-batches of one optimizer step: `num_generations` completions of each of `prompts`
/// drawn from `model` (group `i` seeded with `seed` and `i`), scored by `rewards`, with their
/// advantages; and the step's generation metrics under TRL's names.
#[allow(clippy::type_complexity)]
pub fn rollouts<B: AutodiffBackend>(
    model: &Decoder<B>,
    prompts: &[&PromptExample],
    tokenizer: &Tokenizer,
    rewards: &Rewards<B::InnerBackend>,
    sampling: &Sampling,
    seed: u64,
    device: &B::Device,
) -> Result<(Vec<Rollouts<B>>, Vec<(&'static str, f64)>), RunError> {
    let policy = model.valid();
    let g = sampling.num_generations;
    // Prompt, completion, and whether it was cut at `max_new_tokens`.
    let mut rows: Vec<(&[u32], Vec<u32>, bool)> = Vec::with_capacity(prompts.len() * g);
    let mut model_inputs: Vec<Vec<Vec<u32>>> = vec![Vec::new(); rewards.models.len()];
    let mut per_function: Vec<Vec<f64>> = vec![Vec::new(); rewards.functions.len()];
    // Each completion's prompt and text, for the reward programs.
    let mut texts: Vec<(&PromptExample, String)> = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let options = GenerateOptions {
            seed: seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add((i * g) as u64),
            ..sampling.options.clone()
        };
        for completion in sample_group(&policy, &prompt.prompt_ids, g, &options)? {
            let text = tokenizer.decode(&completion, true)?;
            for (scores, (function, names, _)) in per_function.iter_mut().zip(&rewards.functions) {
                let score = function
                    .score(&text, completion.len(), &prompt.columns)
                    .ok_or_else(|| {
                        RunError::Mismatch(format!(
                            "{}: a prompt row has no `{}` to compare completions with; give \
                             every row that column",
                            names.scorer,
                            function.column().unwrap_or_default()
                        ))
                    })?;
                scores.push(score);
            }
            // What each reward model reads, scored below in batches.
            for (inputs, reward) in model_inputs.iter_mut().zip(&rewards.models) {
                let full = reward
                    .encoder
                    .completed_text(&prompt.source, &text)
                    .map_err(|detail| model_failed(reward, detail))?;
                let ids = reward
                    .encoder
                    .tokenizer
                    .encode(&full, false)
                    .map_err(|e| model_failed(reward, e.to_string()))?;
                inputs.push(ids);
            }
            let stopped = completion
                .last()
                .is_some_and(|t| sampling.options.stop_tokens.contains(t));
            let truncated = !stopped && completion.len() >= sampling.options.max_new_tokens;
            rows.push((&prompt.prompt_ids, completion, truncated));
            if !rewards.programs.is_empty() {
                texts.push((*prompt, text));
            }
        }
    }
    let mut per_program: Vec<Vec<f64>> = Vec::with_capacity(rewards.programs.len());
    if !rewards.programs.is_empty() {
        let asked: Vec<(&PromptExample, &str, &[u32])> = texts
            .iter()
            .zip(&rows)
            .map(|((prompt, text), row)| (*prompt, text.as_str(), row.1.as_slice()))
            .collect();
        let request = program_request(&asked);
        for program in &rewards.programs {
            per_program.push(program.score(&request, rows.len())?);
        }
    }
    let mut per_model: Vec<Vec<f64>> = Vec::with_capacity(rewards.models.len());
    for (inputs, reward) in model_inputs.iter().zip(&rewards.models) {
        let mut scores = Vec::with_capacity(inputs.len());
        for chunk in inputs.chunks(sampling.micro.max(1)) {
            let batch = batch_rewards(&reward.model, chunk)
                .map_err(|e| model_failed(reward, e.to_string()))?;
            scores.extend(batch.into_iter().map(f64::from));
        }
        per_model.push(scores);
    }
    // Each scorer's scores with its names and weight.
    let scorers: Vec<(&[f64], RewardNames, f64)> = per_model
        .iter()
        .zip(&rewards.models)
        .map(|(scores, m)| (scores.as_slice(), m.names, m.weight))
        .chain(
            per_function
                .iter()
                .zip(&rewards.functions)
                .map(|(scores, (_, names, weight))| (scores.as_slice(), *names, *weight)),
        )
        .chain(
            per_program
                .iter()
                .zip(&rewards.programs)
                .map(|(scores, p)| (scores.as_slice(), p.names, p.weight)),
        )
        .collect();
    // A program's `null` (NaN) counts for nothing, as TRL's `nansum`.
    let total: Vec<f64> = (0..rows.len())
        .map(|r| {
            scorers
                .iter()
                .map(|(scores, _, w)| scores[r] * w)
                .filter(|v| !v.is_nan())
                .sum()
        })
        .collect();
    let (advantages, zero_std) = advantages(&total, g, sampling.scale);
    let completions: Vec<(usize, bool)> = rows.iter().map(|r| (r.1.len(), r.2)).collect();
    let mut metrics = generation_metrics(&total, &scorers, &completions);
    metrics.push(("frac_reward_zero_std", zero_std));
    let batches = rows
        .chunks(sampling.micro)
        .zip(advantages.chunks(sampling.micro))
        .map(|(chunk, advantages)| {
            let view: Vec<(&[u32], &[u32], bool)> = chunk
                .iter()
                .map(|(p, c, truncated)| {
                    (*p, c.as_slice(), !(*truncated && sampling.mask_truncated))
                })
                .collect();
            Rollouts::new(&view, advantages, sampling.pad_id, device)
        })
        .collect();
    Ok((batches, metrics))
}

/// The mean of `values` (0 for none).
fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The mean, min and max of `values` (0s for none).
fn mean_min_max(values: &[f64]) -> [f64; 3] {
    if values.is_empty() {
        return [0.0; 3];
    }
    [
        mean(values),
        values.iter().copied().fold(f64::INFINITY, f64::min),
        values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    ]
}

/// The unbiased standard deviation of `values`, 0 for fewer than two (where TRL's is NaN).
fn spread(values: &[f64]) -> f64 {
    if values.len() > 1 {
        std_dev(values)
    } else {
        0.0
    }
}

/// A step's generation metrics under TRL's names, from its completions' weighted rewards
/// (`total`), each scorer's own rewards (with its names and weight; NaN where a program gave
/// none, left out of its mean and deviation, 0s when it gave none at all), and each completion's
/// length and whether it was cut at the length limit: the rewards' mean and standard deviation,
/// overall and per scorer; the lengths of all completions and of those that ended with an end
/// token (0s when none did, as TRL logs them); the fraction cut.
fn generation_metrics(
    total: &[f64],
    scorers: &[(&[f64], RewardNames, f64)],
    completions: &[(usize, bool)],
) -> Vec<(&'static str, f64)> {
    let mut metrics = vec![("reward", mean(total)), ("reward_std", spread(total))];
    for (scores, names, _) in scorers {
        // Over the completions a scorer gave a reward (TRL's `nanmean`, `nanstd`).
        let given: Vec<f64> = scores.iter().copied().filter(|s| !s.is_nan()).collect();
        metrics.push((names.mean, mean(&given)));
        metrics.push((names.std, spread(&given)));
    }
    let lengths: Vec<f64> = completions.iter().map(|c| c.0 as f64).collect();
    let terminated: Vec<f64> = completions
        .iter()
        .filter(|c| !c.1)
        .map(|c| c.0 as f64)
        .collect();
    let [mean, min, max] = mean_min_max(&lengths);
    let [t_mean, t_min, t_max] = mean_min_max(&terminated);
    let cut = completions.len() - terminated.len();
    metrics.extend([
        ("completions/mean_length", mean),
        ("completions/min_length", min),
        ("completions/max_length", max),
        ("completions/mean_terminated_length", t_mean),
        ("completions/min_terminated_length", t_min),
        ("completions/max_terminated_length", t_max),
        (
            "completions/clipped_ratio",
            cut as f64 / completions.len().max(1) as f64,
        ),
    ]);
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The column check reads text and numbers, trimmed, and says when the row lacks it.
    #[test]
    fn contains_compares_with_the_rows_column() {
        let check = RewardFunction::Contains {
            field: "answer".into(),
        };
        let row = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert_eq!(
            check.score("so it is 42.", 3, &row(serde_json::json!({"answer": 42}))),
            Some(1.0)
        );
        assert_eq!(
            check.score("Paris", 1, &row(serde_json::json!({"answer": " Paris "}))),
            Some(1.0)
        );
        assert_eq!(
            check.score("Lyon", 1, &row(serde_json::json!({"answer": "Paris"}))),
            Some(0.0)
        );
        assert_eq!(
            check.score("", 0, &row(serde_json::json!({"answer": ""}))),
            Some(0.0)
        );
        assert_eq!(check.score("x", 1, &row(serde_json::json!({}))), None);
    }

    /// TRL's generation metrics: unbiased standard deviations, and the terminated lengths
    /// leaving out the cut completions (0s when every one was cut).
    #[test]
    fn generation_metrics_are_trls() {
        let names = RewardNames::of("judge");
        let judge = [1.0, 2.0, 4.0];
        let total = [0.5, 1.0, 2.0];
        let got = |completions: &[(usize, bool)]| -> std::collections::HashMap<_, _> {
            generation_metrics(&total, &[(&judge, names, 2.0)], completions)
                .into_iter()
                .collect()
        };
        let m = got(&[(3, false), (8, true), (5, false)]);
        let close = |key: &str, want: f64| {
            assert!((m[key] - want).abs() < 1e-12, "{key}: {} != {want}", m[key]);
        };
        close("reward", 3.5 / 3.0);
        // torch.tensor([0.5, 1.0, 2.0]).std() and ([1.0, 2.0, 4.0]).std()
        close("reward_std", 0.763_762_615_825_973_3);
        close("rewards/judge/mean", 7.0 / 3.0);
        close("rewards/judge/std", 1.527_525_231_651_946_7);
        close("completions/mean_length", 16.0 / 3.0);
        close("completions/min_length", 3.0);
        close("completions/max_length", 8.0);
        close("completions/mean_terminated_length", 4.0);
        close("completions/min_terminated_length", 3.0);
        close("completions/max_terminated_length", 5.0);
        close("completions/clipped_ratio", 1.0 / 3.0);
        // A program's `null`s (NaN) are left out of its mean and deviation, as TRL's
        // `nanmean`/`nanstd` leave them; none given at all reads 0.
        let (sparse, silent) = (RewardNames::of("sparse"), RewardNames::of("silent"));
        let given = [1.0, f64::NAN, 3.0];
        let none = [f64::NAN; 3];
        let m: std::collections::HashMap<_, _> = generation_metrics(
            &total,
            &[(&given, sparse, 1.0), (&none, silent, 1.0)],
            &[(3, false), (8, true), (5, false)],
        )
        .into_iter()
        .collect();
        assert_eq!(m["rewards/sparse/mean"], 2.0);
        assert_eq!(m["rewards/sparse/std"], std::f64::consts::SQRT_2);
        assert_eq!(m["rewards/silent/mean"], 0.0);
        assert_eq!(m["rewards/silent/std"], 0.0);
        let all_cut = got(&[(8, true), (8, true), (8, true)]);
        assert_eq!(all_cut["completions/mean_terminated_length"], 0.0);
        assert_eq!(all_cut["completions/max_terminated_length"], 0.0);
        assert_eq!(all_cut["completions/clipped_ratio"], 1.0);
    }

    #[test]
    fn a_group_whose_rewards_agree_has_no_advantage() {
        let (adv, zero) = advantages(&[1.0, 1.0, 0.0, 2.0], 2, ScaleRewards::Group);
        assert_eq!(&adv[..2], &[0.0, 0.0]);
        assert!(adv[2] < 0.0 && adv[3] > 0.0 && (adv[2] + adv[3]).abs() < 1e-12);
        assert_eq!(zero, 0.5);
    }
}
