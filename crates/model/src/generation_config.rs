//! `generation_config.json`: the stop tokens and sampling defaults a checkpoint ships with.

use std::path::Path;

use serde::Deserialize;

use crate::config::TokenIds;
use crate::error::{ModelError, Result};

/// The fields of `generation_config.json` that burnish uses; all optional.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
    pub pad_token_id: Option<TokenIds>,
}

impl GenerationConfig {
    /// Reads `path`, or the empty config when the file does not exist.
    pub fn from_file_or_default(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })
    }
}
