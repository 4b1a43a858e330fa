//! Direct preference optimisation losses on sequence log-probabilities (completion tokens
//! summed), with the reward metrics TRL logs under the same names and meanings:
//! `rewards/chosen = β·(log π(y_w) - log π_ref(y_w))`, `rewards/rejected` likewise,
//! `rewards/accuracies` the fraction of pairs whose chosen reward is strictly higher,
//! `rewards/margins` their mean difference, `logps/*` the policy's summed log-probs.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::backend::Backend;
use burnish_peft::first_value;

/// The preference loss and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpoLoss {
    /// `-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)`; ε = 0 is the original DPO loss.
    Sigmoid { label_smoothing: f64 },
    /// `max(0, 1 - βΔ)` (SLiC).
    Hinge,
    /// `(Δc/|y_w| - Δr/|y_l| - 1/(2β))²`, log-ratios averaged per completion token as TRL does.
    Ipo,
    /// `(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1 - 2ε)`: unbiased under label noise ε < 0.5.
    Robust { label_smoothing: f64 },
}

/// Summed completion log-probs of a batch of pairs (each `[pairs]`).
#[derive(Debug, Clone)]
pub struct PairLogps<B: Backend> {
    pub policy_chosen: Tensor<B, 1>,
    pub policy_rejected: Tensor<B, 1>,
    pub reference_chosen: Tensor<B, 1>,
    pub reference_rejected: Tensor<B, 1>,
    /// Completion tokens of each chosen / rejected response (used by IPO).
    pub chosen_tokens: Tensor<B, 1>,
    pub rejected_tokens: Tensor<B, 1>,
}

/// Batch means of TRL's DPO metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoMetrics {
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub rewards_accuracies: f64,
    pub rewards_margins: f64,
    pub logps_chosen: f64,
    pub logps_rejected: f64,
}

/// The loss (mean over pairs) and the metrics of one batch.
#[derive(Debug, Clone)]
pub struct DpoOutput<B: Backend> {
    /// `[1]`
    pub loss: Tensor<B, 1>,
    pub metrics: DpoMetrics,
}

fn mean_of<B: Backend>(t: Tensor<B, 1>) -> f64 {
    first_value(t.mean())
}

/// The mean negative log-likelihood of the chosen completions over all their tokens: the SFT
/// term that RPO adds to DPO (TRL's `"sft"` loss type).
///
/// # Shapes
/// - policy_chosen, chosen_tokens: `[pairs]`
/// - output: `[1]`
pub fn chosen_nll<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    chosen_tokens: Tensor<B, 1>,
) -> Tensor<B, 1> {
    policy_chosen.sum().neg() / chosen_tokens.sum().clamp_min(1.0)
}

/// `-(1-ε)·log σ(x) - ε·log σ(-x)`: the logistic loss of a preference margin `x` under label
/// noise `ε` (DPO's and CPO's sigmoid losses).
pub(crate) fn smoothed_sigmoid<B: Backend>(x: Tensor<B, 1>, e: f64) -> Tensor<B, 1> {
    log_sigmoid(x.clone())
        .mul_scalar(-(1.0 - e))
        .sub(log_sigmoid(x.neg()).mul_scalar(e))
}

/// The DPO loss of `logps` with strength `beta`. Gradients flow through the policy log-probs only.
pub fn dpo_loss<B: Backend>(kind: DpoLoss, beta: f64, logps: PairLogps<B>) -> DpoOutput<B> {
    let reference_chosen = logps.reference_chosen.detach();
    let reference_rejected = logps.reference_rejected.detach();
    let chosen_ratio = logps.policy_chosen.clone() - reference_chosen;
    let rejected_ratio = logps.policy_rejected.clone() - reference_rejected;
    let delta = chosen_ratio.clone() - rejected_ratio.clone();
    let scaled = delta.mul_scalar(beta);

    let per_pair = match kind {
        DpoLoss::Sigmoid { label_smoothing: e } => smoothed_sigmoid(scaled.clone(), e),
        DpoLoss::Hinge => relu(scaled.neg().add_scalar(1.0)),
        DpoLoss::Ipo => {
            let per_token = chosen_ratio.clone() / logps.chosen_tokens.clamp_min(1.0)
                - rejected_ratio.clone() / logps.rejected_tokens.clamp_min(1.0);
            per_token.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2)
        }
        DpoLoss::Robust { label_smoothing: e } => log_sigmoid(scaled.clone())
            .mul_scalar(-(1.0 - e))
            .add(log_sigmoid(scaled.neg()).mul_scalar(e))
            .div_scalar(1.0 - 2.0 * e),
    };

    let chosen_rewards = chosen_ratio.detach().mul_scalar(beta);
    let rejected_rewards = rejected_ratio.detach().mul_scalar(beta);
    let metrics = DpoMetrics {
        rewards_chosen: mean_of(chosen_rewards.clone()),
        rewards_rejected: mean_of(rejected_rewards.clone()),
        rewards_accuracies: mean_of(
            chosen_rewards
                .clone()
                .greater(rejected_rewards.clone())
                .float(),
        ),
        rewards_margins: mean_of(chosen_rewards - rejected_rewards),
        logps_chosen: mean_of(logps.policy_chosen.detach()),
        logps_rejected: mean_of(logps.policy_rejected.detach()),
    };
    DpoOutput {
        loss: per_pair.mean(),
        metrics,
    }
}
