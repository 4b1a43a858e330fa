//! Odds-ratio preference optimisation (ORPO): SFT on the chosen sequences plus a penalty on the
//! odds of the rejected completion against the chosen one, with no reference model. As TRL's
//! `ORPOTrainer` computes it: `loss = NLL(chosen) - β·mean(log σ(log_odds))`, where
//! `log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))` of the completions' *average* per-token
//! log-probs `c` and `r`, and the NLL term is the mean over every token of the chosen sequences,
//! prompt included. The metrics keep TRL's names: `rewards/*` are `β·c` and `β·r`, `logps/*` the
//! average log-probs, `nll_loss`, `log_odds_ratio` (mean `log σ(log_odds)`) and
//! `log_odds_chosen` (mean `log_odds`).

use burn::tensor::Tensor;
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::Backend;
use burnish_peft::first_value;

use crate::cpo::reward_metrics;

/// `log(1 - e^x)` for `x < 0`, accurate on both sides of `-ln 2` (where TRL's `log1mexp`
/// switches from `log1p(-e^x)` to `log(-expm1(x))`): near zero `1 - e^x` is computed from its
/// series instead of a cancelling subtraction.
pub fn log1mexp<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    const LN_2: f64 = std::f64::consts::LN_2;
    // A sequence predicted with certainty (log-prob 0) has infinite odds: keep them finite.
    let x = x.clamp_max(-1e-30);
    let far = x.clone().lower_elem(-LN_2);
    let low = x.clone().clamp_max(-LN_2);
    let high = x.clamp_min(-LN_2);
    // 1 - e^x = -x·(1 + x/2 + x²/6 + ...), Horner to the x⁸/9! term: below 1e-8 relative error
    // for |x| ≤ ln 2.
    let mut series = high.ones_like();
    for k in (2..=9).rev() {
        series = series * high.clone().div_scalar(k as f64) + 1.0;
    }
    let near = (high.neg() * series).log();
    let far_value = low.exp().neg().log1p();
    near.mask_where(far, far_value)
}

/// The ORPO loss (`[1]`) and metrics of a batch of pairs.
#[derive(Debug, Clone)]
pub struct OrpoOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub metrics: Vec<(&'static str, f64)>,
}

/// ORPO with strength `beta` from the completions' average log-probs `chosen` and `rejected`
/// (`[pairs]` each) and the chosen sequences' mean NLL `nll` (`[1]`).
pub fn orpo_loss<B: Backend>(
    beta: f64,
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    nll: Tensor<B, 1>,
) -> OrpoOutput<B> {
    let log_odds = (chosen.clone() - rejected.clone())
        - (log1mexp(chosen.clone()) - log1mexp(rejected.clone()));
    let ratio = log_sigmoid(log_odds.clone());
    let loss = nll.clone() - ratio.clone().mean().mul_scalar(beta);

    let mean = |t: Tensor<B, 1>| first_value(t.detach().mean());
    let mut metrics = reward_metrics(beta, [chosen.clone(), rejected.clone()], [chosen, rejected]);
    metrics.extend([
        ("nll_loss", mean(nll)),
        ("log_odds_ratio", mean(ratio)),
        ("log_odds_chosen", mean(log_odds)),
    ]);
    OrpoOutput { loss, metrics }
}
