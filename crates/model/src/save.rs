//! Writing a [`Decoder`] back in Hugging Face layout: `model.safetensors` under the original key
//! names plus `config.json`, each through a temporary file and a rename.

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burnish_peft::AdaptableLinear;
use safetensors::Dtype;

use crate::config::HfConfig;
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::weights::SINGLE_FILE;

/// The element type weights are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDtype {
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    /// The name transformers uses in `config.json`'s `dtype` / `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    fn encode(self, values: &[f32]) -> (Dtype, Vec<u8>) {
        match self {
            Self::F32 => (
                Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Self::BF16 => (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            Self::F16 => (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        }
    }
}

/// Every weight of `model` under its Hugging Face key name, as f32 values with their shape.
pub fn named_weights<B: Backend>(model: &Decoder<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    fn put<B: Backend, const D: usize>(
        out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
        name: String,
        t: Tensor<B, D>,
    ) {
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default();
        out.push((name, shape, values));
    }
    fn put_linear<B: Backend>(
        out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
        prefix: String,
        l: &AdaptableLinear<B>,
    ) {
        put(out, format!("{prefix}.weight"), l.weight.val());
        if let Some(b) = &l.bias {
            put(out, format!("{prefix}.bias"), b.val());
        }
    }

    let mut out = Vec::new();
    put(
        &mut out,
        "model.embed_tokens.weight".into(),
        model.embed_tokens.val(),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        put(
            &mut out,
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.weight.val(),
        );
        let a = &layer.self_attn;
        for (name, l) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("o_proj", &a.o_proj),
        ] {
            put_linear(&mut out, format!("{p}.self_attn.{name}"), l);
        }
        put(
            &mut out,
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight.val(),
        );
        let m = &layer.mlp;
        for (name, l) in [
            ("gate_proj", &m.gate_proj),
            ("up_proj", &m.up_proj),
            ("down_proj", &m.down_proj),
        ] {
            put_linear(&mut out, format!("{p}.mlp.{name}"), l);
        }
    }
    put(
        &mut out,
        "model.norm.weight".into(),
        model.norm.weight.val(),
    );
    if let Some(head) = &model.lm_head {
        put_linear(&mut out, "lm_head".into(), head);
    }
    out
}

/// Writes `model` into `dir` as `model.safetensors` plus `config.json` (the original config
/// with its dtype updated), so transformers loads it with `from_pretrained`. Refuses to write
/// non-finite weights. Each file is written to a temporary name and renamed into place.
pub fn save_decoder<B: Backend>(
    model: &Decoder<B>,
    config: &HfConfig,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let weights_path = dir.join(SINGLE_FILE);
    let named = named_weights(model);
    let mut encoded = Vec::with_capacity(named.len());
    for (name, shape, values) in &named {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                path: weights_path,
                name: name.clone(),
            });
        }
        let (dt, bytes) = dtype.encode(values);
        encoded.push((name.clone(), dt, shape.clone(), bytes));
    }
    let views = encoded
        .iter()
        .map(|(name, dt, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::Safetensors {
                    path: weights_path.clone(),
                    detail: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let bytes = safetensors::serialize(views, metadata).map_err(|e| ModelError::Safetensors {
        path: weights_path.clone(),
        detail: e.to_string(),
    })?;
    write_atomic(&weights_path, &bytes)?;

    let mut raw = config.raw.clone();
    let key = if raw.contains_key("torch_dtype") {
        "torch_dtype"
    } else {
        "dtype"
    };
    raw.insert(key.into(), dtype.torch_name().into());
    let text = serde_json::to_string_pretty(&raw).expect("a JSON map always serializes");
    write_atomic(&dir.join("config.json"), text.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// crash never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}
