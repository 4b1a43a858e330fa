//! The trainer's error type: each variant names the step and what to do.

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("step {step}: the loss is {loss}; lower the learning rate or check the data")]
    NonFiniteLoss { step: usize, loss: f64 },
    #[error("step {step}: the gradient norm is {norm}; lower the learning rate or clip harder")]
    NonFiniteGradient { step: usize, norm: f64 },
    #[error("step {step}: the accumulated batch trains no token")]
    EmptyBatch { step: usize },
}
