//! The trainer's error type: each variant names the step and what to do.

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "step {step}: the loss is {loss}; lower the learning rate, check the data, or set train.on_nonfinite = \"skip\""
    )]
    NonFiniteLoss { step: usize, loss: f64 },
    #[error("step {step}: the gradient norm is {norm}; lower the learning rate or clip harder")]
    NonFiniteGradient { step: usize, norm: f64 },
    #[error("step {step}: the accumulated batch trains no token")]
    EmptyBatch { step: usize },
}

/// Errors reading a recipe; each names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Invalid {
        path: std::path::PathBuf,
        detail: String,
    },
}

/// Errors of a training run, from any stage.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] burnish_data::DataError),
    #[error(transparent)]
    Model(#[from] burnish_model::ModelError),
    #[error(transparent)]
    Adapter(#[from] burnish_peft::PeftError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("{path}: cannot write: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A row of the `[check]` file that cannot be used.
    #[error("{path}:{line}: {detail}")]
    Check {
        path: std::path::PathBuf,
        line: usize,
        detail: String,
    },
    /// A GRPO reward program that could not be started or did not answer as expected.
    #[error("reward program `{name}`: {detail}")]
    RewardProgram { name: String, detail: String },
    /// The recipe and the data do not fit together.
    #[error("{0}")]
    Mismatch(String),
}
