//! The model's tokenizer (`tokenizer.json`) with the special tokens `tokenizer_config.json`
//! names.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{DataError, Result};

/// A token's byte range in the text it came from.
pub type Offsets = (usize, usize);

/// Special tokens as `tokenizer_config.json` declares them (each may be absent).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// The part of `tokenizer_config.json` read here; tokens are strings or `{"content": ...}`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TokenizerConfig {
    bos_token: Option<Value>,
    eos_token: Option<Value>,
    pad_token: Option<Value>,
    unk_token: Option<Value>,
    pub(crate) chat_template: Option<Value>,
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json`, or the empty config when there is none.
    pub(crate) fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|source| DataError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| DataError::Json { path, source })
    }

    fn special_tokens(&self) -> SpecialTokens {
        let content = |v: &Option<Value>| match v {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        SpecialTokens {
            bos_token: content(&self.bos_token),
            eos_token: content(&self.eos_token),
            pad_token: content(&self.pad_token),
            unk_token: content(&self.unk_token),
        }
    }
}

/// A Hugging Face tokenizer and its special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub special: SpecialTokens,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(DataError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found; burnish needs the fast tokenizer (tokenizer.json). Copy it from \
                     the model's Hub repo, or save it with transformers' \
                     `AutoTokenizer.from_pretrained(...).save_pretrained(DIR)`",
                ),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let special = TokenizerConfig::from_dir(dir)?.special_tokens();
        Ok(Self { inner, special })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| DataError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` and each token's byte range in `text` (`(0, 0)` for tokens the
    /// post-processor adds).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<Offsets>)> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| DataError::Encode(e.to_string()))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::Encode(e.to_string()))
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id batches are padded with: the pad token, else the end-of-sequence token, as TRL
    /// falls back to it (and a sequence classifier is read before it).
    pub fn pad_id(&self) -> Option<u32> {
        [&self.special.pad_token, &self.special.eos_token]
            .into_iter()
            .flatten()
            .find_map(|t| self.token_to_id(t))
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
