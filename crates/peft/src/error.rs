//! The adapter crate's error type: every variant names the file, module or option it is about.

use std::path::PathBuf;

/// Errors from configuring, attaching, reading, writing and merging adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: cannot read or write: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for an adapter config: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: `{key}` is not supported: {detail}")]
    Unsupported {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error("adapter config: `{key}` is invalid: {detail}")]
    InvalidConfig { key: String, detail: String },
    #[error(
        "target_modules {targets} matches no module; the model's linear modules are: {available}"
    )]
    NoTargetMatched { targets: String, available: String },
    #[error("{path}: not a readable safetensors file ({detail})")]
    Safetensors { path: PathBuf, detail: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, but the model needs {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; adapters must be F32, BF16 or F16")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` does not belong to any module of the model")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("merge: {0}")]
    Merge(String),
    #[error(
        "{path}: tensor `{name}` holds non-finite values; refusing to write it (the training \
         diverged: lower the learning rate)"
    )]
    NonFiniteTensor { path: PathBuf, name: String },
    #[error("module `{module}`: merging produced non-finite weights; nothing was changed")]
    NonFinite { module: String },
}

impl PeftError {
    pub(crate) fn invalid(key: &str, detail: impl Into<String>) -> Self {
        Self::InvalidConfig {
            key: key.into(),
            detail: detail.into(),
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;
