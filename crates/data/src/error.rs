//! The data crate's error type: each variant names the file (and where it can, the key) it is
//! about.

use std::path::PathBuf;

/// Errors from reading tokenizers and chat templates.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
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
    #[error("{path}: cannot load the tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error(
        "{dir}: no chat template: neither tokenizer_config.json's `chat_template` nor chat_template.jinja exists; pick a built-in template instead"
    )]
    NoChatTemplate { dir: PathBuf },
    #[error("chat template `{name}`: {detail}")]
    Template { name: String, detail: String },
}

/// Shorthand for results in this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
