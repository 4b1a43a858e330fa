//! The LoRA adapter of one linear layer: `s · (dropout(x) · Aᵀ) · Bᵀ`, computed factored, with
//! A `[r, in]` and B `[out, r]` as PEFT stores them. The dense `s · B · A` is formed only to merge.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::config::LoraInit;
use crate::linear::{cast_to, project_low_rank};

/// Low-rank update of a linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[r, in]`
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[out, r]`
    pub lora_b: Param<Tensor<B, 2>>,
    /// Applied to the adapter's input while training only.
    pub dropout: Dropout,
    /// `alpha / r` (or `alpha / √r` with rsLoRA).
    #[module(skip)]
    pub scale: f64,
}

impl<B: Backend> Lora<B> {
    /// Wraps given matrices (A `[r, in]`, B `[out, r]`).
    pub fn new(lora_a: Tensor<B, 2>, lora_b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            dropout: DropoutConfig::new(dropout).init(),
            scale,
        }
    }

    /// A fresh adapter for a base weight of shape `[d_out, d_in]`: A drawn from `seed` as `init`
    /// says, B zero, so it adds nothing yet.
    pub fn init(
        [d_out, d_in]: [usize; 2],
        r: usize,
        scale: f64,
        dropout: f64,
        init: LoraInit,
        seed: u64,
        device: &B::Device,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let values: Vec<f32> = match init {
            LoraInit::Kaiming => {
                // kaiming_uniform_(a = √5) on [r, in]: gain √(1/3), bound = gain·√3/√in = 1/√in.
                let bound = 1.0 / (d_in as f32).sqrt();
                (0..r * d_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            }
            LoraInit::Gaussian => {
                let std = 1.0 / r as f32;
                (0..r * d_in)
                    .map(|_| std * standard_normal(&mut rng))
                    .collect()
            }
        };
        let a = Tensor::from_data(TensorData::new(values, [r, d_in]), device);
        let b = Tensor::zeros([d_out, r], device);
        Self::new(a, b, scale, dropout)
    }

    /// Rank of the adapter.
    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[0]
    }

    /// # Shapes
    /// - input: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        // In the factors' precision (f32) whatever the input's, the result returned in the
        // input's, as PEFT does.
        let x = cast_to(self.dropout.forward(x), self.lora_a.val().dtype());
        // Scaled at rank width, the narrowest point: `s·((x·A)·B)` up to rounding, for a
        // fraction of the element-wise work of scaling the output.
        let down = project_low_rank(x, self.lora_a.val()).mul_scalar(self.scale);
        cast_to(project_low_rank(down, self.lora_b.val()), dtype)
    }

    /// [`Lora::forward`] of adapters whose layers read the same input (a layer's query, key and
    /// value projections; its gate and up projections), their A factors multiplying `x` as one
    /// product `x·[A₁; A₂; …]ᵀ`: one product of the summed ranks' width instead of one thin
    /// product each, forward and backward (the input's gradient then needs no sum over the
    /// adapters either). `None`, for one product each, when fewer than two adapters are given,
    /// when any applies dropout here (each draws its own mask over the input) or when their
    /// factors' dtypes differ.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - outputs: `[..., out_i]`, in the order of `loras`
    pub(crate) fn forward_shared<const D: usize>(
        loras: &[&Lora<B>],
        x: Tensor<B, D>,
    ) -> Option<Vec<Tensor<B, D>>> {
        let dtype = loras.first()?.lora_a.val().dtype();
        // Dropout draws only while gradients are tracked, as `Dropout::forward` decides.
        let dropout =
            B::ad_enabled(&x.device()) && loras.iter().any(|lora| lora.dropout.prob > 0.0);
        if loras.len() < 2 || dropout || loras.iter().any(|l| l.lora_a.val().dtype() != dtype) {
            return None;
        }
        let input_dtype = x.dtype();
        let factors = loras.iter().map(|lora| lora.lora_a.val()).collect();
        let down = project_low_rank(cast_to(x, dtype), Tensor::cat(factors, 0));
        let mut start = 0;
        let updates = loras.iter().map(|lora| {
            let rank = lora.rank();
            let piece = down.clone().narrow(D - 1, start, rank);
            start += rank;
            let update = project_low_rank(piece.mul_scalar(lora.scale), lora.lora_b.val());
            cast_to(update, input_dtype)
        });
        Some(updates.collect())
    }

    /// The dense update `s · B · A` `[out, in]`, for merging.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scale)
    }
}

/// One draw from N(0, 1) (Box–Muller).
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn a_values(init: LoraInit, d_in: usize, r: usize) -> Vec<f32> {
        let lora = Lora::<Flex>::init([8, d_in], r, 1.0, 0.0, init, 3, &Default::default());
        assert_eq!(
            lora.lora_b.val().abs().sum().into_scalar(),
            0.0,
            "B starts at zero"
        );
        lora.lora_a.val().into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn kaiming_init_is_uniform_within_one_over_root_fan_in() {
        let values = a_values(LoraInit::Kaiming, 400, 16);
        let bound = 1.0 / 20.0;
        assert!(values.iter().all(|v| v.abs() <= bound));
        // U(-b, b) has standard deviation b/√3.
        let std = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
        assert!((std - bound / 3f32.sqrt()).abs() < 0.002, "std {std}");
    }

    #[test]
    fn gaussian_init_has_std_one_over_rank() {
        let values = a_values(LoraInit::Gaussian, 400, 8);
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        let std =
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32).sqrt();
        assert!(
            mean.abs() < 0.01 && (std - 0.125).abs() < 0.005,
            "mean {mean}, std {std}"
        );
    }
}
