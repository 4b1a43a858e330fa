//! One optimizer step, written once for every strategy: the micro-batches of an accumulated
//! batch are each scaled by the units (tokens or pairs) of the whole accumulated batch, their
//! gradients summed, the result checked for non-finite values, clipped and applied with AdamW at
//! the schedule's learning rate.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burnish_model::{ActivationCheckpoints, Decoder};
use burnish_peft::first_value;

use crate::error::TrainError;
use crate::optimizer::{AdamW, flat_gradients};
use crate::schedule::Schedule;
use crate::strategy::Strategy;

/// The means of named metrics over the micro-batches that report them (a KTO batch without an
/// undesirable completion has no `rewards/rejected`), in the order first reported.
#[derive(Debug, Clone, Default)]
pub struct MetricMeans {
    sums: Vec<(&'static str, f64, usize)>,
}

impl MetricMeans {
    /// Adds one micro-batch's metrics.
    pub fn add(&mut self, metrics: Vec<(&'static str, f64)>) {
        for (name, v) in metrics {
            match self.sums.iter_mut().find(|(n, ..)| *n == name) {
                Some((_, sum, count)) => {
                    *sum += v;
                    *count += 1;
                }
                None => self.sums.push((name, v, 1)),
            }
        }
    }

    /// Each metric's mean.
    pub fn means(&self) -> Vec<(&'static str, f64)> {
        self.sums
            .iter()
            .map(|&(name, sum, count)| (name, sum / count as f64))
            .collect()
    }
}

/// What one optimizer step reports (the strategy's metrics are averaged over micro-batches).
#[derive(Debug, Clone, PartialEq)]
pub struct StepMetrics {
    /// 1-based optimizer step.
    pub step: usize,
    /// Loss per unit over the whole accumulated batch.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens or pairs the loss averaged over.
    pub units: f64,
    pub metrics: Vec<(&'static str, f64)>,
}

/// What a training forward pass keeps for its backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// Every activation: the fastest.
    #[default]
    Keep,
    /// Each layer's input only; each layer is recomputed in the backward pass (activation
    /// checkpointing): less memory, one more forward pass of the layers.
    Checkpoint,
}

impl Activations {
    /// [`Checkpoint`](Self::Checkpoint) when `gradient_checkpointing` is set (the recipe's
    /// `train.gradient_checkpointing`), [`Keep`](Self::Keep) otherwise.
    pub fn checkpointed_if(gradient_checkpointing: bool) -> Self {
        if gradient_checkpointing {
            Self::Checkpoint
        } else {
            Self::Keep
        }
    }
}

/// Runs one optimizer step of `strategy` over `micro_batches` (one accumulated batch).
pub fn optimizer_step<B, S>(
    model: Decoder<B>,
    strategy: &S,
    micro_batches: &[S::Batch],
    optimizer: &mut AdamW<B>,
    schedule: &Schedule,
    activations: Activations,
) -> Result<(Decoder<B>, StepMetrics), TrainError>
where
    B: AutodiffBackend,
    S: Strategy<B>,
{
    let step = optimizer.steps + 1;
    let total_units: f64 = micro_batches.iter().map(|b| strategy.units(b)).sum();
    if total_units <= 0.0 {
        return Err(TrainError::EmptyBatch { step });
    }

    // One micro-batch graph at a time: forward, scale by the whole batch's units, backward.
    let mut accumulator = GradientsAccumulator::<Decoder<B>>::new();
    let mut loss = 0.0;
    let mut metrics = MetricMeans::default();
    for batch in micro_batches {
        let mut checkpoints =
            (activations == Activations::Checkpoint).then(ActivationCheckpoints::default);
        let output = strategy.loss(&model, batch, checkpoints.as_mut());
        let scaled = output.loss_sum.div_scalar(total_units);
        let value = first_value(scaled.clone());
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss { step, loss: value });
        }
        loss += value;
        metrics.add(output.metrics);
        let grads = match checkpoints {
            Some(checkpoints) => checkpoints.backward(&model, scaled),
            None => GradientsParams::from_grads(scaled.backward(), &model),
        };
        accumulator.accumulate(&model, grads);
    }

    let lr = schedule.lr(step - 1);
    let grads = flat_gradients(&model, &accumulator.grads());
    let norm = grads.norm();
    if !norm.is_finite() {
        return Err(TrainError::NonFiniteGradient { step, norm });
    }
    let (model, report) = optimizer.apply(lr, model, grads, norm);
    Ok((
        model,
        StepMetrics {
            step,
            loss,
            lr,
            grad_norm: report.grad_norm,
            units: total_units,
            metrics: metrics.means(),
        },
    ))
}
