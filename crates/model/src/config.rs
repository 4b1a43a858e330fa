//! `config.json`: the serde mirror of a Hugging Face checkpoint's configuration, and its
//! resolution into the validated [`DecoderConfig`] the model is built from. Every option that
//! would change the numerics and that we do not implement is refused here, by name.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::bnb_4bit::stored_in_nf4;
use crate::error::{ModelError, Result};
use crate::rope::RopeScaling;

/// How a sequence classifier's architecture name ends (`LlamaForSequenceClassification`).
pub const CLASSIFIER_SUFFIX: &str = "ForSequenceClassification";

/// The architectures this decoder implements exactly.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// One integer or a list of them, as `eos_token_id` is written in HF configs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// `config.json` as transformers writes it for llama, mistral and qwen2 (4.x and 5.x). Keys we
/// do not read are kept in [`HfConfig::raw`] so a saved model carries them unchanged.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    /// transformers 4.x
    rope_theta: Option<f64>,
    /// transformers 4.x
    rope_scaling: Option<Value>,
    /// transformers 5.x: `{rope_type, rope_theta, factor, ...}`
    rope_parameters: Option<Value>,
    partial_rotary_factor: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    quantization_config: Option<Value>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    /// Any JSON: configs write -1 or null for "no pad token".
    pad_token_id: Option<Value>,
    architectures: Option<Vec<String>>,
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, Value>>,
}

fn default_hidden_act() -> String {
    "silu".into()
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// The resolved, validated shape and numerics of a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Queries and keys RMS-normalised per head before the rotation (Qwen3's `q_norm`,
    /// `k_norm`).
    pub qk_norm: bool,
    /// Each query attends to at most this many keys, itself included (Mistral).
    pub sliding_window: Option<usize>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The padding token; a sequence classifier reads each row's score at its last other token.
    pub pad_token_id: Option<u32>,
    /// `Some(labels)` for a sequence-classification checkpoint (`*ForSequenceClassification`:
    /// a `score` head of `labels` outputs and no LM head), `None` for a causal LM.
    pub classifier_labels: Option<usize>,
}

/// A parsed `config.json`: the resolved config plus the original JSON object.
#[derive(Debug, Clone)]
pub struct HfConfig {
    pub decoder: DecoderConfig,
    /// The file as read, written back unchanged (except for the dtype) when a model is saved.
    pub raw: serde_json::Map<String, Value>,
}

impl HfConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path` is used in errors only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let json_err = |source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        };
        let raw: serde_json::Map<String, Value> = serde_json::from_str(text).map_err(json_err)?;
        let parsed: RawConfig =
            serde_json::from_value(Value::Object(raw.clone())).map_err(json_err)?;
        let decoder = resolve(parsed, path)?;
        Ok(Self { decoder, raw })
    }

    /// The dtype the config declares for the weights (`dtype` or `torch_dtype`), if it is one
    /// burnish writes.
    pub fn declared_dtype(&self) -> Option<burnish_peft::SaveDtype> {
        use burnish_peft::SaveDtype;
        match self
            .raw
            .get("dtype")
            .or_else(|| self.raw.get("torch_dtype"))
            .and_then(Value::as_str)
        {
            Some("float32") => Some(SaveDtype::F32),
            Some("bfloat16") => Some(SaveDtype::BF16),
            Some("float16") => Some(SaveDtype::F16),
            _ => None,
        }
    }

    /// Whether the checkpoint was saved quantized to 4 bits by bitsandbytes (NF4): a
    /// `*-bnb-4bit` model, its projections stored as codes.
    pub fn stored_in_nf4(&self) -> bool {
        stored_in_nf4(self.raw.get("quantization_config")) == Ok(true)
    }

    /// The standard deviation transformers initialises weights with (`initializer_range`, 0.02
    /// when absent); `path` is used in errors.
    pub fn initializer_range(&self, path: &Path) -> Result<f32> {
        match self.raw.get("initializer_range") {
            None | Some(Value::Null) => Ok(0.02),
            Some(value) => value
                .as_f64()
                .map(|x| x as f32)
                .filter(|x| x.is_finite() && *x > 0.0 && *x <= 1.0)
                .ok_or_else(|| ModelError::InvalidConfig {
                    path: path.to_path_buf(),
                    key: "initializer_range".into(),
                    detail: format!(
                        "{value} is not a standard deviation in (0, 1]; transformers' models \
                         use 0.02"
                    ),
                }),
        }
    }
}

fn resolve(c: RawConfig, path: &Path) -> Result<DecoderConfig> {
    let unsupported = |key: &str, detail: String| ModelError::Unsupported {
        path: path.to_path_buf(),
        key: key.to_string(),
        detail,
    };
    let invalid = |key: &str, detail: String| ModelError::InvalidConfig {
        path: path.to_path_buf(),
        key: key.to_string(),
        detail,
    };

    let model_type = c
        .model_type
        .clone()
        .ok_or_else(|| invalid("model_type", "missing".into()))?;
    if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
        return Err(unsupported(
            "model_type",
            format!(
                "`{model_type}`; supported: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            ),
        ));
    }
    if c.hidden_act != "silu" {
        return Err(unsupported(
            "hidden_act",
            format!("`{}`; only `silu` (SwiGLU) is implemented", c.hidden_act),
        ));
    }
    if let Err(why) = stored_in_nf4(c.quantization_config.as_ref()) {
        return Err(unsupported("quantization_config", why));
    }
    if let Some(f) = c.partial_rotary_factor
        && f != 1.0
    {
        return Err(unsupported(
            "partial_rotary_factor",
            format!("{f}; only full rotary embeddings (1.0) are implemented"),
        ));
    }

    for (key, value) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
    ] {
        if value == 0 {
            return Err(invalid(key, "must be positive".into()));
        }
    }
    let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    if num_kv_heads == 0 || !c.num_attention_heads.is_multiple_of(num_kv_heads) {
        return Err(invalid(
            "num_key_value_heads",
            format!(
                "{num_kv_heads} must divide num_attention_heads ({})",
                c.num_attention_heads
            ),
        ));
    }
    let head_dim = match c.head_dim {
        Some(d) => d,
        None if c.hidden_size.is_multiple_of(c.num_attention_heads) => {
            c.hidden_size / c.num_attention_heads
        }
        None => {
            return Err(invalid(
                "head_dim",
                "absent, and hidden_size is not a multiple of num_attention_heads".into(),
            ));
        }
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(
            "head_dim",
            format!("{head_dim}; rotary embeddings need an even, positive head_dim"),
        ));
    }

    let (rope_theta, rope_scaling) = resolve_rope(&c, path)?;

    let sliding_window = match model_type.as_str() {
        "mistral" => c.sliding_window,
        "qwen2" | "qwen3" => {
            let sliding_layers = c
                .layer_types
                .iter()
                .flatten()
                .any(|t| t != "full_attention");
            if c.use_sliding_window == Some(true) || sliding_layers {
                return Err(unsupported(
                    "use_sliding_window",
                    "Qwen2 and Qwen3 sliding-window layers are not implemented".into(),
                ));
            }
            None
        }
        _ => {
            if let Some(types) = &c.layer_types
                && types.iter().any(|t| t != "full_attention")
            {
                return Err(unsupported(
                    "layer_types",
                    format!("{types:?}; only full attention layers are implemented"),
                ));
            }
            None
        }
    };
    if sliding_window == Some(0) {
        return Err(invalid("sliding_window", "must be positive".into()));
    }

    let attention_bias = c.attention_bias.unwrap_or(false);
    // transformers' default for a classifier is two labels, unless `id2label` lists them.
    let classifier_labels = c
        .architectures
        .iter()
        .flatten()
        .any(|a| a.ends_with(CLASSIFIER_SUFFIX))
        .then(|| {
            c.num_labels
                .or(c.id2label.as_ref().map(|m| m.len()))
                .unwrap_or(2)
        });
    if classifier_labels == Some(0) {
        return Err(invalid("num_labels", "a classifier needs a label".into()));
    }
    let qkv_bias = model_type == "qwen2" || attention_bias;

    Ok(DecoderConfig {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta,
        rope_scaling,
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        qkv_bias,
        o_bias: attention_bias,
        mlp_bias: c.mlp_bias.unwrap_or(false),
        qk_norm: model_type == "qwen3",
        sliding_window,
        eos_token_ids: c.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
        bos_token_id: match c.bos_token_id {
            Some(TokenIds::One(id)) => Some(id),
            _ => None,
        },
        pad_token_id: c
            .pad_token_id
            .as_ref()
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok()),
        classifier_labels,
        model_type,
    })
}

/// Reads the rotary settings from either `rope_parameters` (transformers 5) or
/// `rope_theta` + `rope_scaling` (transformers 4).
fn resolve_rope(c: &RawConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    let (key, params) = match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(c.rope_theta)
        .unwrap_or(10_000.0);
    let scaling = match params {
        None => RopeScaling::None,
        Some(p) => RopeScaling::from_json(p).map_err(|detail| ModelError::Unsupported {
            path: path.to_path_buf(),
            key: key.to_string(),
            detail,
        })?,
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<HfConfig> {
        HfConfig::from_json_str(json, Path::new("config.json"))
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;

    #[test]
    fn transformers_5_rope_parameters_are_read() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_parameters": {{"rope_type": "linear",
            "rope_theta": 500000.0, "factor": 2.0}}}}"#
        ))
        .unwrap();
        assert_eq!(c.decoder.rope_theta, 500000.0);
        assert_eq!(c.decoder.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.decoder.num_kv_heads, 2);
        assert_eq!(c.decoder.head_dim, 4);
    }

    /// A classifier's labels come from its architecture and label count; "no pad token" may be
    /// written as null or -1, and a null architecture list is no list.
    #[test]
    fn classifiers_and_pad_tokens_are_read_as_transformers_writes_them() {
        let config = |extra: &str| parse(&format!(r#"{{"model_type": "llama", {BASE}{extra}}}"#));
        let c = config(r#", "architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "LABEL_0"}, "pad_token_id": 3"#).unwrap();
        assert_eq!(
            (c.decoder.classifier_labels, c.decoder.pad_token_id),
            (Some(1), Some(3))
        );
        let c = config(r#", "architectures": ["LlamaForSequenceClassification"]"#).unwrap();
        assert_eq!(
            c.decoder.classifier_labels,
            Some(2),
            "transformers' default"
        );
        for extra in [
            r#", "architectures": null, "pad_token_id": -1"#,
            r#", "pad_token_id": null"#,
        ] {
            let c = config(extra).unwrap();
            assert_eq!(
                (c.decoder.classifier_labels, c.decoder.pad_token_id),
                (None, None)
            );
        }
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let err = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("model_type") && msg.contains("gpt2"), "{msg}");
    }

    #[test]
    fn unsupported_rope_type_is_named() {
        let err = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("rope_scaling") && msg.contains("yarn"),
            "{msg}"
        );
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let err = parse(&format!(
            r#"{{"model_type": "mistral", {BASE}, "num_key_value_heads": 3}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn qwen2_sliding_window_is_refused_and_biases_are_on() {
        let err = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "use_sliding_window": true, "sliding_window": 4}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("use_sliding_window"), "{err}");
        let ok = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "use_sliding_window": false, "sliding_window": 4}}"#
        ))
        .unwrap();
        assert!(ok.decoder.qkv_bias && !ok.decoder.o_bias);
        assert_eq!(ok.decoder.sliding_window, None);
    }
}
