//! The data crate's error type: each variant names the file (and where it can, the line or key)
//! it is about, and what to do.

use std::path::PathBuf;

/// Errors from reading tokenizers, chat templates and datasets.
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
    #[error("no built-in chat template `{name}`; built-ins: {}", crate::BUILTIN_TEMPLATES.join(", "))]
    UnknownTemplate { name: String },
    /// A dataset row that cannot become an example (with `on_bad_row = "error"`).
    #[error("{path}:{line}: {reason} (set on_bad_row = \"skip\" to skip such rows)")]
    BadRow {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A dataset file whose layout cannot be read (not a row's problem, so not skippable).
    #[error("{path}:{line}: {detail}")]
    Layout {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    /// A setting that cannot work.
    #[error("data config: `{key}`: {detail}")]
    Config { key: String, detail: String },
}

/// Shorthand for results in this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
