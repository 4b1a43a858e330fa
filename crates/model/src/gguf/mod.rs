//! GGUF export: a model's weights, hyper-parameters and tokenizer in the single file llama.cpp
//! (and Ollama, LM Studio, ...) runs, written as llama.cpp's own `convert_hf_to_gguf.py` writes
//! it: Llama and Mistral as the `llama` architecture (the query and key projections' rows
//! permuted to llama.cpp's rotary layout), Qwen2 as `qwen2`, Qwen3 as `qwen3`; Llama 3's rope
//! scaling as a `rope_freqs` tensor; norms and biases in f32, matrices in the chosen type.

mod encoding;
mod file;
mod sentencepiece;
mod vocab;

use std::path::Path;

use serde_json::Value as Json;

use file::{TensorEntry, TensorType, Value};

use burnish_peft::StreamedWriteError;

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::rope::RopeScaling;
use crate::save::LazyWeight;

/// What the matrices are written in: llama.cpp's `--outtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufType {
    /// The element type of a matrix of rows `row` long: Q8_0 needs whole blocks, else f16.
    fn matrix(self, row: usize) -> TensorType {
        match self {
            Self::F32 => TensorType::F32,
            Self::F16 => TensorType::F16,
            Self::Bf16 => TensorType::BF16,
            Self::Q8_0 if row.is_multiple_of(encoding::Q8_0_BLOCK) => TensorType::Q8_0,
            Self::Q8_0 => TensorType::F16,
        }
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }
}

pub use vocab::uses_sentencepiece;

/// What the file says about itself and its model beyond the weights.
#[derive(Debug, Clone)]
pub struct GgufModel<'a> {
    pub config: &'a HfConfig,
    /// Where the tokenizer files are (`tokenizer.json`, `tokenizer_config.json`, ...).
    pub tokenizer_dir: &'a Path,
    /// llama.cpp's name of a BPE tokenizer's pre-tokenizer (`llama-bpe`, `qwen2`, `smollm`,
    /// ...); a SentencePiece vocabulary has none.
    pub pre_tokenizer: &'a str,
    /// `general.name`.
    pub name: &'a str,
    /// A chat template to write instead of the tokenizer's own (an adapter's run's).
    pub chat_template: Option<&'a str>,
}

/// The metadata key of the chat template.
const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// `template` without its `{% generation %}` tags, which only training reads and llama.cpp's
/// Jinja does not know: each becomes an `if true` block with the same whitespace control.
fn inference_template(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start + 2..].find("%}").map(|end| end + 4) else {
            break;
        };
        out.push_str(&rest[..start]);
        let tag = &rest[start..start + len];
        let inner = tag[2..tag.len() - 2].trim_matches('-').trim();
        let (open, close) = (
            if tag.starts_with("{%-") { "{%-" } else { "{%" },
            if tag.ends_with("-%}") { "-%}" } else { "%}" },
        );
        match inner {
            "generation" => out.push_str(&format!("{open} if true {close}")),
            "endgeneration" => out.push_str(&format!("{open} endif {close}")),
            _ => out.push_str(tag),
        }
        rest = &rest[start + len..];
    }
    out.push_str(rest);
    out
}

/// llama.cpp's architecture for a model type.
fn architecture(model_type: &str) -> Option<&'static str> {
    match model_type {
        "llama" | "mistral" => Some("llama"),
        "qwen2" => Some("qwen2"),
        "qwen3" => Some("qwen3"),
        _ => None,
    }
}

/// Writes `weights` (under their Hugging Face names) of `model` as the GGUF file `path`, one
/// tensor at a time, through a temporary file renamed into place when complete. Refuses
/// non-finite weights.
pub fn export_gguf(
    model: &GgufModel,
    weights: Vec<LazyWeight>,
    kind: GgufType,
    path: &Path,
) -> Result<()> {
    let metadata = metadata(model, kind)?;
    let (entries, sources) = tensors(model.config, weights, kind)?;
    let values = |i: usize| sources[i].values(path).map_err(StreamedWriteError::Read);
    burnish_peft::write_atomic_with(path, |out| file::write(out, &metadata, &entries, values))
        .map_err(|e| e.into_error(|e| ModelError::io(path, e)))
}

/// Where a tensor's values come from: a weight of the model (its rows permuted to llama.cpp's
/// rotary layout for `heads` heads, for a llama query or key projection), or values made here.
enum Source<'a> {
    Weight {
        weight: LazyWeight<'a>,
        permuted_heads: Option<usize>,
    },
    Made(Vec<f32>),
}

impl Source<'_> {
    /// The values, those of a weight refused unless finite (for the file `path`).
    fn values(&self, path: &Path) -> Result<Vec<f32>> {
        match self {
            Self::Weight {
                weight,
                permuted_heads,
            } => {
                let values = weight.read_finite(path)?;
                Ok(match permuted_heads {
                    Some(heads) => permute_rows(&values, weight.shape[0], *heads),
                    None => values,
                })
            }
            Self::Made(values) => Ok(values.clone()),
        }
    }
}

/// The metadata key/values, as llama.cpp's converter sets them.
fn metadata(model: &GgufModel, kind: GgufType) -> Result<Vec<(String, Value)>> {
    let c = &model.config.decoder;
    let raw = &model.config.raw;
    let arch = architecture(&c.model_type).ok_or_else(|| {
        ModelError::Input(format!(
            "GGUF export knows the llama, mistral, qwen2 and qwen3 model types, not {}",
            c.model_type
        ))
    })?;
    if c.classifier_labels.is_some() {
        return Err(ModelError::Input(
            "a sequence classifier (a reward model) has no GGUF form llama.cpp generates with; \
             export a language model"
                .into(),
        ));
    }
    let key = |name: &str| format!("{arch}.{name}");
    let u32_of = |v: usize| Value::U32(v as u32);
    let mut out: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(model.name.into())),
        (key("block_count"), u32_of(c.num_layers)),
    ];
    if let Some(n_ctx) = raw.get("max_position_embeddings").and_then(Json::as_u64) {
        out.push((key("context_length"), Value::U32(n_ctx as u32)));
    }
    out.extend([
        (key("embedding_length"), u32_of(c.hidden_size)),
        (key("feed_forward_length"), u32_of(c.intermediate_size)),
        (key("attention.head_count"), u32_of(c.num_heads)),
        (key("attention.head_count_kv"), u32_of(c.num_kv_heads)),
    ]);
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        out.push((key("rope.scaling.type"), Value::Str("linear".into())));
        out.push((key("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    out.extend([
        (key("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ]);
    if raw.contains_key("head_dim") {
        out.push((key("attention.key_length"), u32_of(c.head_dim)));
        out.push((key("attention.value_length"), u32_of(c.head_dim)));
    }
    out.push(("general.file_type".into(), Value::U32(kind.file_type())));
    if arch == "llama" {
        out.push((key("vocab_size"), u32_of(c.vocab_size)));
        out.push((key("rope.dimension_count"), u32_of(c.head_dim)));
    }
    out.push(("general.quantization_version".into(), Value::U32(2)));
    if arch == "llama" {
        let tokenizer_config = model.tokenizer_dir.join("tokenizer_config.json");
        let prefix_space = vocab::read_json(&tokenizer_config)?
            .and_then(|tc| tc.get("add_prefix_space").and_then(Json::as_bool));
        if let Some(prefix_space) = prefix_space {
            out.push((
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(prefix_space),
            ));
        }
    }
    out.extend(vocab::metadata(
        model.tokenizer_dir,
        raw,
        c.vocab_size,
        model.pre_tokenizer,
    )?);
    if let Some(template) = model.chat_template {
        out.retain(|(key, _)| key != CHAT_TEMPLATE_KEY);
        out.push((
            CHAT_TEMPLATE_KEY.into(),
            Value::Str(inference_template(template)),
        ));
    }
    Ok(out)
}

/// llama.cpp's name of a Hugging Face tensor, `None` for one it has no use for.
fn gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(fixed) = fixed {
        return Some(fixed.into());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// The rows of a query or key projection (or its bias) reordered from Hugging Face's rotary
/// layout (each head's first halves, then its second halves) to llama.cpp's (pairs side by side).
fn permute_rows(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let width = values.len() / rows;
    let (head_dim, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for s in 0..2 {
                let from = h * head_dim + s * half + j;
                let to = h * head_dim + 2 * j + s;
                out[to * width..(to + 1) * width]
                    .copy_from_slice(&values[from * width..(from + 1) * width]);
            }
        }
    }
    out
}

/// Llama 3's rope scaling as the factors each rotary frequency is divided by, in f32 as
/// llama.cpp's converter computes them.
fn llama3_rope_factors(scaling: &RopeScaling, theta: f64, head_dim: usize) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = *scaling
    else {
        return None;
    };
    let (factor, low, high, old) = (
        factor as f32,
        low_freq_factor as f32,
        high_freq_factor as f32,
        old as f32,
    );
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let factors = (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / (theta as f32).powf(i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

/// The tensors under llama.cpp's names with where their values come from, in the order its
/// converter writes them (the extra `rope_freqs` first, then the Hugging Face names' order).
fn tensors<'a>(
    config: &HfConfig,
    weights: Vec<LazyWeight<'a>>,
    kind: GgufType,
) -> Result<(Vec<TensorEntry>, Vec<Source<'a>>)> {
    let c = &config.decoder;
    let permuted = architecture(&c.model_type) == Some("llama");
    let mut out = Vec::with_capacity(weights.len() + 1);
    if let Some(factors) = llama3_rope_factors(&c.rope_scaling, c.rope_theta, c.head_dim) {
        let entry = TensorEntry {
            name: "rope_freqs.weight".into(),
            shape: vec![factors.len()],
            kind: TensorType::F32,
        };
        out.push((entry, Source::Made(factors)));
    }
    let mut weights = weights;
    weights.sort_by(|a, b| a.name.cmp(&b.name));
    for weight in weights {
        let gguf = gguf_name(&weight.name).ok_or_else(|| {
            ModelError::Input(format!(
                "tensor `{}` has no place in llama.cpp's {} architecture",
                weight.name, c.model_type
            ))
        })?;
        let permuted_heads = match (permuted, gguf.split('.').nth(2)) {
            (true, Some("attn_q")) => Some(c.num_heads),
            (true, Some("attn_k")) => Some(c.num_kv_heads),
            _ => None,
        };
        let kind = match weight.shape.as_slice() {
            [_, row] => kind.matrix(*row),
            _ => TensorType::F32,
        };
        let entry = TensorEntry {
            name: gguf,
            shape: weight.shape.clone(),
            kind,
        };
        out.push((
            entry,
            Source::Weight {
                weight,
                permuted_heads,
            },
        ));
    }
    Ok(out.into_iter().unzip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        let cases = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("lm_head.weight", "output.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("model.layers.3.self_attn.q_proj.bias", "blk.3.attn_q.bias"),
            (
                "model.layers.0.mlp.down_proj.weight",
                "blk.0.ffn_down.weight",
            ),
            (
                "model.layers.12.post_attention_layernorm.weight",
                "blk.12.ffn_norm.weight",
            ),
        ];
        for (hf, gguf) in cases {
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf), "{hf}");
        }
        assert_eq!(gguf_name("score.weight"), None);
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        let template = "{%- for m in messages -%}{%- generation -%}{{ m.content }}\
                        {%- endgeneration -%}{% generation %}x{% endgeneration %}{%- endfor %}";
        assert_eq!(
            inference_template(template),
            "{%- for m in messages -%}{%- if true -%}{{ m.content }}{%- endif -%}\
             {% if true %}x{% endif %}{%- endfor %}"
        );
        // Malformed tags are left as they are, never repeated.
        assert_eq!(inference_template("a{%}b"), "a{%}b");
        assert_eq!(inference_template("a{% generation"), "a{% generation");
    }

    /// One head of four rows: rows (0, 1 | 2, 3) become (0, 2, 1, 3).
    #[test]
    fn rotary_rows_are_interleaved() {
        let values: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let out = permute_rows(&values, 4, 1);
        assert_eq!(out, [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
    }
}
