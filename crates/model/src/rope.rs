//! Rotary position embeddings in Hugging Face's `rotate_half` convention (the first and second
//! halves of each head are the two coordinates of a pair), with the `linear` and `llama3`
//! frequency scalings. burn's own `RotaryEncoding` pairs interleaved coordinates, which would not
//! line up with HF weights, so this module owns its own few lines.

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorData};
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

/// Precomputed inverse frequencies; produces the rotations for any run of positions.
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

    /// The rotations of `heads` query heads and `kv_heads` key heads at positions
    /// `positions`, which are `rows × seq` (row-major) or, for `rows = 1`, shared by every row.
    /// Packed sequences pass explicit positions that restart at 0 for every document.
    pub fn rotations<B: Backend>(
        &self,
        positions: &[usize],
        rows: usize,
        [heads, kv_heads]: [usize; 2],
        device: &B::Device,
    ) -> Rotations<B> {
        let queries = self.rotation(positions, rows, heads, device);
        let keys = if kv_heads == heads {
            queries.clone()
        } else {
            self.rotation(positions, rows, kv_heads, device)
        };
        Rotations { queries, keys }
    }

    fn rotation<B: Backend>(
        &self,
        positions: &[usize],
        rows: usize,
        heads: usize,
        device: &B::Device,
    ) -> Rotation<B> {
        let half = self.inv_freq.len();
        let head_dim = half * 2;
        let len = positions.len() * heads * head_dim;
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        for &pos in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| pos as f32 * f).collect();
            // HF's `cat(freqs, freqs)`: each half of a head sees the same angles.
            let head_cos: Vec<f32> = angles.iter().chain(&angles).map(|a| a.cos()).collect();
            let head_sin: Vec<f32> = angles.iter().chain(&angles).map(|a| a.sin()).collect();
            for _ in 0..heads {
                cos.extend_from_slice(&head_cos);
                sin.extend_from_slice(&head_sin);
            }
        }
        let shape = [rows, len / rows.max(1)];
        // x · half_turn = rotate_half(x) = [-x₂, x₁]: -1 at (j + half, j), 1 at (j, j + half).
        let mut half_turn = vec![0.0f32; head_dim * head_dim];
        for j in 0..half {
            half_turn[(j + half) * head_dim + j] = -1.0;
            half_turn[j * head_dim + j + half] = 1.0;
        }
        Rotation {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            half_turn: Tensor::from_data(TensorData::new(half_turn, [head_dim, head_dim]), device),
        }
    }
}

/// The rotations of one forward pass, shared by every layer.
#[derive(Debug, Clone)]
pub struct Rotations<B: Backend> {
    pub queries: Rotation<B>,
    pub keys: Rotation<B>,
}

/// cos and sin of a run of positions laid out like the projection output they rotate, so the
/// rotation is element-wise over contiguous rows (one table row shared by every batch row, or
/// one per row), and `rotate_half` as a product with a fixed signed permutation.
#[derive(Debug, Clone)]
pub struct Rotation<B: Backend> {
    /// `[1 or batch, seq · heads · head_dim]`
    cos: Tensor<B, 2>,
    /// `[1 or batch, seq · heads · head_dim]`
    sin: Tensor<B, 2>,
    /// `[head_dim, head_dim]`
    half_turn: Tensor<B, 2>,
}

impl<B: Backend> Rotations<B> {
    /// The same rotations in `dtype` (the tables are built in f32; transformers casts them to
    /// the activations' precision too).
    pub fn cast(self, dtype: FloatDType) -> Self {
        Self {
            queries: self.queries.cast(dtype),
            keys: self.keys.cast(dtype),
        }
    }
}

impl<B: Backend> Rotation<B> {
    fn cast(self, dtype: FloatDType) -> Self {
        Self {
            cos: self.cos.cast(dtype),
            sin: self.sin.cast(dtype),
            // Entries of 0 and ±1: exact in any precision.
            half_turn: self.half_turn.cast(dtype),
        }
    }

    /// Rotates `x` in HF's convention: `x·cos + rotate_half(x)·sin`, `rotate_half` as the
    /// product with the half-turn matrix (through cuBLAS where the CUDA route takes it: burn's
    /// CUDA matmul rounds f32 operands to TF32, losing precision even on this product of ±1
    /// entries).
    ///
    /// # Shapes
    /// - x, output: `[batch, seq, heads, head_dim]`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [batch, seq, heads, head_dim] = x.dims();
        let rows = x.clone().reshape([batch * seq * heads, head_dim]);
        let rotated = burnish_peft::matmul(rows, self.half_turn.clone(), false)
            .reshape([batch, seq * heads * head_dim]);
        let x = x.reshape([batch, seq * heads * head_dim]);
        (x * self.cos.clone() + rotated * self.sin.clone()).reshape([batch, seq, heads, head_dim])
    }
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
