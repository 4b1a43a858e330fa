//! Strategies: what a trainer optimises, the only seam between trainer kinds. A strategy turns
//! a batch into a *summed* loss and the number of units it sums over (trained tokens for SFT and
//! instruction tuning, preference pairs for DPO, ORPO and CPO, labeled completions for KTO); the
//! loop divides by the units of the whole accumulated batch, so gradient accumulation never
//! averages per-micro-batch means.

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burnish_model::{ActivationCheckpoints, Decoder};

use burnish_data::{Batch, Example, LabeledExample, PairExample};
use burnish_peft::f32_values;

use crate::cpo::{CpoLoss, cpo_loss};
use crate::dpo::{DpoLoss, FDivergence, PairLogps, chosen_nll, dpo_loss};
use crate::kto::{KtoLoss, LabeledLogps, kl_estimate, kto_loss};
use crate::orpo::orpo_loss;
use crate::token_loss::{
    PositionStats, TokenStats, masked_token_logprobs, masked_token_logprobs_chunked,
    positions_per_chunk,
};

/// Token ids with the positions that are trained.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    /// `[batch, seq]`: the model's input.
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, seq]`: the token each position must predict.
    pub targets: Tensor<B, 2, Int>,
    /// `[batch, seq]`: 1.0 where the target is trained.
    pub mask: Tensor<B, 2>,
    /// `[batch, seq]`: 1.0 where the target is a token of the input's own document, trained or
    /// not (0.0 at padding and across packed documents' boundaries).
    pub present: Tensor<B, 2>,
    /// Number of 1.0 entries in `mask`.
    pub trained_tokens: usize,
    /// Input tokens that are not padding (what throughput is counted in).
    pub tokens: usize,
    /// For packed rows: per-token positions and document ids of the inputs (`batch × seq`,
    /// row-major); `None` for one document per row starting at position 0.
    pub packing: Option<(Vec<usize>, Vec<u32>)>,
}

impl<B: Backend> TokenBatch<B> {
    /// Builds a batch from `rows` rows of `len` tokens (row-major): `ids`, `trained` (token `i`
    /// is a trained target), and the rows' `positions` and `segments` (document ids, 0 for
    /// padding). Position `t` predicts token `t + 1`; a target is trained only if it is marked
    /// and belongs to the same document as its input, so packed documents never learn across
    /// their boundary.
    pub fn from_rows(
        rows: usize,
        len: usize,
        ids: &[u32],
        trained: &[bool],
        positions: &[u32],
        segments: &[u32],
        device: &B::Device,
    ) -> Self {
        assert!(len >= 2, "a row needs at least two tokens to train on");
        let n = len - 1;
        let mut inputs = Vec::with_capacity(rows * n);
        let mut targets = Vec::with_capacity(rows * n);
        let mut mask = Vec::with_capacity(rows * n);
        let mut present = Vec::with_capacity(rows * n);
        let mut pos = Vec::with_capacity(rows * n);
        let mut seg = Vec::with_capacity(rows * n);
        for r in 0..rows {
            let at = |t: usize| r * len + t;
            for t in 0..n {
                inputs.push(i64::from(ids[at(t)]));
                targets.push(i64::from(ids[at(t + 1)]));
                let same_document = segments[at(t)] == segments[at(t + 1)] && segments[at(t)] != 0;
                mask.push(if trained[at(t + 1)] && same_document {
                    1.0f32
                } else {
                    0.0
                });
                present.push(if same_document { 1.0f32 } else { 0.0 });
                pos.push(positions[at(t)] as usize);
                seg.push(segments[at(t)]);
            }
        }
        let trained_tokens = mask.iter().filter(|&&m| m > 0.0).count();
        let tokens = seg.iter().filter(|&&s| s != 0).count();
        let packing = (!one_document_per_row(&pos, &seg, n)).then_some((pos, seg));
        Self {
            inputs: Tensor::from_data(TensorData::new(inputs, [rows, n]), device),
            targets: Tensor::from_data(TensorData::new(targets, [rows, n]), device),
            mask: Tensor::from_data(TensorData::new(mask, [rows, n]), device),
            present: Tensor::from_data(TensorData::new(present, [rows, n]), device),
            trained_tokens,
            tokens,
            packing,
        }
    }

    /// `self`'s rows followed by `other`'s, the shorter ones padded at the end (padding is
    /// never trained and, being last, never seen by a trained position).
    fn concat(&self, other: &Self) -> Self {
        let len = |b: &Self| b.inputs.dims()[1];
        let n = len(self).max(len(other));
        let padded = |b: &Self| {
            let [rows, have] = b.inputs.dims();
            let device = b.inputs.device();
            if have == n {
                return (
                    b.inputs.clone(),
                    b.targets.clone(),
                    b.mask.clone(),
                    b.present.clone(),
                );
            }
            let ids = || Tensor::<B, 2, Int>::zeros([rows, n - have], &device);
            let zeros = || Tensor::<B, 2>::zeros([rows, n - have], &device);
            (
                Tensor::cat(vec![b.inputs.clone(), ids()], 1),
                Tensor::cat(vec![b.targets.clone(), ids()], 1),
                Tensor::cat(vec![b.mask.clone(), zeros()], 1),
                Tensor::cat(vec![b.present.clone(), zeros()], 1),
            )
        };
        let (a, b) = (padded(self), padded(other));
        let packing = (self.packing.is_some() || other.packing.is_some()).then(|| {
            let (mut pos, mut seg) = self.packing_or_plain(n);
            let (more_pos, more_seg) = other.packing_or_plain(n);
            pos.extend(more_pos);
            seg.extend(more_seg);
            (pos, seg)
        });
        Self {
            inputs: Tensor::cat(vec![a.0, b.0], 0),
            targets: Tensor::cat(vec![a.1, b.1], 0),
            mask: Tensor::cat(vec![a.2, b.2], 0),
            present: Tensor::cat(vec![a.3, b.3], 0),
            trained_tokens: self.trained_tokens + other.trained_tokens,
            tokens: self.tokens + other.tokens,
            packing,
        }
    }

    /// Positions and document ids of every row, padded to `n` columns.
    fn packing_or_plain(&self, n: usize) -> (Vec<usize>, Vec<u32>) {
        let [rows, have] = self.inputs.dims();
        let mut pos = Vec::with_capacity(rows * n);
        let mut seg = Vec::with_capacity(rows * n);
        for r in 0..rows {
            match &self.packing {
                Some((p, s)) => {
                    pos.extend_from_slice(&p[r * have..(r + 1) * have]);
                    seg.extend_from_slice(&s[r * have..(r + 1) * have]);
                }
                None => {
                    pos.extend(0..have);
                    seg.extend(std::iter::repeat_n(1, have));
                }
            }
            pos.extend(std::iter::repeat_n(0, n - have));
            seg.extend(std::iter::repeat_n(0, n - have));
        }
        (pos, seg)
    }
}

/// True when each row of `n` tokens is a single document at positions `0, 1, ...` followed
/// only by padding: causal attention alone then gives every trained position the right
/// context, and the model can skip building a document mask.
fn one_document_per_row(positions: &[usize], segments: &[u32], n: usize) -> bool {
    positions
        .chunks(n)
        .zip(segments.chunks(n))
        .all(|(pos, seg)| {
            let doc = seg.iter().take_while(|&&s| s == 1).count();
            seg[doc..].iter().all(|&s| s == 0) && pos[..doc].iter().copied().eq(0..doc)
        })
}

impl<B: Backend> TokenBatch<B> {
    /// The tensors of a padded or packed batch from the data loader.
    pub fn from_batch(batch: &burnish_data::Batch, device: &B::Device) -> Self {
        Self::from_rows(
            batch.rows,
            batch.seq_len,
            &batch.input_ids,
            &batch.labels_mask,
            &batch.position_ids,
            &batch.segment_ids,
            device,
        )
    }
}

/// The final hidden states of `batch` under `model`, packed rows kept apart.
pub(crate) fn hidden_states<B: Backend>(model: &Decoder<B>, batch: &TokenBatch<B>) -> Tensor<B, 3> {
    match &batch.packing {
        Some((positions, segments)) => {
            model.hidden_states_packed(batch.inputs.clone(), positions, segments)
        }
        None => model.hidden_states(batch.inputs.clone()),
    }
}

/// [`hidden_states`] for a loss to train on: through `checkpoints` when given (activation
/// checkpointing: the layers' activations are recomputed in the backward pass).
pub(crate) fn trained_hidden_states<B: AutodiffBackend>(
    model: &Decoder<B>,
    batch: &TokenBatch<B>,
    checkpoints: Option<&mut ActivationCheckpoints<B>>,
) -> Tensor<B, 3> {
    match checkpoints {
        Some(checkpoints) => {
            let packing = batch
                .packing
                .as_ref()
                .map(|(positions, segments)| (positions.as_slice(), segments.as_slice()));
            model.hidden_states_checkpointed(batch.inputs.clone(), packing, checkpoints)
        }
        None => hidden_states(model, batch),
    }
}

/// `log p(target)` at every position of `batch` from `model`'s final `hidden` states of it,
/// zero where untrained. With a frozen head the logits are computed a chunk of positions at a
/// time and never held whole; `gradient` says whether the result must carry gradients to the
/// model.
pub(crate) fn token_logprobs<B: Backend>(
    model: &Decoder<B>,
    hidden: Tensor<B, 3>,
    batch: &TokenBatch<B>,
    gradient: bool,
) -> Tensor<B, 2> {
    token_logprobs_and_stats(model, hidden, batch, gradient, false).0
}

/// [`token_logprobs`], and with `stats` the [`PositionStats`] of the same logits.
pub(crate) fn token_logprobs_and_stats<B: Backend>(
    model: &Decoder<B>,
    hidden: Tensor<B, 3>,
    batch: &TokenBatch<B>,
    gradient: bool,
    stats: bool,
) -> (Tensor<B, 2>, Option<PositionStats<B>>) {
    let (targets, mask) = (batch.targets.clone(), batch.mask.clone());
    match model.frozen_head_weight() {
        Some(head) => {
            let chunk = positions_per_chunk::<B>(head.dims()[0], &head.device());
            masked_token_logprobs_chunked(hidden, head, targets, mask, gradient, chunk, stats)
        }
        None => {
            let logits = model.head(hidden);
            let stats = stats
                .then(|| PositionStats::of_logits(logits.clone(), targets.clone(), mask.clone()));
            (masked_token_logprobs(logits, targets, mask), stats)
        }
    }
}

/// Chosen and rejected completions of the same prompts, row for row; the masks cover the
/// completion tokens only.
#[derive(Debug, Clone)]
pub struct PairBatch<B: Backend> {
    pub chosen: TokenBatch<B>,
    pub rejected: TokenBatch<B>,
    /// The reference's summed completion log-probs (chosen, rejected), each `[pairs]`, when they
    /// were computed once before training; `None` to compute them at every step.
    pub reference: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> PairBatch<B> {
    /// Number of pairs.
    pub fn pairs(&self) -> usize {
        self.chosen.inputs.dims()[0]
    }

    /// The batch of `pairs`, each side padded with `pad_id`, without precomputed reference
    /// log-probs.
    pub fn from_pairs(pairs: &[&PairExample], pad_id: u32, device: &B::Device) -> Self {
        let tokens = |examples: Vec<Example>| {
            let refs: Vec<&Example> = examples.iter().collect();
            TokenBatch::from_batch(&Batch::padded(&refs, pad_id), device)
        };
        Self {
            chosen: tokens(pairs.iter().map(|p| p.chosen()).collect()),
            rejected: tokens(pairs.iter().map(|p| p.rejected()).collect()),
            reference: None,
        }
    }
}

/// The reference's summed completion log-probs of `batch` (chosen, rejected): the same model
/// with its adapters off, without gradient tracking.
pub fn reference_logps<B: AutodiffBackend>(
    model: &Decoder<B>,
    batch: &PairBatch<B>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    reference_logps_of(model, &batch.both())
}

/// The summed completion log-probs of `batch` (chosen, rejected) under `model` as it is, its
/// adapters included, without gradient tracking: a frozen reference model's; weighted as
/// LD-DPO weighs them when `ld_alpha` is given.
pub fn frozen_logps<B: AutodiffBackend>(
    model: &Decoder<B>,
    batch: &PairBatch<B>,
    ld_alpha: Option<f64>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let scored = ld_weighted(batch.both(), ld_alpha);
    split_pairs(logps_without_gradient(&model.valid(), &scored))
}

/// `both` (chosen rows, then rejected rows) with LD-DPO's weights as its mask when `ld_alpha`
/// is given: each completion's tokens weigh 1 up to the length it shares with the other
/// completion of its pair (the shorter one's), `ld_alpha` past it.
fn ld_weighted<B: Backend>(both: TokenBatch<B>, ld_alpha: Option<f64>) -> TokenBatch<B> {
    let Some(alpha) = ld_alpha else {
        return both;
    };
    let [rows, n] = both.mask.dims();
    let mask = f32_values(both.mask.clone());
    let counts: Vec<usize> = mask
        .chunks(n)
        .map(|row| row.iter().filter(|&&m| m > 0.0).count())
        .collect();
    let pairs = rows / 2;
    let mut weights = vec![0.0f32; rows * n];
    for (r, row) in mask.chunks(n).enumerate() {
        let shared = counts[r % pairs].min(counts[pairs + r % pairs]);
        let mut seen = 0;
        for (t, &m) in row.iter().enumerate() {
            if m > 0.0 {
                seen += 1;
                weights[r * n + t] = if seen <= shared { 1.0 } else { alpha as f32 };
            }
        }
    }
    let device = both.mask.device();
    TokenBatch {
        mask: Tensor::from_data(TensorData::new(weights, [rows, n]), &device),
        ..both
    }
}

/// WPO's weight of each pair (`[pairs]`, no gradient): the product of its two completions'
/// `exp(mean over the completion of log p(token) - log Σ_v p(v)²)`, from the policy's
/// `per_token` log-probs (zero where untrained) and its final `hidden` states of `both`.
fn wpo_weights<B: AutodiffBackend>(
    model: &Decoder<B>,
    hidden: Tensor<B, 3>,
    both: &TokenBatch<B>,
    per_token: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let inner = inner_batch(both);
    let squares = log_sum_squared_probs(&model.valid(), hidden.inner());
    let aligned = (per_token.inner() - squares) * inner.mask.clone();
    let lengths = inner.mask.sum_dim(1).clamp_min(1.0);
    let weights = (aligned.sum_dim(1) / lengths).exp().squeeze_dim::<1>(1);
    let (chosen, rejected) = split_pairs(weights);
    Tensor::from_inner(chosen * rejected)
}

/// `log Σ_v p(v)²` of `model`'s next-token distribution at every position of `batch`, from its
/// final `hidden` states, the logits computed a chunk of positions at a time.
///
/// # Shapes
/// - hidden: `[rows, seq, hidden]`
/// - output: `[rows, seq]`
fn log_sum_squared_probs<B: Backend>(model: &Decoder<B>, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
    let [rows, seq, width] = hidden.dims();
    let positions = rows * seq;
    let hidden = hidden.reshape([1, positions, width]);
    let chunk = positions_per_chunk::<B>(model.config.vocab_size, &hidden.device());
    let mut out = Vec::new();
    for start in (0..positions).step_by(chunk) {
        let len = chunk.min(positions - start);
        let logits = model.head(hidden.clone().narrow(1, start, len));
        let [_, _, vocab] = logits.dims();
        let probs = burn::tensor::activation::softmax(logits.reshape([len, vocab]), 1);
        out.push((probs.clone() * probs).sum_dim(1).log());
    }
    Tensor::cat(out, 0).reshape([rows, seq])
}

/// [`reference_logps`] of a batch already made by [`PairBatch::both`].
fn reference_logps_of<B: AutodiffBackend>(
    model: &Decoder<B>,
    both: &TokenBatch<B>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    split_pairs(logps_without_gradient(&adapters_off(model.valid()), both))
}

/// `model` with its adapters switched off: the base it trains on, sharing its weights.
pub(crate) fn adapters_off<B: Backend>(mut model: Decoder<B>) -> Decoder<B> {
    model.set_adapters_enabled(false);
    model
}

/// The summed completion log-probs of every row of `batch` under `model`, without gradient
/// tracking.
fn logps_without_gradient<B: AutodiffBackend>(
    model: &Decoder<B::InnerBackend>,
    batch: &TokenBatch<B>,
) -> Tensor<B, 1> {
    let batch = inner_batch(batch);
    let hidden = hidden_states(model, &batch);
    Tensor::from_inner(sequence_logps(model, hidden, &batch, false))
}

impl<B: Backend> PairBatch<B> {
    /// Chosen rows then rejected rows, as one batch: one forward pass serves both halves (TRL's
    /// concatenated forward), which keeps the matrix products twice as tall.
    fn both(&self) -> TokenBatch<B> {
        self.chosen.concat(&self.rejected)
    }
}

/// Splits per-row values of [`PairBatch::both`] into (chosen, rejected).
fn split_pairs<B: Backend>(both: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let pairs = both.dims()[0] / 2;
    (both.clone().slice(0..pairs), both.slice(pairs..2 * pairs))
}

/// A batch's summed loss, the units it sums over, and named metrics (batch means).
#[derive(Debug, Clone)]
pub struct StepOutput<B: Backend> {
    /// `[1]`
    pub loss_sum: Tensor<B, 1>,
    pub units: f64,
    pub metrics: Vec<(&'static str, f64)>,
}

/// What a trainer optimises.
pub trait Strategy<B: AutodiffBackend> {
    type Batch;
    /// The units `batch` contributes (known before any forward pass).
    fn units(&self, batch: &Self::Batch) -> f64;
    /// The summed loss of `batch` under `model`; its trained forward pass goes through
    /// `checkpoints` when given, and the loss's gradients must then come from
    /// [`ActivationCheckpoints::backward`].
    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &Self::Batch,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B>;
}

/// Masked next-token cross-entropy: chat SFT and instruction tuning.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sft;

impl<B: AutodiffBackend> Strategy<B> for Sft {
    type Batch = TokenBatch<B>;

    fn units(&self, batch: &TokenBatch<B>) -> f64 {
        batch.trained_tokens as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &TokenBatch<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let hidden = trained_hidden_states(model, batch, checkpoints);
        // The same logits say how often the target is the most likely token, and how spread
        // the predictions are.
        let (logprobs, stats) =
            token_logprobs_and_stats(model, hidden, batch, model.trains(), true);
        StepOutput {
            loss_sum: logprobs.sum().neg(),
            units: self.units(batch),
            metrics: stats.map(|s| s.total().metrics()).unwrap_or_default(),
        }
    }
}

/// Direct preference optimisation and its variants (see [`crate::dpo`]); the reference is the
/// same model with its adapters switched off, run without gradient tracking (no second copy of
/// the weights), unless the batch holds its precomputed log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct Dpo {
    /// The loss terms and their weights (RPO adds `(DpoLoss::Sft, α)` to the sigmoid loss).
    pub terms: Vec<(DpoLoss, f64)>,
    pub beta: f64,
    pub divergence: FDivergence,
    /// LD-DPO's weight of the completion tokens past the length a pair's two completions share
    /// (policy and reference alike; the SFT term is not weighted); `None` for none.
    pub ld_alpha: Option<f64>,
    /// WPO: each pair's loss weighed by the policy's length-normalised probability of its two
    /// completions, aligned by `Σ p²` at each position (no gradient).
    pub use_weighting: bool,
}

impl Dpo {
    /// The original DPO loss with strength `beta`.
    pub fn sigmoid(beta: f64) -> Self {
        Self {
            terms: vec![(
                DpoLoss::Sigmoid {
                    label_smoothing: 0.0,
                },
                1.0,
            )],
            beta,
            divergence: FDivergence::ReverseKl,
            ld_alpha: None,
            use_weighting: false,
        }
    }
}

/// Summed completion log-probs per row, from the final `hidden` states of `batch`.
fn sequence_logps<B: Backend>(
    model: &Decoder<B>,
    hidden: Tensor<B, 3>,
    batch: &TokenBatch<B>,
    gradient: bool,
) -> Tensor<B, 1> {
    token_logprobs(model, hidden, batch, gradient)
        .sum_dim(1)
        .squeeze_dim::<1>(1)
}

pub(crate) fn inner_batch<B: AutodiffBackend>(
    batch: &TokenBatch<B>,
) -> TokenBatch<B::InnerBackend> {
    TokenBatch {
        inputs: batch.inputs.clone().inner(),
        targets: batch.targets.clone().inner(),
        mask: batch.mask.clone().inner(),
        present: batch.present.clone().inner(),
        trained_tokens: batch.trained_tokens,
        tokens: batch.tokens,
        packing: batch.packing.clone(),
    }
}

impl<B: AutodiffBackend> Strategy<B> for Dpo {
    type Batch = PairBatch<B>;

    fn units(&self, batch: &PairBatch<B>) -> f64 {
        batch.pairs() as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &PairBatch<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let both = batch.both();
        // The sums the loss compares: LD-DPO's weights, or the completion mask itself.
        let scored = ld_weighted(both.clone(), self.ld_alpha);
        let (reference_chosen, reference_rejected) = match &batch.reference {
            Some(precomputed) => precomputed.clone(),
            None => reference_logps_of(model, &scored),
        };
        let count = |b: &TokenBatch<B>| b.mask.clone().sum_dim(1).squeeze_dim::<1>(1);
        let pairs = batch.pairs();
        let hidden = trained_hidden_states(model, &both, checkpoints);
        let (per_token, stats) =
            token_logprobs_and_stats(model, hidden.clone(), &both, model.trains(), true);
        let sums =
            |weights: Tensor<B, 2>| (per_token.clone() * weights).sum_dim(1).squeeze_dim::<1>(1);
        let (policy_chosen, policy_rejected) = split_pairs(sums(scored.mask.clone()));
        let sft_chosen = self
            .ld_alpha
            .map(|_| split_pairs(sums(both.mask.clone())).0);
        let pair_weights = self
            .use_weighting
            .then(|| wpo_weights(model, hidden, &both, per_token.clone()));
        let out = dpo_loss(
            &self.terms,
            self.beta,
            self.divergence,
            PairLogps {
                policy_chosen,
                policy_rejected,
                reference_chosen,
                reference_rejected,
                chosen_tokens: count(&batch.chosen),
                rejected_tokens: count(&batch.rejected),
                sft_chosen,
                pair_weights,
            },
        );
        StepOutput {
            loss_sum: out.loss.mul_scalar(pairs as f64),
            units: pairs as f64,
            metrics: out
                .metrics
                .named()
                .into_iter()
                .chain(completion_metrics(stats, pairs))
                .collect(),
        }
    }
}

/// TRL's DPO metrics of the policy's distributions over a pair batch's completions (`stats` of
/// the chosen rows, then the rejected ones): `entropy` over both, `mean_token_accuracy` over the
/// chosen completions, and `logits/chosen` and `logits/rejected`, the mean logit of each side.
fn completion_metrics<B: Backend>(
    stats: Option<PositionStats<B>>,
    pairs: usize,
) -> Vec<(&'static str, f64)> {
    let Some(stats) = stats else {
        return Vec::new();
    };
    let rows = stats.row_totals();
    let chosen: TokenStats = rows[..pairs].iter().copied().sum();
    let rejected: TokenStats = rows[pairs..].iter().copied().sum();
    let ratio = |sum: f64, count: f64| if count > 0.0 { sum / count } else { 0.0 };
    vec![
        (
            "entropy",
            ratio(
                chosen.entropy + rejected.entropy,
                chosen.targets + rejected.targets,
            ),
        ),
        ("mean_token_accuracy", ratio(chosen.top1, chosen.targets)),
        ("logits/chosen", ratio(chosen.logits, chosen.targets)),
        ("logits/rejected", ratio(rejected.logits, rejected.targets)),
    ]
}

/// TRL's KTO metrics of the policy's distributions over labeled completions (each row's sums,
/// and whether it is desirable): `entropy` over every completion token, and `logits/chosen` and
/// `logits/rejected`, the mean logit over the desirable and over the undesirable completions'
/// tokens (each only when there are some).
fn labeled_metrics(rows: &[TokenStats], desirable: &[bool]) -> Vec<(&'static str, f64)> {
    let side = |want: bool| -> TokenStats {
        rows.iter()
            .zip(desirable)
            .filter(|(_, d)| **d == want)
            .map(|(row, _)| *row)
            .sum()
    };
    let (chosen, rejected) = (side(true), side(false));
    let all = chosen + rejected;
    let mut metrics = Vec::new();
    if all.targets > 0.0 {
        metrics.push(("entropy", all.entropy / all.targets));
    }
    if chosen.targets > 0.0 {
        metrics.push(("logits/chosen", chosen.logits / chosen.targets));
    }
    if rejected.targets > 0.0 {
        metrics.push(("logits/rejected", rejected.logits / rejected.targets));
    }
    metrics
}

/// Odds-ratio preference optimisation: no reference model, the chosen sequences' NLL in the
/// loss (see [`crate::orpo`]).
#[derive(Debug, Clone, Copy)]
pub struct Orpo {
    pub beta: f64,
}

impl<B: AutodiffBackend> Strategy<B> for Orpo {
    type Batch = PairBatch<B>;

    fn units(&self, batch: &PairBatch<B>) -> f64 {
        batch.pairs() as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &PairBatch<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let both = batch.both();
        let pairs = batch.pairs();
        // Every target of the chosen rows (the first half), none of the rejected rows.
        let device = both.mask.device();
        let halves: Vec<f32> = [1.0, 0.0]
            .into_iter()
            .flat_map(|v| std::iter::repeat_n(v, pairs))
            .collect();
        let chosen_rows =
            Tensor::<B, 2>::from_data(TensorData::new(halves, [2 * pairs, 1]), &device);
        let nll_mask = both.present.clone() * chosen_rows;
        let completions = both.mask.clone();
        // One pass of log-probs serves both terms: at every completion and chosen target.
        let scored = TokenBatch {
            mask: completions.clone().max_pair(nll_mask.clone()),
            ..both
        };
        let hidden = trained_hidden_states(model, &scored, checkpoints);
        let logprobs = token_logprobs(model, hidden, &scored, model.trains());
        let average = (logprobs.clone() * completions.clone()).sum_dim(1)
            / completions.sum_dim(1).clamp_min(1.0);
        let (chosen, rejected) = split_pairs(average.squeeze_dim::<1>(1));
        let nll = (logprobs * nll_mask.clone()).sum().neg() / nll_mask.sum().clamp_min(1.0);
        let out = orpo_loss(self.beta, chosen, rejected, nll);
        StepOutput {
            loss_sum: out.loss.mul_scalar(pairs as f64),
            units: pairs as f64,
            metrics: out.metrics,
        }
    }
}

/// Contrastive preference optimisation, SimPO and AlphaPO: no reference model, `cpo_alpha ×` the
/// chosen completions' NLL in the loss (see [`crate::cpo`]).
#[derive(Debug, Clone, Copy)]
pub struct Cpo {
    pub loss: CpoLoss,
    pub beta: f64,
    /// Weight of the chosen completions' NLL (0 for SimPO and AlphaPO).
    pub cpo_alpha: f64,
    /// AlphaPO's reward shape (0: the log-probs themselves).
    pub alpha: f64,
}

impl<B: AutodiffBackend> Strategy<B> for Cpo {
    type Batch = PairBatch<B>;

    fn units(&self, batch: &PairBatch<B>) -> f64 {
        batch.pairs() as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &PairBatch<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let both = batch.both();
        let pairs = batch.pairs();
        let hidden = trained_hidden_states(model, &both, checkpoints);
        let (chosen, rejected) = split_pairs(sequence_logps(model, hidden, &both, model.trains()));
        let (chosen_tokens, rejected_tokens) =
            split_pairs(both.mask.clone().sum_dim(1).squeeze_dim::<1>(1));
        let nll = chosen_nll(chosen.clone(), chosen_tokens.clone());
        let (chosen, rejected) = if self.loss.averages() {
            (
                chosen / chosen_tokens.clamp_min(1.0),
                rejected / rejected_tokens.clamp_min(1.0),
            )
        } else {
            (chosen, rejected)
        };
        let out = cpo_loss(
            self.loss,
            self.beta,
            self.cpo_alpha,
            self.alpha,
            chosen,
            rejected,
            nll,
        );
        StepOutput {
            loss_sum: out.loss.mul_scalar(pairs as f64),
            units: pairs as f64,
            metrics: out.metrics,
        }
    }
}

/// The preference strategies as one type for the training loop.
#[derive(Debug, Clone)]
pub enum Preference {
    Dpo(Dpo),
    Orpo(Orpo),
    Cpo(Cpo),
}

impl<B: AutodiffBackend> Strategy<B> for Preference {
    type Batch = PairBatch<B>;

    fn units(&self, batch: &PairBatch<B>) -> f64 {
        batch.pairs() as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &PairBatch<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        match self {
            Self::Dpo(dpo) => dpo.loss(model, batch, checkpoints),
            Self::Orpo(orpo) => orpo.loss(model, batch, checkpoints),
            Self::Cpo(cpo) => cpo.loss(model, batch, checkpoints),
        }
    }
}

/// Completions labeled desirable or not, each after its prompt, and for KTO's KL estimate the
/// same prompts each followed by another row's completion.
#[derive(Debug, Clone)]
pub struct LabeledBatch<B: Backend> {
    /// `prompt_i + completion_i`, the completions trained.
    pub matched: TokenBatch<B>,
    /// `prompt_i + completion_{i-1}`: the completions rotated by one row within the batch, as
    /// TRL's collator pairs them; `None` when the loss needs no KL estimate.
    pub mismatched: Option<TokenBatch<B>>,
    /// Whether each row's completion is desirable.
    pub desirable: Vec<bool>,
}

impl<B: Backend> LabeledBatch<B> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.desirable.len()
    }

    /// The batch of `rows`, padded with `pad_id`; with `mismatched`, also their prompts with the
    /// rotated completions, each cut to `max_length` tokens when given (as the matched rows
    /// already are).
    pub fn from_labeled(
        rows: &[&LabeledExample],
        pad_id: u32,
        mismatched: bool,
        max_length: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let tokens = |examples: Vec<Example>| {
            let refs: Vec<&Example> = examples.iter().collect();
            TokenBatch::from_batch(&Batch::padded(&refs, pad_id), device)
        };
        let matched = tokens(rows.iter().map(|r| r.example()).collect());
        let mismatched = mismatched.then(|| {
            let n = rows.len();
            let rotated = (0..n).map(|i| {
                let mut sequence = LabeledExample {
                    prompt_ids: rows[i].prompt_ids.clone(),
                    completion_ids: rows[(i + n - 1) % n].completion_ids.clone(),
                    desirable: rows[i].desirable,
                }
                .example();
                if let Some(max) = max_length {
                    sequence.input_ids.truncate(max);
                    sequence.labels_mask.truncate(max);
                }
                sequence
            });
            tokens(rotated.collect())
        });
        Self {
            matched,
            mismatched,
            desirable: rows.iter().map(|r| r.desirable).collect(),
        }
    }
}

/// Kahneman–Tversky optimisation (see [`crate::kto`]). Its reference is `reference` when given
/// (a frozen model of its own), else the trained model with its adapters off; both reference
/// passes and the policy's KL pass run without gradient tracking, at every step.
#[derive(Debug, Clone)]
pub struct Kto<B: AutodiffBackend> {
    pub loss: KtoLoss,
    pub reference: Option<Decoder<B::InnerBackend>>,
}

impl<B: AutodiffBackend> Strategy<B> for Kto<B> {
    type Batch = LabeledBatch<B>;

    fn units(&self, batch: &LabeledBatch<B>) -> f64 {
        batch.rows() as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &LabeledBatch<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let rows = batch.rows();
        let mismatched = batch.mismatched.as_ref().filter(|_| self.loss.uses_kl);
        // The reference scores both kinds of row in one pass; the policy's KL pass is frozen.
        let scored = match mismatched {
            Some(m) => batch.matched.concat(m),
            None => batch.matched.clone(),
        };
        let frozen_policy = model.valid();
        let reference = match &self.reference {
            Some(frozen) => logps_without_gradient(frozen, &scored),
            None => logps_without_gradient(&adapters_off(frozen_policy.clone()), &scored),
        };
        let kl = match mismatched {
            Some(m) => {
                let policy = logps_without_gradient(&frozen_policy, m);
                kl_estimate(policy, reference.clone().slice(rows..2 * rows))
            }
            None => 0.0,
        };
        let hidden = trained_hidden_states(model, &batch.matched, checkpoints);
        let (logps, stats) =
            token_logprobs_and_stats(model, hidden, &batch.matched, model.trains(), true);
        let policy = logps.sum_dim(1).squeeze_dim::<1>(1);
        let mut out = kto_loss(
            self.loss,
            LabeledLogps {
                policy,
                reference: reference.slice(0..rows),
                desirable: batch.desirable.clone(),
            },
            kl,
        );
        if let Some(stats) = stats {
            out.metrics
                .extend(labeled_metrics(&stats.row_totals(), &batch.desirable));
        }
        StepOutput {
            loss_sum: out.loss.mul_scalar(rows as f64),
            units: rows as f64,
            metrics: out.metrics,
        }
    }
}
