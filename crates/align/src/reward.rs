//! Reward modelling (TRL's `RewardTrainer`): a sequence classifier with one output scores each
//! whole sequence of a preference pair at its last token that is not the pad token, and learns
//! to score the chosen one higher, by the Bradley–Terry loss
//! `-log σ(r_chosen - r_rejected - margin)`, averaged over pairs (`margin` is the pair's own, from
//! its row, 0 without one), plus, when
//! `center_rewards_coefficient` is set, that coefficient times the mean of `(r_chosen +
//! r_rejected)²`, which keeps rewards centred on zero. Metrics are TRL's: `accuracy` (the
//! fraction of pairs scored the right way round), `margin` (the mean of `r_chosen - r_rejected`)
//! and the `min_reward`, `mean_reward` and `max_reward` of every sequence.

use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burnish_data::PairExample;
use burnish_model::{ActivationCheckpoints, Decoder, scoring_batch};
use burnish_peft::f32_values;

use crate::strategy::{StepOutput, Strategy};

/// Preference pairs as whole sequences: the chosen ones, then the rejected ones, each padded at
/// the end, with the position each is scored at.
#[derive(Debug, Clone)]
pub struct ScoredPairs<B: Backend> {
    /// `[2 × pairs, seq]`
    pub ids: Tensor<B, 2, Int>,
    /// Where each row is scored: its last token that is not the pad token.
    pub positions: Vec<usize>,
    /// Each pair's margin (0 for a pair without one); `None` when no pair has one.
    pub margins: Option<Vec<f32>>,
    /// Tokens that are not padding.
    pub tokens: usize,
}

impl<B: Backend> ScoredPairs<B> {
    /// Number of pairs.
    pub fn pairs(&self) -> usize {
        self.positions.len() / 2
    }

    /// The sequences of `pairs`, padded with `pad_id`, each scored before any `pad_id` it ends
    /// with, as transformers' classifiers read a row whose config names that pad token.
    pub fn from_pairs(pairs: &[&PairExample], pad_id: u32, device: &B::Device) -> Self {
        let rows: Vec<Vec<u32>> = pairs
            .iter()
            .map(|p| p.chosen().input_ids)
            .chain(pairs.iter().map(|p| p.rejected().input_ids))
            .collect();
        let (ids, positions) = scoring_batch(&rows, Some(pad_id), device);
        let margins = pairs
            .iter()
            .any(|p| p.margin.is_some())
            .then(|| pairs.iter().map(|p| p.margin.unwrap_or(0.0)).collect());
        Self {
            ids,
            margins,
            positions,
            tokens: rows.iter().map(Vec::len).sum(),
        }
    }
}

/// A reward-model loss of chosen and rejected rewards (each `[pairs]`) and its metrics.
#[derive(Debug)]
pub struct RewardOutput<B: Backend> {
    /// `[1]`: the mean over pairs.
    pub loss: Tensor<B, 1>,
    pub metrics: Vec<(&'static str, f64)>,
}

/// TRL's reward-model loss and metrics for rewards `chosen` and `rejected` (`[pairs]`), each
/// pair's reward gap to clear in `required` when given.
pub fn reward_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    required: Option<Tensor<B, 1>>,
    center_rewards_coefficient: Option<f64>,
) -> RewardOutput<B> {
    let margins = chosen.clone() - rejected.clone();
    let cleared = match required {
        Some(required) => margins.clone() - required,
        None => margins.clone(),
    };
    let mut loss = log_sigmoid(cleared).mean().neg();
    if let Some(c) = center_rewards_coefficient {
        let sums = chosen.clone() + rejected.clone();
        loss = loss + (sums.clone() * sums).mean().mul_scalar(c);
    }
    let margins = f32_values(margins);
    let every: Vec<f64> = f32_values(chosen)
        .into_iter()
        .chain(f32_values(rejected))
        .map(f64::from)
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let pairs = margins.len().max(1) as f64;
    let metrics = vec![
        (
            "accuracy",
            margins.iter().filter(|&&m| m > 0.0).count() as f64 / pairs,
        ),
        (
            "margin",
            margins.iter().map(|&m| f64::from(m)).sum::<f64>() / pairs,
        ),
        (
            "min_reward",
            every.iter().copied().fold(f64::INFINITY, f64::min),
        ),
        ("mean_reward", mean(&every)),
        (
            "max_reward",
            every.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ),
    ];
    RewardOutput { loss, metrics }
}

/// Reward modelling: the model must be a classifier with one label.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reward {
    pub center_rewards_coefficient: Option<f64>,
}

impl Reward {
    /// Each row's reward (`[rows]`) of `batch` under `model`; the pass goes through
    /// `checkpoints` when given.
    pub fn rewards<B: AutodiffBackend>(
        model: &Decoder<B>,
        batch: &ScoredPairs<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> Tensor<B, 1> {
        let hidden = match checkpoints {
            Some(c) => model.hidden_states_checkpointed(batch.ids.clone(), None, c),
            None => model.hidden_states(batch.ids.clone()),
        };
        let rows = batch.positions.len();
        model.scores(hidden, &batch.positions).reshape([rows])
    }
}

impl<B: AutodiffBackend> Strategy<B> for Reward {
    type Batch = ScoredPairs<B>;

    fn units(&self, batch: &ScoredPairs<B>) -> f64 {
        batch.pairs() as f64
    }

    fn loss(
        &self,
        model: &Decoder<B>,
        batch: &ScoredPairs<B>,
        checkpoints: Option<&mut ActivationCheckpoints<B>>,
    ) -> StepOutput<B> {
        let pairs = batch.pairs();
        let rewards = Self::rewards(model, batch, checkpoints);
        let required = batch
            .margins
            .as_ref()
            .map(|m| Tensor::from_data(TensorData::new(m.clone(), [pairs]), &rewards.device()));
        let out = reward_loss(
            rewards.clone().slice(0..pairs),
            rewards.slice(pairs..2 * pairs),
            required,
            self.center_rewards_coefficient,
        );
        StepOutput {
            loss_sum: out.loss.mul_scalar(pairs as f64),
            units: pairs as f64,
            metrics: out.metrics,
        }
    }
}
