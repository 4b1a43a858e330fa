//! The chat-template data loader every trainer shares: dataset rows of several shapes, read with
//! file and line for every error; chat templates rendered exactly as transformers'
//! `apply_chat_template` does; token ids with exact per-token loss masks; truncation, packing,
//! padding, shuffling and splitting into batches. This crate never sees a model or a tensor.
//!
//! Row → [`Sample`] → [`Example`] (token ids + which are trained) → [`Batch`]:
//!
//! ```
//! use std::path::Path;
//! use burnish_data::{ChatTemplate, Encoded, Encoder, Message, Sample, Tokenizer, TrainOn};
//!
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama");
//! let tokenizer = Tokenizer::from_dir(&dir)?;
//! let encoder = Encoder::new(tokenizer, ChatTemplate::builtin("chatml")?, TrainOn::Assistant);
//! let sample = Sample::Chat {
//!     messages: vec![Message::new("user", "Hi"), Message::new("assistant", "Hello")],
//!     prompt_len: None,
//!     tools: None,
//! };
//! let Ok(Encoded::Single(example)) = encoder.encode(&sample) else { panic!("a bad row") };
//! let trained: Vec<u32> = example
//!     .input_ids
//!     .iter()
//!     .zip(&example.labels_mask)
//!     .filter_map(|(&id, &m)| m.then_some(id))
//!     .collect();
//! // The assistant's answer and its end-of-turn token, nothing of the prompt.
//! assert_eq!(encoder.tokenizer.decode(&trained, false)?, "Hello<|im_end|>\n");
//! # Ok::<(), burnish_data::DataError>(())
//! ```

mod batch;
mod builtin;
mod dataset;
mod error;
mod example;
mod format;
mod jinja;
mod message;
mod python;
mod reader;
mod template;
mod tokenizer;

pub use batch::{Batch, BatchConfig, make_batches, pack_best_fit_decreasing, shuffle, split_eval};
pub use builtin::BUILTIN_TEMPLATES;
pub use dataset::{DataConfig, Dataset, OnBadRow, Rejection, Report, Source, Truncation, load};
pub use error::{DataError, Result};
pub use example::{
    Encoded, Encoder, Example, LabeledExample, PairExample, PromptExample, PromptSource, TrainOn,
    mask_from_spans,
};
pub use format::{AlpacaStyle, Fields, RowFormat, Sample, parse_row};
pub use jinja::SOURCE_DATE_EPOCH;
pub use message::{Content, ContentPart, Message, ROLES};
pub use reader::{RawRow, read_rows};
pub use template::{ChatTemplate, Rendered};
pub use tokenizer::{SpecialTokens, Tokenizer};
