//! The masked next-token objective shared by SFT, instruction tuning and DPO: per-token
//! log-probabilities of the targets under the logits, summed over the trained positions only.
//! Averaging is left to the caller, so a loss can be averaged over the trained tokens of a whole
//! accumulated batch rather than as a mean of per-micro-batch means.
//!
//! With a frozen LM head the log-probabilities come from the final hidden states a chunk of
//! positions at a time, so the `[batch, seq, vocab]` logits (1.6 GB in f32 for 8k tokens of a
//! 49k vocabulary), their log-softmax and their gradients are never held at once. The same pass
//! can also count how often the target is the most likely token and sum the entropies of the
//! distributions that predict it ([`TokenStats`]).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor};
use burnish_model::softmax_rows;
use burnish_peft::{cast_to, f32_per_buffer, f32_values, first_value, on_cpu, project, unproject};

/// Logits held at once by [`masked_token_logprobs_chunked`] on the CPU (64 MiB in f32).
const LOGITS_PER_CHUNK: usize = 1 << 24;
/// The same on a GPU (256 MiB, or what the device's largest buffer holds): each chunk costs a
/// dozen kernel launches and two products whatever its size, so chunks are larger there.
const LOGITS_PER_GPU_CHUNK: usize = 1 << 26;

/// How many positions [`masked_token_logprobs_chunked`] takes at a time on `device` of backend
/// `B` for a vocabulary of `vocab` tokens.
pub fn positions_per_chunk<B: Backend>(vocab: usize, device: &B::Device) -> usize {
    let logits = if on_cpu::<B>() {
        LOGITS_PER_CHUNK
    } else {
        f32_per_buffer::<B>(device, LOGITS_PER_GPU_CHUNK)
    };
    (logits / vocab.max(1)).max(1)
}

/// What a model's next-token distributions say at each position of a batch, zero where the
/// target is not trained: whether the target is the most likely token (the first one on ties),
/// the distribution's entropy (in nats) and the mean of its logits (TRL's fused head's `is_top1`,
/// `entropy` and `mean_logits`), with the mask that selects the trained positions. No gradient.
#[derive(Debug, Clone)]
pub struct PositionStats<B: Backend> {
    /// Each `[rows, seq]`.
    pub top1: Tensor<B, 2>,
    pub entropy: Tensor<B, 2>,
    pub mean_logits: Tensor<B, 2>,
    pub mask: Tensor<B, 2>,
}

impl<B: Backend> PositionStats<B> {
    /// The stats of `logits` (`[rows, seq, vocab]`, any precision) for `targets` where `mask`
    /// (`[rows, seq]`) is set, a chunk of positions at a time (as the chunked log-probs are),
    /// so that no other vocabulary-wide tensor than `logits` is held whole.
    pub fn of_logits(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>, mask: Tensor<B, 2>) -> Self {
        let [rows, seq, vocab] = logits.dims();
        let positions = rows * seq;
        let logits = logits.detach().reshape([positions, vocab]);
        let targets = targets.reshape([positions]);
        let chunk = positions_per_chunk::<B>(vocab, &logits.device());
        let mut parts: [Vec<Tensor<B, 1>>; 3] = Default::default();
        for start in (0..positions).step_by(chunk) {
            let len = chunk.min(positions - start);
            let part = cast_to(logits.clone().narrow(0, start, len), DType::F32);
            let (probs, log_total) = softmax_rows(part.clone());
            let picked = targets.clone().narrow(0, start, len);
            for (all, values) in parts
                .iter_mut()
                .zip(chunk_stats(part, probs, log_total, picked))
            {
                all.push(values);
            }
        }
        Self::from_flat(parts.map(|c| Tensor::cat(c, 0)), mask)
    }

    /// The stats from flat per-position values (`[positions]` each), masked by `mask`.
    fn from_flat(values: [Tensor<B, 1>; 3], mask: Tensor<B, 2>) -> Self {
        let [rows, seq] = mask.dims();
        let [top1, entropy, mean_logits] = values.map(|v| v.reshape([rows, seq]) * mask.clone());
        Self {
            top1,
            entropy,
            mean_logits,
            mask,
        }
    }

    /// The sums over each row, read back.
    pub fn row_totals(&self) -> Vec<TokenStats> {
        let per_row = |t: &Tensor<B, 2>| f32_values(t.clone().sum_dim(1));
        let [targets, top1, entropy, logits] =
            [&self.mask, &self.top1, &self.entropy, &self.mean_logits].map(per_row);
        (0..targets.len())
            .map(|r| TokenStats {
                targets: f64::from(targets[r]),
                top1: f64::from(top1[r]),
                entropy: f64::from(entropy[r]),
                logits: f64::from(logits[r]),
            })
            .collect()
    }

    /// The sums over every row, read back.
    pub fn total(&self) -> TokenStats {
        self.row_totals().into_iter().sum()
    }
}

/// Per-position top-1 hits, entropies (`log Σ e^z − Σ p·z`) and mean logits (`[positions]`
/// each) of one chunk of f32 `logits` (`[positions, vocab]`) with their softmax `probs` and
/// log-sum-exp `log_total` (`[positions, 1]`).
fn chunk_stats<B: Backend>(
    logits: Tensor<B, 2>,
    probs: Tensor<B, 2>,
    log_total: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> [Tensor<B, 1>; 3] {
    let positions = targets.dims()[0];
    let best: Tensor<B, 1, Int> = logits.clone().argmax(1).reshape([positions]);
    let top1 = best.equal(targets).float();
    let mean_logits = logits.clone().mean_dim(1).reshape([positions]);
    let expected = (probs * logits).sum_dim(1);
    let entropy = (log_total - expected).reshape([positions]);
    [top1, entropy, mean_logits]
}

/// Host sums of [`PositionStats`] over some rows: trained targets, top-1 hits, entropies and
/// mean logits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenStats {
    pub targets: f64,
    pub top1: f64,
    pub entropy: f64,
    pub logits: f64,
}

impl std::ops::Add for TokenStats {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            targets: self.targets + other.targets,
            top1: self.top1 + other.top1,
            entropy: self.entropy + other.entropy,
            logits: self.logits + other.logits,
        }
    }
}

impl std::iter::Sum for TokenStats {
    fn sum<I: Iterator<Item = Self>>(stats: I) -> Self {
        stats.fold(Self::default(), |sum, s| sum + s)
    }
}

impl TokenStats {
    /// `mean_token_accuracy` and `entropy`, TRL's SFT metrics; none without targets.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        if self.targets == 0.0 {
            return Vec::new();
        }
        vec![
            ("mean_token_accuracy", self.top1 / self.targets),
            ("entropy", self.entropy / self.targets),
        ]
    }
}

/// The summed negative log-likelihood of a batch and the number of tokens it covers.
#[derive(Debug, Clone)]
pub struct TokenLoss<B: Backend> {
    /// `[1]`: `-Σ log p(target)` over trained positions.
    pub sum: Tensor<B, 1>,
    /// How many positions were trained.
    pub tokens: usize,
}

impl<B: Backend> TokenLoss<B> {
    /// The mean loss per trained token (what transformers reports for `-100`-masked labels).
    pub fn mean(&self) -> Tensor<B, 1> {
        self.sum.clone().div_scalar(self.tokens.max(1) as f64)
    }
}

/// `log p(targets[b, t] | ·)` at every position, zeroed where `mask` is 0.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]` (position `t` predicts `targets[:, t]`)
/// - targets: `[batch, seq]`
/// - mask: `[batch, seq]`, 1.0 where trained, 0.0 elsewhere
/// - output: `[batch, seq]`
pub fn masked_token_logprobs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let logprobs = log_softmax(logits, 2);
    let picked = logprobs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2);
    picked * mask
}

/// The summed cross-entropy over the trained positions of a batch.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`; targets, mask: `[batch, seq]`
pub fn masked_token_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> TokenLoss<B> {
    let tokens = first_value(mask.clone().sum()).round() as usize;
    let sum = masked_token_logprobs(logits, targets, mask).sum().neg();
    TokenLoss { sum, tokens }
}

/// [`masked_token_logprobs`] of `head`'s logits of `hidden` (`head` a frozen `[vocab, hidden]`
/// matrix, logits `project(hidden, head)`), computed `chunk` positions at a time; with `stats`,
/// also the [`PositionStats`] of the same logits.
///
/// Each chunk's logits give the log-probabilities' values and, when `gradient` is set, each
/// position's slope `∂ log p(y)/∂h = W_y − Σ_j p_j·W_j` (one more product with the head, the
/// one the backward pass would have made). The slope is attached to the values through
/// `(h − detach(h))·slope`, which is zero in value and passes `slope` times the incoming
/// gradient to `h`: the gradient is exact, and nothing vocabulary-wide outlives its chunk. The
/// head gets no gradient (it is frozen). Without `gradient` only the values are computed.
///
/// # Shapes
/// - hidden: `[batch, seq, hidden]` (position `t` predicts `targets[:, t]`)
/// - head: `[vocab, hidden]`
/// - targets, mask, output: `[batch, seq]`
pub fn masked_token_logprobs_chunked<B: Backend>(
    hidden: Tensor<B, 3>,
    head: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
    gradient: bool,
    chunk: usize,
    stats: bool,
) -> (Tensor<B, 2>, Option<PositionStats<B>>) {
    let [batch, seq, width] = hidden.dims();
    let positions = batch * seq;
    let chunk = chunk.max(1);
    let tracked = hidden.reshape([positions, width]);
    let frozen = tracked.clone().detach();
    let targets = targets.reshape([positions]);
    let mut values = Vec::new();
    let mut slopes = Vec::new();
    let mut stat_chunks: [Vec<Tensor<B, 1>>; 3] = Default::default();
    for start in (0..positions).step_by(chunk) {
        let len = chunk.min(positions - start);
        let picked = targets.clone().narrow(0, start, len);
        // In f32 whatever the hidden states' precision (transformers upcasts them too).
        let logits = cast_to(
            project(frozen.clone().narrow(0, start, len), head.clone()),
            DType::F32,
        );
        let (probs, log_total) = softmax_rows(logits.clone());
        let target_logit = logits
            .clone()
            .gather(1, picked.clone().unsqueeze_dim::<2>(1));
        if stats {
            let chunk = chunk_stats(logits, probs.clone(), log_total.clone(), picked.clone());
            for (all, part) in stat_chunks.iter_mut().zip(chunk) {
                all.push(part);
            }
        }
        values.push(target_logit - log_total);
        if gradient {
            // Σ_j p_j·W_j
            let expected = unproject(probs, head.clone());
            let target_rows = head.clone().select(0, picked).cast(expected.dtype());
            slopes.push(target_rows - expected);
        }
    }
    let values = Tensor::cat(values, 0);
    let logprobs = if gradient {
        let slopes = Tensor::cat(slopes, 0);
        values + (cast_to(tracked - frozen, DType::F32) * slopes).sum_dim(1)
    } else {
        values
    };
    let stats = stats
        .then(|| PositionStats::from_flat(stat_chunks.map(|c| Tensor::cat(c, 0)), mask.clone()));
    (logprobs.reshape([batch, seq]) * mask, stats)
}
