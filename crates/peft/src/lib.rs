//! Adapter modules for burnish: the adaptable linear layer every model projection is built from,
//! LoRA and DoRA adapters that attach to it (PEFT's targeting rules, initialisation and on-disk
//! format),
//! merging an adapter into its base, and merging several adapters or models into one.
//! This crate knows nothing of any particular model architecture: a model hands it its linear
//! layers by name.

mod adapter;
pub mod composed_op;
mod config;
mod cpu_bf16;
mod cpu_split_product;
pub mod cpu_tensors;
#[cfg(feature = "cuda")]
mod cubecl_stream;
#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "cuda")]
mod cublas_batched;
mod device_limits;
mod error;
#[cfg(any(feature = "cuda", test))]
mod gemm_layout;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod gpu_kernel;
mod linear;
mod lora;
pub mod merge_methods;
mod nf4;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod nf4_kernel;
mod rebrand;
mod row_reduction;
mod shared_output;
mod target;
mod tensor_io;

pub use adapter::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, NamedLinears, WholeModule, attach_lora,
    load_adapter, save_adapter, trainable_parameters,
};
pub use config::{CLASSIFIER_HEADS, LoraConfig, LoraInit, Task};
pub use cpu_bf16::available as cpu_bf16_available;
#[cfg(feature = "cuda")]
pub use cublas_batched::{F32Compute, batched_matmul};
pub use device_limits::f32_per_buffer;
pub use error::{PeftError, Result};
pub use linear::{AdaptableLinear, BaseWeight, cast_to, matmul, project, unproject};
pub use lora::Lora;
pub use nf4::{
    NESTED_BLOCK, NF4_BLOCK, NF4_LEVELS, Nf4Weight, blockwise_codes, double_quantized, dynamic_map,
    nested_maxima, nf4_codes,
};
pub use rebrand::{cpu_values, on_cpu, rebrand};
pub use row_reduction::{RowReduction, reduce_rows};
pub use target::{LM_HEAD, Selected, Targets, resolved_target_names, select_targets};
pub use tensor_io::{
    SaveDtype, StreamedWriteError, decode_f32, f32_values, first_non_finite, first_value,
    serialize, write_atomic, write_atomic_together, write_atomic_with, write_safetensors_streamed,
};
