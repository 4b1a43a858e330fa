//! The chat-template data loader every trainer shares: the model's tokenizer and special tokens,
//! and chat templates rendered exactly as transformers' `apply_chat_template` does. This crate
//! never sees a model.

mod error;
mod template;
mod tokenizer;

pub use error::{DataError, Result};
pub use template::{ChatTemplate, Message};
pub use tokenizer::{SpecialTokens, Tokenizer};
