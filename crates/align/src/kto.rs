//! Kahneman–Tversky optimisation (KTO): preference training on single completions labeled
//! desirable or undesirable, no pairs needed. As TRL's `KTOTrainer` computes it, from each
//! completion's summed log-probs under the policy and the reference, `r = log π(y|x) - log
//! π_ref(y|x)`, and a batch's estimate `z` of the policy's KL divergence from the reference:
//!
//! - `kto`: `1 - σ(β(r - z))` for a desirable completion, `1 - σ(β(z - r))` for an undesirable
//!   one, where `z = max(0, mean(log π(y'|x) - log π_ref(y'|x)))` over the batch's *mismatched*
//!   pairs (each prompt with another row's completion), without gradient;
//! - `apo_zero_unpaired`: the same with `z = 0` (APO-zero's unpaired form, no KL pass).
//!
//! Each loss is weighted by `desirable_weight` or `undesirable_weight` and the batch's loss is
//! their mean over completions. The metrics keep TRL's names: `kl` (`z`), `rewards/chosen` and
//! `rewards/rejected` (mean `β·r` of the desirable and the undesirable completions, present only
//! when the batch has some), `logps/chosen` and `logps/rejected` (their mean summed log-probs),
//! and `rewards/margins` (their difference, when the batch has both). The policy's `entropy` and
//! `logits/*` come from its token distributions (see the KTO strategy).

use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burnish_peft::{f32_values, first_value};

/// The KTO loss and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoLoss {
    pub beta: f64,
    /// Whether the loss compares against the KL estimate (`kto`) or against zero
    /// (`apo_zero_unpaired`).
    pub uses_kl: bool,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// Summed completion log-probs of a batch of labeled completions (each `[rows]`).
#[derive(Debug, Clone)]
pub struct LabeledLogps<B: Backend> {
    pub policy: Tensor<B, 1>,
    pub reference: Tensor<B, 1>,
    /// Whether each row's completion is desirable.
    pub desirable: Vec<bool>,
}

/// The KTO loss (`[1]`, the mean over completions) and metrics of a batch.
#[derive(Debug, Clone)]
pub struct KtoOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub metrics: Vec<(&'static str, f64)>,
}

/// The batch's KL estimate `z`: the mean log-ratio of its mismatched pairs, `policy` against
/// `reference` (`[rows]` each), clamped at 0.
pub fn kl_estimate<B: Backend>(policy: Tensor<B, 1>, reference: Tensor<B, 1>) -> f64 {
    first_value((policy - reference).mean()).max(0.0)
}

/// KTO of `logps` against the KL estimate `kl` (ignored unless [`KtoLoss::uses_kl`]). Gradients
/// flow through the policy log-probs only.
pub fn kto_loss<B: Backend>(settings: KtoLoss, logps: LabeledLogps<B>, kl: f64) -> KtoOutput<B> {
    let KtoLoss {
        beta,
        uses_kl,
        desirable_weight,
        undesirable_weight,
    } = settings;
    let kl = if uses_kl { kl } else { 0.0 };
    let rows = logps.desirable.len();
    let device = logps.policy.device();
    let column = |f: &dyn Fn(bool) -> f32| {
        let values: Vec<f32> = logps.desirable.iter().map(|&d| f(d)).collect();
        Tensor::<B, 1>::from_data(TensorData::new(values, [rows]), &device)
    };
    // A desirable completion's loss is 1 - σ(β(r - z)), an undesirable one's 1 - σ(-β(r - z)).
    let sign = column(&|d| if d { 1.0 } else { -1.0 });
    let weight = column(&|d| {
        if d {
            desirable_weight as f32
        } else {
            undesirable_weight as f32
        }
    });
    let ratio = logps.policy.clone() - logps.reference.detach();
    let margin = ratio.clone().sub_scalar(kl).mul_scalar(beta) * sign;
    let losses = sigmoid(margin).neg().add_scalar(1.0) * weight;

    let rewards = f32_values(ratio.detach().mul_scalar(beta));
    let policy = f32_values(logps.policy.detach());
    let mean_where = |values: &[f32], want: bool| {
        let picked: Vec<f64> = values
            .iter()
            .zip(&logps.desirable)
            .filter(|&(_, &d)| d == want)
            .map(|(&v, _)| f64::from(v))
            .collect();
        (!picked.is_empty()).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
    };
    let mut metrics = vec![("kl", kl)];
    let chosen = mean_where(&rewards, true);
    let rejected = mean_where(&rewards, false);
    if let Some(c) = chosen {
        metrics.push(("rewards/chosen", c));
        metrics.extend(mean_where(&policy, true).map(|v| ("logps/chosen", v)));
    }
    if let Some(r) = rejected {
        metrics.push(("rewards/rejected", r));
        metrics.extend(mean_where(&policy, false).map(|v| ("logps/rejected", v)));
    }
    if let (Some(c), Some(r)) = (chosen, rejected) {
        metrics.push(("rewards/margins", c - r));
    }
    KtoOutput {
        loss: losses.mean(),
        metrics,
    }
}
