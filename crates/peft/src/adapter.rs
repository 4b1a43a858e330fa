//! Attaching LoRA adapters to a model's named linear layers, and PEFT's on-disk adapter format:
//! `adapter_config.json` plus `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`, and
//! for DoRA `base_model.model.<module>.lora_magnitude_vector` `[out]`; a sequence classifier's
//! head is saved whole as `base_model.model.score.weight` (PEFT's `modules_to_save`).
//! The model is seen only as a list of `(module name, &mut AdaptableLinear)`.

use std::collections::BTreeSet;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::SafeTensors;

use crate::config::{CLASSIFIER_HEADS, LoraConfig, Task};
use crate::error::{PeftError, Result};
use crate::linear::AdaptableLinear;
use crate::lora::Lora;
use crate::target::{Selected, resolved_target_names, select_targets};
use crate::tensor_io::{
    SaveDtype, decode_f32, f32_values, first_non_finite, serialize, write_atomic_together,
};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A model's linear layers by module name, as the model crate lists them.
pub type NamedLinears<'a, B> = Vec<(String, &'a mut AdaptableLinear<B>)>;

fn key(module: &str, matrix: &str) -> String {
    format!("base_model.model.{module}.{matrix}.weight")
}

/// Where PEFT keeps a module saved whole.
fn whole_key(module: &str) -> String {
    format!("base_model.model.{module}.weight")
}

/// Where PEFT keeps a DoRA adapter's magnitude.
fn magnitude_key(module: &str) -> String {
    format!("base_model.model.{module}.lora_magnitude_vector")
}

/// A module saved whole beside the adapters (PEFT's `modules_to_save`): a sequence classifier's
/// head, under its module name (`score`).
#[derive(Debug, Clone)]
pub struct WholeModule<B: Backend> {
    pub name: String,
    /// `[out, in]`
    pub weight: Tensor<B, 2>,
}

/// A per-module seed, so adding a module does not shift the others' initial values.
fn module_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Attaches fresh adapters (B = 0, so outputs are unchanged) to the modules `config` targets,
/// freezing their base weights; a DoRA adapter's magnitude starts as its base weight's row norms,
/// as PEFT's does. Returns the modules chosen.
pub fn attach_lora<B: Backend>(
    linears: &mut NamedLinears<'_, B>,
    config: &LoraConfig,
    seed: u64,
) -> Result<Vec<Selected>> {
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let selected = select_targets(&names, config)?;
    for s in &selected {
        let (_, layer) = linears
            .iter_mut()
            .find(|(n, _)| *n == s.name)
            .expect("selected from these names");
        let device = layer.weight.device();
        let lora = Lora::init(
            [layer.d_out(), layer.d_in()],
            s.r,
            config.scale(s.r, s.alpha),
            config.lora_dropout,
            config.init,
            module_seed(seed, &s.name),
            &device,
        );
        let lora = if config.use_dora {
            // Through the host, so the magnitude is a parameter of its own, not a result.
            let norms = lora.row_norms(layer.weight.val()).into_data();
            lora.with_magnitude(Tensor::from_data(norms, &device))
        } else {
            lora
        };
        layer.attach(lora);
    }
    Ok(selected)
}

/// Number of trainable adapter values: `Σ r · (in + out)` over adapted modules, plus `out` for
/// each DoRA magnitude.
pub fn trainable_parameters<B: Backend>(linears: &[(String, &AdaptableLinear<B>)]) -> usize {
    linears
        .iter()
        .filter_map(|(_, l)| {
            l.lora.as_ref().map(|lora| {
                let magnitude = if lora.magnitude.is_some() {
                    l.d_out()
                } else {
                    0
                };
                lora.rank() * (l.d_in() + l.d_out()) + magnitude
            })
        })
        .sum()
}

/// Writes the adapters of `linears`, and the modules saved `whole`, in PEFT's format into `dir`
/// (created if needed); both files go through temporary names before either is renamed, and
/// non-finite weights are refused.
pub fn save_adapter<B: Backend>(
    dir: &Path,
    config: &LoraConfig,
    linears: &[(String, &AdaptableLinear<B>)],
    whole: &[WholeModule<B>],
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PeftError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tensors = Vec::new();
    let mut selected = Vec::new();
    for (name, layer) in linears {
        let Some(lora) = &layer.lora else { continue };
        for (matrix, t) in [("lora_A", lora.lora_a.val()), ("lora_B", lora.lora_b.val())] {
            tensors.push((key(name, matrix), t.dims().to_vec(), f32_values(t)));
        }
        if let Some(magnitude) = &lora.magnitude {
            let m = magnitude.val();
            tensors.push((magnitude_key(name), m.dims().to_vec(), f32_values(m)));
        }
        selected.push(Selected {
            name: name.clone(),
            r: lora.rank(),
            alpha: config.lora_alpha,
        });
    }
    if selected.is_empty() {
        return Err(PeftError::Merge("the model has no adapter to save".into()));
    }
    for module in whole {
        let w = module.weight.clone();
        tensors.push((whole_key(&module.name), w.dims().to_vec(), f32_values(w)));
    }
    let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
    if let Some(name) = first_non_finite(&tensors) {
        return Err(PeftError::NonFiniteTensor {
            path: weights_path,
            name: name.to_string(),
        });
    }
    let bytes = serialize(&tensors, SaveDtype::F32).map_err(|e| PeftError::Safetensors {
        path: weights_path.clone(),
        detail: e.to_string(),
    })?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let json = config.to_json(&resolved_target_names(&selected));
    let text = serde_json::to_string_pretty(&json).expect("a JSON value always serializes");
    write_atomic_together(&[(&weights_path, &bytes), (&config_path, text.as_bytes())])
        .map_err(|(path, source)| PeftError::Io { path, source })
}

/// Reads a PEFT-format adapter from `dir` (written by PEFT or by burnish) and attaches it to the
/// modules its config targets; returns its config and the modules it saved whole (a sequence
/// classifier's head), for the model to take. Every tensor in the file must be used and have the
/// right shape.
pub fn load_adapter<B: Backend>(
    dir: &Path,
    linears: &mut NamedLinears<'_, B>,
) -> Result<(LoraConfig, Vec<WholeModule<B>>)> {
    let config = LoraConfig::from_file(&dir.join(ADAPTER_CONFIG_FILE))?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| PeftError::Safetensors {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    let names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let selected = select_targets(&names, &config)?;

    let mut used = BTreeSet::new();
    let mut loras = Vec::with_capacity(selected.len());
    for s in &selected {
        let (_, layer) = linears
            .iter()
            .find(|(n, _)| *n == s.name)
            .expect("selected from these names");
        let device = layer.weight.device();
        let mut read = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            let view = file.tensor(&name).map_err(|_| PeftError::MissingTensor {
                path: path.clone(),
                name: name.clone(),
            })?;
            if view.shape() != shape {
                return Err(PeftError::ShapeMismatch {
                    path: path.clone(),
                    name,
                    expected: shape.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
            let values = decode_f32(&view).map_err(|dtype| PeftError::UnsupportedDtype {
                path: path.clone(),
                name: name.clone(),
                dtype: format!("{dtype:?}"),
            })?;
            used.insert(name);
            Ok(values)
        };
        let matrix = |values: Vec<f32>, shape: [usize; 2]| {
            Tensor::<B, 2>::from_data(TensorData::new(values, shape), &device)
        };
        let (a_shape, b_shape) = ([s.r, layer.d_in()], [layer.d_out(), s.r]);
        let a = matrix(read(key(&s.name, "lora_A"), &a_shape)?, a_shape);
        let b = matrix(read(key(&s.name, "lora_B"), &b_shape)?, b_shape);
        let lora = Lora::new(a, b, config.scale(s.r, s.alpha), config.lora_dropout);
        loras.push(if config.use_dora {
            let out = layer.d_out();
            let m = read(magnitude_key(&s.name), &[out])?;
            lora.with_magnitude(Tensor::from_data(TensorData::new(m, [out]), &device))
        } else {
            lora
        });
    }
    let mut names = file.names();
    names.sort_unstable();
    let mut whole = Vec::new();
    for name in names.into_iter().filter(|n| !used.contains(*n)) {
        let head = CLASSIFIER_HEADS
            .into_iter()
            .find(|h| *name == whole_key(h))
            .filter(|_| config.task == Task::SequenceClassification);
        let view = file.tensor(name).expect("a listed tensor");
        let (Some(head), [out, d_in]) = (head, view.shape()) else {
            return Err(PeftError::UnexpectedTensor {
                path,
                name: name.to_string(),
            });
        };
        let values = decode_f32(&view).map_err(|dtype| PeftError::UnsupportedDtype {
            path: path.clone(),
            name: name.to_string(),
            dtype: format!("{dtype:?}"),
        })?;
        let device = linears
            .first()
            .map(|(_, l)| l.weight.device())
            .unwrap_or_default();
        whole.push(WholeModule {
            name: head.to_string(),
            weight: Tensor::from_data(TensorData::new(values, [*out, *d_in]), &device),
        });
    }
    for (s, lora) in selected.iter().zip(loras) {
        let (_, layer) = linears
            .iter_mut()
            .find(|(n, _)| *n == s.name)
            .expect("selected from these names");
        layer.attach(lora);
    }
    Ok((config, whole))
}
