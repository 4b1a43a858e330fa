//! The masked next-token objective shared by SFT, instruction tuning and DPO: per-token
//! log-probabilities of the targets under the logits, summed over the trained positions only.
//! Averaging is left to the caller, so a loss can be averaged over the trained tokens of a whole
//! accumulated batch rather than as a mean of per-micro-batch means.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use burnish_peft::first_value;

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
