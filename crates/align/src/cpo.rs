//! Contrastive preference optimisation (CPO) and SimPO: preference losses on the policy's own
//! completion log-probs, with no reference model, plus `α ×` the chosen completions' mean NLL
//! (the behaviour-cloning term; SimPO proper has `α = 0`). As TRL's `CPOTrainer` computes them,
//! on the difference `Δ = c - r` of the completions' log-probs, summed for `sigmoid` and `hinge`
//! and averaged per token for `ipo` and `simpo`:
//!
//! - `sigmoid`: `-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)`
//! - `hinge`: `max(0, 1 - βΔ)`
//! - `ipo`: `(Δ - 1/(2β))²`
//! - `simpo`: the sigmoid loss of `Δ - γ/β`, for a target margin `γ`.
//!
//! With AlphaPO's `α ≠ 0` (TRL's `alpha`, not the NLL weight `cpo_alpha`) each log-prob `l` is
//! first turned into the reward `(1 - e^(-α·l)) / α`, the probability's `(1 - p^(-α)) / α`; `α → 0`
//! gives `l` back. The metrics keep TRL's names: `rewards/*` are `β ×` those rewards, `logps/*`
//! the log-probs the loss used, `nll_loss` the NLL term (0 when `cpo_alpha = 0`).

use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burnish_peft::first_value;

use crate::dpo::smoothed_sigmoid;

/// The CPO loss and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CpoLoss {
    Sigmoid { label_smoothing: f64 },
    Hinge,
    Ipo,
    Simpo { gamma: f64, label_smoothing: f64 },
}

impl CpoLoss {
    /// Whether the loss takes log-probs averaged per completion token rather than summed.
    pub fn averages(self) -> bool {
        matches!(self, Self::Ipo | Self::Simpo { .. })
    }
}

/// The CPO loss (`[1]`) and metrics of a batch of pairs.
#[derive(Debug, Clone)]
pub struct CpoOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub metrics: Vec<(&'static str, f64)>,
}

/// AlphaPO's reward of log-probs `logps`: `(1 - e^(-α·l)) / α`, or `l` itself for `α = 0`.
fn alphapo_reward<B: Backend>(logps: Tensor<B, 1>, alpha: f64) -> Tensor<B, 1> {
    if alpha == 0.0 {
        return logps;
    }
    logps
        .mul_scalar(-alpha)
        .exp()
        .neg()
        .add_scalar(1.0)
        .div_scalar(alpha)
}

/// CPO of kind `kind` with strength `beta` from the completions' log-probs `chosen` and
/// `rejected` (`[pairs]` each, summed or averaged as [`CpoLoss::averages`] says) turned into
/// rewards by AlphaPO's `alpha`, plus `cpo_alpha` times `nll` (`[1]`), the chosen completions'
/// mean NLL.
pub fn cpo_loss<B: Backend>(
    kind: CpoLoss,
    beta: f64,
    cpo_alpha: f64,
    alpha: f64,
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    nll: Tensor<B, 1>,
) -> CpoOutput<B> {
    let chosen_reward = alphapo_reward(chosen.clone(), alpha);
    let rejected_reward = alphapo_reward(rejected.clone(), alpha);
    let delta = chosen_reward.clone() - rejected_reward.clone();
    let per_pair = match kind {
        CpoLoss::Sigmoid { label_smoothing } => {
            smoothed_sigmoid(delta.mul_scalar(beta), label_smoothing)
        }
        CpoLoss::Hinge => relu(delta.mul_scalar(-beta).add_scalar(1.0)),
        CpoLoss::Ipo => delta.sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
        CpoLoss::Simpo {
            gamma,
            label_smoothing,
        } => smoothed_sigmoid(
            delta.sub_scalar(gamma / beta).mul_scalar(beta),
            label_smoothing,
        ),
    };
    let (loss, nll_value) = if cpo_alpha == 0.0 {
        (per_pair.mean(), 0.0)
    } else {
        let value = first_value(nll.clone().detach());
        (per_pair.mean() + nll.mul_scalar(cpo_alpha), value)
    };

    let mut metrics = reward_metrics(beta, [chosen_reward, rejected_reward], [chosen, rejected]);
    metrics.push(("nll_loss", nll_value));
    CpoOutput { loss, metrics }
}

/// The reward metrics of a reference-free preference loss, batch means under TRL's names:
/// `rewards/chosen` and `rewards/rejected` (β × the policy's `rewards`, chosen and rejected: its
/// log-probs, or a function of them), `rewards/accuracies` (the fraction of pairs whose chosen
/// reward is strictly higher), `rewards/margins`, and `logps/*` (the log-probs `logps`).
pub(crate) fn reward_metrics<B: Backend>(
    beta: f64,
    rewards: [Tensor<B, 1>; 2],
    logps: [Tensor<B, 1>; 2],
) -> Vec<(&'static str, f64)> {
    let mean = |t: Tensor<B, 1>| first_value(t.detach().mean());
    let [chosen_rewards, rejected_rewards] = rewards.map(|r| r.detach().mul_scalar(beta));
    let [chosen, rejected] = logps;
    let accuracies = chosen_rewards
        .clone()
        .greater(rejected_rewards.clone())
        .float();
    vec![
        ("rewards/chosen", mean(chosen_rewards.clone())),
        ("rewards/rejected", mean(rejected_rewards.clone())),
        ("rewards/accuracies", mean(accuracies)),
        ("rewards/margins", mean(chosen_rewards - rejected_rewards)),
        ("logps/chosen", mean(chosen)),
        ("logps/rejected", mean(rejected)),
    ]
}
