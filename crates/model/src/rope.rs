//! Rotary position embeddings in Hugging Face's `rotate_half` convention (the first and second
//! halves of each head are the two coordinates of a pair), with the `linear` and `llama3`
//! frequency scalings. burn's own `RotaryEncoding` pairs interleaved coordinates, which would not
//! line up with HF weights, so this module owns its own few lines.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde_json::Value;

/// How the rotary frequencies are rescaled for longer contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling of low and medium frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Reads `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5). Returns a
    /// message naming the problem for types and fields we do not implement.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |field: &str| {
            v.get(field)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("rope type `{kind}` needs a numeric `{field}`"))
        };
        match kind {
            "default" => Ok(Self::None),
            "linear" => Ok(Self::Linear {
                factor: number("factor")?,
            }),
            "llama3" => {
                let s = Self::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: number("original_max_position_embeddings")?,
                };
                if let Self::Llama3 {
                    low_freq_factor,
                    high_freq_factor,
                    ..
                } = s
                    && high_freq_factor <= low_freq_factor
                {
                    return Err("llama3 rope needs high_freq_factor > low_freq_factor".into());
                }
                Ok(s)
            }
            other => Err(format!(
                "rope type `{other}`; supported: default, linear, llama3"
            )),
        }
    }
}

/// The inverse frequencies of a head of size `head_dim`, computed in f32 like transformers.
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let plain = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32));
    match *scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_len,
        } => {
            let (factor, low, high, old_len) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                old_len as f32,
            );
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Precomputed inverse frequencies; produces the cos/sin tables for any run of positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        Self {
            inv_freq: inverse_frequencies(head_dim, theta, scaling),
        }
    }

    /// cos and sin for positions `start..start + len`, shared by every row.
    ///
    /// # Shapes
    /// - output: two `[1, 1, len, head_dim]` tensors (each half repeated, as HF's
    ///   `cat(freqs, freqs)`)
    pub fn tables<B: Backend>(
        &self,
        start: usize,
        len: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let positions: Vec<usize> = (start..start + len).collect();
        self.tables_at(&positions, 1, device)
    }

    /// cos and sin for explicit per-row positions (`positions` is `rows × seq`, row-major), as
    /// packed sequences need: positions restart at 0 for every document.
    ///
    /// # Shapes
    /// - output: two `[rows, 1, seq, head_dim]` tensors
    pub fn tables_at<B: Backend>(
        &self,
        positions: &[usize],
        rows: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half * 2);
        let mut sin = Vec::with_capacity(positions.len() * half * 2);
        for &pos in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let shape = [rows, 1, positions.len() / rows.max(1), half * 2];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// Rotates `x` by the given tables: `x·cos + rotate_half(x)·sin`.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[1 or batch, 1, seq, head_dim]`
/// - output: `[batch, heads, seq, head_dim]`
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [_, _, _, head_dim] = x.dims();
    let half = head_dim / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32.0,
        };
        let plain = inverse_frequencies(16, 10_000.0, &RopeScaling::None);
        let scaled = inverse_frequencies(16, 10_000.0, &scaling);
        // Highest frequency: wavelength 2π < 32/4, untouched.
        assert_eq!(plain[0], scaled[0]);
        // Lowest frequency: wavelength far above 32, divided by the factor.
        assert!((scaled[7] - plain[7] / 8.0).abs() < 1e-12);
        // Something in between is interpolated strictly between the two.
        let mid = (0..8).find(|&i| {
            let w = 2.0 * std::f32::consts::PI / plain[i];
            (8.0..=32.0).contains(&w)
        });
        let i = mid.expect("a medium frequency exists for this shape");
        assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0);
    }

    #[test]
    fn unknown_rope_type_is_refused_by_name() {
        let v: Value = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
        let err = RopeScaling::from_json(&v).unwrap_err();
        assert!(err.contains("dynamic"), "{err}");
    }
}
