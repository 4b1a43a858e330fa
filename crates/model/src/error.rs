//! The model crate's error type: every failure names the file, key or option it is about and,
//! where there is one, what to do about it.

use std::path::PathBuf;

/// Errors from reading, building, running or saving a decoder model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for this file: {source}")]
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
    #[error("{path}: `{key}` is invalid: {detail}")]
    InvalidConfig {
        path: PathBuf,
        key: String,
        detail: String,
    },
    #[error(
        "{dir}: no weights found: expected `model.safetensors` or `model.safetensors.index.json`"
    )]
    NoWeights { dir: PathBuf },
    #[error(
        "{path}: not a readable safetensors file ({detail}); the file may be truncated or corrupt, download it again"
    )]
    Safetensors { path: PathBuf, detail: String },
    #[error("{path}: tensor `{name}` is missing; the checkpoint does not match its config.json")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?} but config.json implies {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "{path}: tensor `{name}` has dtype {dtype}; only F32, BF16 and F16 weights can be loaded"
    )]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(
        "{path}: 4-bit tensor `{name}`: {detail}; the checkpoint is not one bitsandbytes wrote, or \
         it is damaged: download it again, or use the unquantized model"
    )]
    Quantized {
        path: PathBuf,
        name: String,
        detail: String,
    },
    #[error("{path}: tensor `{name}` holds non-finite values; refusing to write it")]
    NonFinite { path: PathBuf, name: String },
    #[error("adapter: {0}")]
    Adapter(#[from] burnish_peft::PeftError),
    /// Bad arguments to scoring, generation or merging.
    #[error("{0}")]
    Input(String),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
