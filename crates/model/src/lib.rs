//! The decoder-only transformer family (Llama, Mistral, Qwen2 and checkpoints of those types)
//! on burn: `config.json` resolution, Hugging Face safetensors loading and saving, the model
//! itself, and generation with a KV cache. Tokenization and chat templates live in
//! `burnish-data`; adapters in `burnish-peft`.

mod attention;
mod base_dtype;
mod bnb_4bit;
mod build;
mod checkpointing;
mod chunked_attention;
mod config;
mod cpu_attention;
mod cpu_kernel;
mod decoder;
mod documents;
mod error;
mod generate;
mod generation_config;
mod gguf;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu_kernels;
mod merge;
mod mlp;
mod norm;
mod pretrained;
mod rope;
mod row_softmax;
mod save;
mod score;
mod vector_exp;
mod weights;

pub use attention::{Attention, LayerCache};
pub use base_dtype::{ACTIVATIONS_ENV, BaseDtype};
pub use bnb_4bit::StoredNf4;
pub use build::build_decoder;
pub use checkpointing::ActivationCheckpoints;
pub use config::{DecoderConfig, HfConfig, SUPPORTED_MODEL_TYPES, TokenIds};
pub use decoder::{
    Decoder, DecoderLayer, KvCache, LAYER_PROJECTIONS, linear_module_names, scored_position,
    scoring_batch,
};
pub use documents::Documents;
pub use error::{ModelError, Result};
pub use generate::{GenerateOptions, argmax, generate, sample_group};
pub use generation_config::GenerationConfig;
pub use gguf::{GgufModel, GgufType, export_gguf, uses_sentencepiece};
pub use merge::{InMemoryWeights, MergeMethod, MergeOptions, NamedWeights, merge_weights};
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use pretrained::Pretrained;
pub use rope::{Rope, RopeScaling, Rotation, Rotations};
pub use row_softmax::softmax_rows;
pub use save::{LazyWeight, lazy_weights, named_weights, save_decoder};
pub use score::{batch_rewards, token_logprobs};
pub use weights::{RandomWeights, TensorSource, Weights};
