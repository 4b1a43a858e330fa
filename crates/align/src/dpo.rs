//! Direct preference optimisation and its variants (the loss types of TRL's `DPOTrainer`, alone
//! or weighted together, under f-divergences) on sequence log-probabilities (completion tokens
//! summed), with the reward metrics TRL logs under the same names and meanings:
//! `rewards/chosen = β·(log π(y_w) - log π_ref(y_w))`, `rewards/rejected` likewise,
//! `rewards/accuracies` the fraction of pairs whose chosen reward is strictly higher,
//! `rewards/margins` their mean difference, `logps/*` the policy's summed log-probs.

use burn::tensor::Tensor;
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::backend::Backend;
use burnish_peft::first_value;

/// One loss term of DPO and its variants, as TRL's `DPOTrainer` (1.16) computes each from the
/// policy's and the reference's summed completion log-probs; `Δ` is the chosen score minus the
/// rejected one (the log-ratios `r_c` and `r_r`, or their f-divergence transform).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpoLoss {
    /// `-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)`; ε = 0 is the original DPO loss (ε > 0 is conservative
    /// DPO, as TRL computed it before 1.x).
    Sigmoid { label_smoothing: f64 },
    /// `max(0, 1 - βΔ)` (SLiC).
    Hinge,
    /// `(Δ/|y| - 1/(2β))²` on scores averaged per completion token, as TRL does.
    Ipo,
    /// `(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1 - 2ε)`: unbiased under label noise ε < 0.5.
    Robust { label_smoothing: f64 },
    /// EXO's reverse KL to the label distribution `[1-ε, ε]` (needs ε > 0).
    ExoPair { label_smoothing: f64 },
    /// NCA: `-log σ(βr_c) - ½·log σ(-βr_c) - ½·log σ(-βr_r)`.
    NcaPair,
    /// BCO on pairs: `-log σ(βr_c) - log σ(-βr_r)`.
    BcoPair,
    /// SPPO with hard labels: `(r_c - 1/(2β))² + (r_r + 1/(2β))²`.
    SppoHard,
    /// AOT: the sigmoid loss of the batch's sorted policy log-ratio margins against the sorted
    /// reference ones.
    Aot { label_smoothing: f64 },
    /// AOT unpaired: the sigmoid loss of the sorted chosen log-ratios against the sorted
    /// rejected ones.
    AotUnpaired { label_smoothing: f64 },
    /// APO-zero: `1 - σ(βr_c) + σ(βr_r)`.
    ApoZero,
    /// APO-down: `σ(βr_c) + 1 - σ(β(r_c - r_r))`.
    ApoDown,
    /// DiscoPOP: the logistic and exponential losses of `βΔ` blended by `σ(βΔ/τ)`.
    Discopop { tau: f64 },
    /// The sigmoid loss on scores averaged per completion token.
    SigmoidNorm,
    /// The chosen completions' mean NLL over all their tokens (RPO's term, MPO's SFT part).
    Sft,
}

impl DpoLoss {
    /// Whether TRL defines the loss under an f-divergence other than the reverse KL (the others
    /// need the `β·log Z` term that cancels only in the chosen-rejected difference).
    pub fn allows_f_divergence(self) -> bool {
        matches!(
            self,
            Self::Sigmoid { .. }
                | Self::SigmoidNorm
                | Self::Hinge
                | Self::Ipo
                | Self::ExoPair { .. }
                | Self::Robust { .. }
                | Self::Discopop { .. }
                | Self::Sft
        )
    }
}

/// The divergence the policy is held to the reference by (f-DPO): it maps each log-ratio `r`
/// to the score the losses compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FDivergence {
    /// `r` itself: standard DPO.
    ReverseKl,
    /// `1 - e^(-r)`.
    ForwardKl,
    /// `ln 2 + log σ(r)` (Jensen–Shannon).
    JsDivergence,
    /// `(e^((α-1)·r) - 1) / (α-1)`, the exponent clamped at 80; `α = 1` is the reverse KL.
    Alpha { alpha: f64 },
}

impl FDivergence {
    fn score<B: Backend>(self, ratio: Tensor<B, 1>) -> Tensor<B, 1> {
        match self {
            Self::ReverseKl => ratio,
            Self::Alpha { alpha } if (alpha - 1.0).abs() < 1e-6 => ratio,
            Self::ForwardKl => ratio.neg().exp().neg().add_scalar(1.0),
            Self::JsDivergence => log_sigmoid(ratio).add_scalar(std::f64::consts::LN_2),
            Self::Alpha { alpha } => ratio
                .mul_scalar(alpha - 1.0)
                .clamp_max(80.0)
                .exp()
                .sub_scalar(1.0)
                .div_scalar(alpha - 1.0),
        }
    }
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
    /// The chosen completions' summed log-probs as the SFT term reads them, when they differ
    /// from `policy_chosen` (which LD-DPO weighs, and the SFT term does not); `None` otherwise.
    pub sft_chosen: Option<Tensor<B, 1>>,
    /// WPO's weight of each pair's loss (`[pairs]`, no gradient); `None` for none.
    pub pair_weights: Option<Tensor<B, 1>>,
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

impl DpoMetrics {
    /// The metrics under TRL's names.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
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

/// `x` sorted ascending, gradients following each value to its place.
fn sorted<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    let order = x.clone().detach().argsort(0);
    x.select(0, order)
}

/// DPO's loss of `logps`: each of `terms` (at least one) averaged over the pairs, weighted,
/// summed; strength `beta`, log-ratios turned into scores by `divergence`. Gradients flow
/// through the policy log-probs only.
pub fn dpo_loss<B: Backend>(
    terms: &[(DpoLoss, f64)],
    beta: f64,
    divergence: FDivergence,
    logps: PairLogps<B>,
) -> DpoOutput<B> {
    let reference_chosen = logps.reference_chosen.detach();
    let reference_rejected = logps.reference_rejected.detach();
    let chosen_ratio = logps.policy_chosen.clone() - reference_chosen.clone();
    let rejected_ratio = logps.policy_rejected.clone() - reference_rejected.clone();
    let chosen_score = divergence.score(chosen_ratio.clone());
    let rejected_score = divergence.score(rejected_ratio.clone());
    let scaled = (chosen_score.clone() - rejected_score.clone()).mul_scalar(beta);
    let per_token_margin = || {
        chosen_score.clone() / logps.chosen_tokens.clone().clamp_min(1.0)
            - rejected_score.clone() / logps.rejected_tokens.clone().clamp_min(1.0)
    };
    let (beta_chosen, beta_rejected) = (
        chosen_ratio.clone().mul_scalar(beta),
        rejected_ratio.clone().mul_scalar(beta),
    );

    let mut loss: Option<Tensor<B, 1>> = None;
    for &(kind, weight) in terms {
        let per_pair = match kind {
            DpoLoss::Sigmoid { label_smoothing } => {
                smoothed_sigmoid(scaled.clone(), label_smoothing)
            }
            DpoLoss::Hinge => relu(scaled.clone().neg().add_scalar(1.0)),
            DpoLoss::Ipo => per_token_margin()
                .sub_scalar(1.0 / (2.0 * beta))
                .powi_scalar(2),
            DpoLoss::Robust { label_smoothing: e } => log_sigmoid(scaled.clone())
                .mul_scalar(-(1.0 - e))
                .add(log_sigmoid(scaled.clone().neg()).mul_scalar(e))
                .div_scalar(1.0 - 2.0 * e),
            DpoLoss::ExoPair { label_smoothing: e } => {
                let chosen_side =
                    sigmoid(scaled.clone()) * log_sigmoid(scaled.clone()).sub_scalar((-e).ln_1p());
                let rejected_side = sigmoid(scaled.clone().neg())
                    * log_sigmoid(scaled.clone().neg()).sub_scalar(e.ln());
                chosen_side + rejected_side
            }
            DpoLoss::NcaPair => {
                log_sigmoid(beta_chosen.clone()).neg()
                    - log_sigmoid(beta_chosen.clone().neg()).mul_scalar(0.5)
                    - log_sigmoid(beta_rejected.clone().neg()).mul_scalar(0.5)
            }
            DpoLoss::BcoPair => {
                log_sigmoid(beta_chosen.clone()).neg() - log_sigmoid(beta_rejected.clone().neg())
            }
            DpoLoss::SppoHard => {
                chosen_ratio.clone().sub_scalar(0.5 / beta).powi_scalar(2)
                    + rejected_ratio.clone().add_scalar(0.5 / beta).powi_scalar(2)
            }
            DpoLoss::Aot { label_smoothing } => {
                let policy = sorted(logps.policy_chosen.clone() - logps.policy_rejected.clone());
                let reference = sorted(reference_chosen.clone() - reference_rejected.clone());
                smoothed_sigmoid((policy - reference).mul_scalar(beta), label_smoothing)
            }
            DpoLoss::AotUnpaired { label_smoothing } => {
                let margin = sorted(chosen_ratio.clone()) - sorted(rejected_ratio.clone());
                smoothed_sigmoid(margin.mul_scalar(beta), label_smoothing)
            }
            DpoLoss::ApoZero => {
                sigmoid(beta_chosen.clone()).neg().add_scalar(1.0) + sigmoid(beta_rejected.clone())
            }
            DpoLoss::ApoDown => {
                sigmoid(beta_chosen.clone())
                    + sigmoid(beta_chosen.clone() - beta_rejected.clone())
                        .neg()
                        .add_scalar(1.0)
            }
            DpoLoss::Discopop { tau } => {
                let blend = sigmoid(scaled.clone().div_scalar(tau));
                let logistic = log_sigmoid(scaled.clone()).neg();
                let exponential = scaled.clone().neg().exp();
                logistic * blend.clone().neg().add_scalar(1.0) + exponential * blend
            }
            DpoLoss::SigmoidNorm => log_sigmoid(per_token_margin().mul_scalar(beta)).neg(),
            DpoLoss::Sft => chosen_nll(
                logps
                    .sft_chosen
                    .clone()
                    .unwrap_or_else(|| logps.policy_chosen.clone()),
                logps.chosen_tokens.clone(),
            ),
        };
        let per_pair = match &logps.pair_weights {
            Some(w) => per_pair * w.clone().detach(),
            None => per_pair,
        };
        let term = per_pair.mean().mul_scalar(weight);
        loss = Some(match loss {
            Some(sum) => sum + term,
            None => term,
        });
    }

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
        loss: loss.expect("DPO has at least one loss term"),
        metrics,
    }
}
