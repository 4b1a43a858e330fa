//! Writing a [`Decoder`] back in Hugging Face layout: `model.safetensors` under the original key
//! names plus `config.json`, each through a temporary file and a rename. A classifier is written
//! as transformers' `*ForSequenceClassification` checkpoint: `score.weight`, no LM head.

use std::path::Path;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burnish_peft::{SaveDtype, f32_values, write_atomic, write_safetensors_streamed};

use crate::config::{CLASSIFIER_SUFFIX, HfConfig};
use crate::decoder::Decoder;
use crate::error::{ModelError, Result};
use crate::weights::SINGLE_FILE;

/// Every base weight of `model` under its Hugging Face key name, as `(name, shape, f32 values)`.
/// Adapters are not included; merge them first to save them into the weights.
pub fn named_weights<B: Backend>(model: &Decoder<B>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    lazy_weights(model, false)
        .into_iter()
        .map(|w| {
            let values = w.read().expect("an unmerged weight reads as it is held");
            (w.name, w.shape, values)
        })
        .collect()
}

/// A weight of a model under its Hugging Face key name and shape, its f32 values read (and,
/// for a merged projection, computed) only when asked for: a whole model is written one
/// tensor at a time.
pub struct LazyWeight<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    read: Box<dyn Fn() -> burnish_peft::Result<Vec<f32>> + 'a>,
}

impl<'a> LazyWeight<'a> {
    /// A weight whose values `read` gives.
    pub fn new(
        name: String,
        shape: Vec<usize>,
        read: impl Fn() -> burnish_peft::Result<Vec<f32>> + 'a,
    ) -> Self {
        Self {
            name,
            shape,
            read: Box::new(read),
        }
    }

    /// The values, in f32.
    pub fn read(&self) -> burnish_peft::Result<Vec<f32>> {
        (self.read)()
    }

    /// The values, refused (naming the weight and the file `path` it was going to) unless all
    /// are finite: what may be written as weights.
    pub fn read_finite(&self, path: &Path) -> Result<Vec<f32>> {
        let values = self.read()?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                path: path.to_path_buf(),
                name: self.name.clone(),
            });
        }
        Ok(values)
    }
}

/// Every base weight of `model`, sorted by name, to be read one at a time; with `merged`, each
/// projection with an unmerged adapter reads as its merged weight (`W + s·B·A`, DoRA's rows
/// scaled), as [`Decoder::merge_and_unload`] would leave it.
pub fn lazy_weights<B: Backend>(model: &Decoder<B>, merged: bool) -> Vec<LazyWeight<'_>> {
    fn plain<'a, B: Backend, const D: usize>(name: String, t: Tensor<B, D>) -> LazyWeight<'a> {
        let shape = t.dims().to_vec();
        LazyWeight::new(name, shape, move || Ok(f32_values(t.clone())))
    }
    let mut out = vec![plain(
        "model.embed_tokens.weight".into(),
        model.embed_tokens.val(),
    )];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push(plain(
            format!("{p}.input_layernorm.weight"),
            layer.input_layernorm.weight.val(),
        ));
        out.push(plain(
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight.val(),
        ));
        let attention = &layer.self_attn;
        for (name, norm) in [("q_norm", &attention.q_norm), ("k_norm", &attention.k_norm)] {
            if let Some(norm) = norm {
                out.push(plain(
                    format!("{p}.self_attn.{name}.weight"),
                    norm.weight.val(),
                ));
            }
        }
    }
    out.push(plain("model.norm.weight".into(), model.norm.weight.val()));
    if let Some(score) = &model.score {
        out.push(plain("score.weight".into(), score.val()));
    }
    for (name, linear) in model.linears() {
        let weight = linear.weight.val();
        let shape = weight.dims().to_vec();
        let key = format!("{name}.weight");
        if let Some(bias) = &linear.bias {
            out.push(plain(format!("{name}.bias"), bias.val()));
        }
        let read = move || match merged {
            true => Ok(f32_values(
                linear
                    .merged_weight(&name)?
                    .unwrap_or_else(|| weight.clone()),
            )),
            false => Ok(f32_values(weight.clone())),
        };
        out.push(LazyWeight::new(key, shape, read));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Turns a causal LM's `config.json` into its sequence classifier's: the architecture renamed
/// (`LlamaForCausalLM` → `LlamaForSequenceClassification`), `labels` labels, and the pad token
/// the scores are read before.
fn classifier_config(
    raw: &mut serde_json::Map<String, serde_json::Value>,
    labels: usize,
    pad_token_id: Option<u32>,
) {
    use serde_json::{Value, json};
    // The family from the architecture the config names, else from its model type
    // (`qwen2` → `Qwen2`), so that transformers and burnish load a classifier back.
    let named = match raw.get("architectures") {
        Some(Value::Array(names)) => names.first().and_then(Value::as_str).map(String::from),
        _ => None,
    };
    let family = match named {
        Some(name) => name
            .find("For")
            .map_or(name.clone(), |at| name[..at].to_string()),
        None => {
            let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
            let mut chars = model_type.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default()
        }
    };
    raw.insert(
        "architectures".into(),
        json!([format!("{family}{CLASSIFIER_SUFFIX}")]),
    );
    let names: Vec<String> = (0..labels).map(|i| format!("LABEL_{i}")).collect();
    let id2label: serde_json::Map<String, Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), json!(n)))
        .collect();
    let label2id: serde_json::Map<String, Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), json!(i)))
        .collect();
    raw.insert("id2label".into(), Value::Object(id2label));
    raw.insert("label2id".into(), Value::Object(label2id));
    raw.remove("num_labels");
    if let Some(pad) = pad_token_id {
        raw.insert("pad_token_id".into(), json!(pad));
    }
}

/// Writes `model` into `dir` as `model.safetensors` plus `config.json` (the original config
/// with its dtype updated), so transformers loads it with `from_pretrained`. An adapter still
/// attached is folded into its projection as that tensor is written (as
/// [`Decoder::merge_and_unload`] would), and the weights are written one at a time, so no
/// second copy of the model is held. Refuses to write non-finite weights. Each file is written
/// to a temporary name and renamed into place.
pub fn save_decoder<B: Backend>(
    model: &Decoder<B>,
    config: &HfConfig,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let weights_path = dir.join(SINGLE_FILE);
    let weights = lazy_weights(model, true);
    let names: Vec<(String, Vec<usize>)> = weights
        .iter()
        .map(|w| (w.name.clone(), w.shape.clone()))
        .collect();
    let read = |i: usize| weights[i].read_finite(&weights_path);
    write_safetensors_streamed(&weights_path, &names, dtype, read)
        .map_err(|e| e.into_error(|e| ModelError::io(&weights_path, e)))?;

    let mut raw = config.raw.clone();
    let key = if raw.contains_key("torch_dtype") {
        "torch_dtype"
    } else {
        "dtype"
    };
    raw.insert(key.into(), dtype.torch_name().into());
    // The weights are written in floats, whatever precision they were read or held in.
    raw.remove("quantization_config");
    if let Some(labels) = model.config.classifier_labels {
        classifier_config(&mut raw, labels, model.config.pad_token_id);
    }
    let text = serde_json::to_string_pretty(&raw).expect("a JSON map always serializes");
    let config_path = dir.join("config.json");
    write_atomic(&config_path, text.as_bytes()).map_err(|e| ModelError::io(&config_path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A classifier's config names its architecture even when the causal LM's named none.
    #[test]
    fn a_classifier_config_names_its_architecture_labels_and_pad() {
        let mut raw =
            json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_labels": 2})
                .as_object()
                .cloned()
                .unwrap();
        classifier_config(&mut raw, 1, Some(7));
        assert_eq!(
            raw["architectures"],
            json!(["Qwen2ForSequenceClassification"])
        );
        assert_eq!(raw["id2label"], json!({"0": "LABEL_0"}));
        assert_eq!(raw["label2id"], json!({"LABEL_0": 0}));
        assert_eq!(raw["pad_token_id"], json!(7));
        assert!(!raw.contains_key("num_labels"));

        let mut raw = json!({"model_type": "llama"}).as_object().cloned().unwrap();
        classifier_config(&mut raw, 1, None);
        assert_eq!(
            raw["architectures"],
            json!(["LlamaForSequenceClassification"])
        );
    }
}
