//! Merging several fine-tunes of one base model into one model: each input (a full model of the
//! same architecture, or the base with a LoRA adapter folded in) becomes a task vector
//! `input - base` per weight tensor, and the tensors are combined with one of
//! `burnish_peft::merge_methods`.

use std::collections::HashMap;

use burn::tensor::TensorData;
use burnish_peft::merge_methods::{
    SignMethod, dare_linear, dare_masks, dare_ties, linear, slerp, task_arithmetic, ties,
};

use crate::error::{ModelError, Result};
use crate::weights::TensorSource;

/// Weights as `(HF key, shape, f32 values)`, as [`crate::named_weights`] lists them.
pub type NamedWeights = Vec<(String, Vec<usize>, Vec<f32>)>;

/// How inputs are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeMethod {
    /// Weighted average of the whole weights: `Σ wᵢ·mᵢ / Σ wᵢ`.
    Linear,
    /// `base + Σ wᵢ·(mᵢ - base)`.
    TaskArithmetic,
    /// TIES on the task vectors (trim to `density`, elect sign, disjoint mean).
    Ties,
    /// DARE: seeded random drop to `density` with rescale, then task arithmetic.
    DareLinear,
    /// DARE's drop, then TIES' sign election and disjoint mean.
    DareTies,
    /// Spherical interpolation between exactly two inputs at `t`.
    Slerp,
}

/// Settings of a merge.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeOptions {
    pub method: MergeMethod,
    /// Fraction of each task vector kept by TIES and DARE.
    pub density: f64,
    pub sign: SignMethod,
    /// Seeds DARE's drop masks (one stream per tensor).
    pub seed: u64,
    /// SLERP's interpolation point: 0 is the first input, 1 the second.
    pub t: f32,
}

fn tensor_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0x9e37_79b9_7f4a_7c15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Merges `inputs` (each with its weight) over `base`; all must hold the same tensors.
pub fn merge_weights(
    base: &NamedWeights,
    inputs: &[(NamedWeights, f32)],
    options: &MergeOptions,
) -> Result<NamedWeights> {
    let fail = |m: String| ModelError::Input(format!("merge: {m}"));
    if inputs.is_empty() {
        return Err(fail("no inputs".into()));
    }
    if options.method == MergeMethod::Slerp && inputs.len() != 2 {
        return Err(fail(format!(
            "slerp merges exactly two inputs, not {}",
            inputs.len()
        )));
    }
    if options.method == MergeMethod::Slerp && !(0.0..=1.0).contains(&options.t) {
        return Err(fail(format!("slerp t = {} must be in [0, 1]", options.t)));
    }
    let weights: Vec<f32> = inputs.iter().map(|(_, w)| *w).collect();
    // Per input: tensor name -> its index in that input's list.
    let index: Vec<HashMap<&str, usize>> = inputs
        .iter()
        .map(|(named, _)| {
            named
                .iter()
                .enumerate()
                .map(|(i, (n, _, _))| (n.as_str(), i))
                .collect()
        })
        .collect();

    let mut out = Vec::with_capacity(base.len());
    for (name, shape, base_values) in base {
        let mut models: Vec<&[f32]> = Vec::with_capacity(inputs.len());
        for (i, ((named, _), lookup)) in inputs.iter().zip(&index).enumerate() {
            let Some(&at) = lookup.get(name.as_str()) else {
                return Err(fail(format!("input {} has no tensor `{name}`", i + 1)));
            };
            let (_, s, v) = &named[at];
            if s != shape {
                return Err(fail(format!(
                    "input {} has `{name}` of shape {s:?}, the base {shape:?}",
                    i + 1
                )));
            }
            models.push(v);
        }
        let task =
            |m: &[f32]| -> Vec<f32> { m.iter().zip(base_values).map(|(a, b)| a - b).collect() };
        let add_base =
            |tv: Vec<f32>| -> Vec<f32> { tv.iter().zip(base_values).map(|(t, b)| t + b).collect() };
        let tasks: Vec<Vec<f32>> = models.iter().map(|m| task(m)).collect();
        let tasks: Vec<&[f32]> = tasks.iter().map(Vec::as_slice).collect();
        let math = |e: burnish_peft::PeftError| fail(format!("`{name}`: {e}"));
        let merged = match options.method {
            MergeMethod::Linear => linear(&models, &weights).map_err(math)?,
            MergeMethod::Slerp => slerp(options.t, models[0], models[1]).map_err(math)?,
            MergeMethod::TaskArithmetic => {
                add_base(task_arithmetic(&tasks, &weights).map_err(math)?)
            }
            MergeMethod::Ties => {
                add_base(ties(&tasks, &weights, options.density, options.sign).map_err(math)?)
            }
            MergeMethod::DareLinear => {
                let masks = dare_masks(&tasks, options.density, tensor_seed(options.seed, name));
                add_base(dare_linear(&tasks, &weights, options.density, &masks).map_err(math)?)
            }
            MergeMethod::DareTies => {
                let masks = dare_masks(&tasks, options.density, tensor_seed(options.seed, name));
                add_base(
                    dare_ties(&tasks, &weights, options.density, options.sign, &masks)
                        .map_err(math)?,
                )
            }
        };
        if merged.iter().any(|v| !v.is_finite()) {
            return Err(fail(format!(
                "`{name}` would hold non-finite values; nothing was written"
            )));
        }
        out.push((name.clone(), shape.clone(), merged));
    }
    Ok(out)
}

/// Named weights in memory, as a source to build a decoder from.
pub struct InMemoryWeights(HashMap<String, (Vec<usize>, Vec<f32>)>);

impl From<NamedWeights> for InMemoryWeights {
    fn from(named: NamedWeights) -> Self {
        Self(named.into_iter().map(|(n, s, v)| (n, (s, v))).collect())
    }
}

impl TensorSource for InMemoryWeights {
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn read(&self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let (s, v) = self.0.get(name).ok_or_else(|| ModelError::MissingTensor {
            path: "merged weights".into(),
            name: name.into(),
        })?;
        if s != shape {
            return Err(ModelError::ShapeMismatch {
                path: "merged weights".into(),
                name: name.into(),
                expected: shape.to_vec(),
                found: s.clone(),
            });
        }
        Ok(TensorData::new(v.clone(), s.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(values: &[f32]) -> NamedWeights {
        vec![("w".into(), vec![values.len()], values.to_vec())]
    }

    fn options(method: MergeMethod) -> MergeOptions {
        MergeOptions {
            method,
            density: 1.0,
            sign: SignMethod::Total,
            seed: 0,
            t: 0.5,
        }
    }

    #[test]
    fn task_arithmetic_adds_weighted_differences_to_the_base() {
        let base = named(&[1.0, 1.0]);
        let inputs = [(named(&[2.0, 1.0]), 1.0), (named(&[1.0, 3.0]), 0.5)];
        let out = merge_weights(&base, &inputs, &options(MergeMethod::TaskArithmetic)).unwrap();
        assert_eq!(out[0].2, vec![2.0, 2.0]);
    }

    #[test]
    fn mismatched_inputs_are_errors_naming_the_tensor() {
        let base = named(&[1.0, 1.0]);
        let inputs = [(named(&[2.0]), 1.0)];
        let err = merge_weights(&base, &inputs, &options(MergeMethod::Linear)).unwrap_err();
        assert!(err.to_string().contains("`w`"), "{err}");
        let err = merge_weights(
            &base,
            &[(named(&[2.0, 1.0]), 1.0)],
            &options(MergeMethod::Slerp),
        )
        .unwrap_err();
        assert!(err.to_string().contains("exactly two"), "{err}");
    }
}
