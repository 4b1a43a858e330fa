//! The LoRA adapter of one linear layer: `s · (dropout(x) · Aᵀ) · Bᵀ`, computed factored, with
//! A `[r, in]` and B `[out, r]` as PEFT stores them. The dense `s · B · A` is formed only to merge.
//! A DoRA adapter also holds a magnitude `m` `[out]`; the layer it is attached to rescales each
//! output row of `W + s·B·A` to it (see `AdaptableLinear`), the row norms `‖W + s·B·A‖` coming
//! from factored products too.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::composed_op::{self, ComposedOp};
use crate::config::LoraInit;
use crate::linear::{cast_to, matmul, project, project_low_rank, row_blocks};
use crate::rebrand::on_cpu;

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
    /// DoRA's magnitude of each output row `[out]`; `None` for plain LoRA.
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// DoRA: the squared norms `‖Wᵢ‖²` of the frozen base weight's rows, once the layer has
    /// told them (they never change while the adapter trains).
    #[module(skip)]
    base_row_squares: Option<Vec<f32>>,
}

impl<B: Backend> Lora<B> {
    /// Wraps given matrices (A `[r, in]`, B `[out, r]`).
    pub fn new(lora_a: Tensor<B, 2>, lora_b: Tensor<B, 2>, scale: f64, dropout: f64) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            dropout: DropoutConfig::new(dropout).init(),
            scale,
            magnitude: None,
            base_row_squares: None,
        }
    }

    /// The adapter as DoRA, with the magnitude `m` `[out]` of each output row.
    pub fn with_magnitude(mut self, magnitude: Tensor<B, 1>) -> Self {
        self.magnitude = Some(Param::from_tensor(magnitude));
        self
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
        self.update(self.dropout.forward(x))
    }

    /// `s · (x · Aᵀ) · Bᵀ`, no dropout.
    ///
    /// # Shapes
    /// - input: `[..., in]`
    /// - output: `[..., out]`
    pub fn update<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // In the factors' precision (f32) whatever the input's, the result returned in the
        // input's, as PEFT does.
        let dtype = x.dtype();
        // Scaled at rank width, the narrowest point: `s·((x·A)·B)` up to rounding, for a
        // fraction of the element-wise work of scaling the output.
        let down = factor_product(x, self.lora_a.val());
        let down = down.mul_scalar(self.scale);
        cast_to(factor_product(down, self.lora_b.val()), dtype)
    }

    /// The norm of each output row of `W + s·B·A` for the base `weight` `[out, in]`, in f32 and
    /// without gradient (DoRA treats it as a constant), from factored products:
    /// `‖Wᵢ‖² + 2s·Bᵢ·(W·Aᵀ)ᵢ + s²·Bᵢ·(A·Aᵀ)·Bᵢᵀ`, never the dense `B·A`.
    pub fn row_norms(&self, weight: Tensor<B, 2>) -> Tensor<B, 1> {
        let weight = weight.detach();
        let (a, b) = (
            self.lora_a.val().detach().cast(FloatDType::F32),
            self.lora_b.val().detach().cast(FloatDType::F32),
        );
        let s = self.scale;
        let squares = match &self.base_row_squares {
            Some(values) => {
                let rows = values.len();
                Tensor::from_data(TensorData::new(values.clone(), [rows]), &a.device())
            }
            None => row_squares(weight.clone()),
        };
        // `W·Aᵀ`: a base held in f32 multiplies A directly; one held in bf16 through its own
        // product (`A·Wᵀ`, A's rows as its input), which reads it as it is, where a cast would
        // copy the whole weight (on the CPU, in each case the faster by a step's time).
        let projected = if weight.dtype() == DType::F32 {
            weight.matmul(a.clone().transpose())
        } else {
            project(a.clone(), weight).transpose().cast(FloatDType::F32)
        };
        let cross = (b.clone() * projected).sum_dim(1);
        let gram = a.clone().matmul(a.transpose());
        let quadratic = (b.clone().matmul(gram) * b).sum_dim(1);
        let norms =
            squares.unsqueeze_dim(1) + cross.mul_scalar(2.0 * s) + quadratic.mul_scalar(s * s);
        norms.clamp_min(0.0).sqrt().squeeze_dim(1)
    }

    /// Keeps the row norms of the frozen base `weight` this adapter is attached to, for
    /// [`Lora::row_norms`] (DoRA only: a plain adapter keeps nothing).
    pub(crate) fn remember_base(&mut self, weight: Tensor<B, 2>) {
        if self.magnitude.is_some() {
            let squares = row_squares(weight.detach()).into_data();
            self.base_row_squares = Some(squares.convert::<f32>().into_vec().expect("f32 values"));
        }
    }

    /// [`Lora::forward`] of adapters whose layers read the same input (a layer's query, key and
    /// value projections; its gate and up projections), their A factors multiplying `x` as one
    /// product `x·[A₁; A₂; …]ᵀ`: one product of the summed ranks' width instead of one thin
    /// product each, forward and backward (the input's gradient then needs no sum over the
    /// adapters either). `None`, for one product each, when fewer than two adapters are given,
    /// when any applies dropout here (each draws its own mask over the input), is DoRA (its
    /// layer rescales the sum) or when their factors' dtypes differ.
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
        let dora = loras.iter().any(|lora| lora.magnitude.is_some());
        if loras.len() < 2
            || dropout
            || dora
            || loras.iter().any(|l| l.lora_a.val().dtype() != dtype)
        {
            return None;
        }
        let input_dtype = x.dtype();
        let factors = loras.iter().map(|lora| lora.lora_a.val()).collect();
        let down = factor_product(x, Tensor::cat(factors, 0));
        let mut start = 0;
        let updates = loras.iter().map(|lora| {
            let rank = lora.rank();
            let piece = down.clone().narrow(D - 1, start, rank);
            start += rank;
            let update = factor_product(piece.mul_scalar(lora.scale), lora.lora_b.val());
            cast_to(update, input_dtype)
        });
        Some(updates.collect())
    }

    /// The dense update `s · B · A` `[out, in]`, for merging (DoRA's rescaling is the layer's).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scale)
    }
}

/// `‖Wᵢ‖²` of each row of `weight`, in f32.
fn row_squares<B: Backend>(weight: Tensor<B, 2>) -> Tensor<B, 1> {
    weight
        .cast(FloatDType::F32)
        .powi_scalar(2)
        .sum_dim(1)
        .squeeze_dim(1)
}

/// `x·Fᵀ` for one of an adapter's factors `F` (`A` `[rank, in]`, or `B` `[out, rank]`), in
/// `F`'s precision whatever `x`'s (as PEFT casts its input to the adapter's f32).
///
/// On the CPU, with `x` in `F`'s precision, this is [`project_low_rank`] (the split product and
/// its backward). Elsewhere it is one autodiff node of burn's ops, for two reasons. It keeps `x`
/// as it is for the backward pass: with bf16 activations, casting `x` to f32 first made burn
/// keep an f32 copy of every adapter input beside the bf16 one (the gradients are the same:
/// the f32 copy of a bf16 value is exact). And the factor's gradient `dyᵀ·x` comes out
/// contiguous (summed in row blocks on a GPU, see [`row_blocks`]), where burn's gradient of
/// `x·Fᵀ` is a transposed view that the optimizer's flattening copies: two copies per adapter
/// and step.
///
/// # Shapes
/// - x: `[..., in]` (or `[..., rank]` for `B`)
/// - factor: `[rank, in]` (or `[out, rank]`)
/// - output: `[..., rank]` (or `[..., out]`)
fn factor_product<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    factor: Tensor<B, 2>,
) -> Tensor<B, D> {
    if on_cpu::<B>() && x.dtype() == factor.dtype() {
        return project_low_rank(x, factor);
    }
    let mut dims = x.dims();
    let [to, from] = factor.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = to;
    composed_op::run(FactorProduct, [x.reshape([rows, from]), factor]).reshape(dims)
}

/// [`factor_product`]'s node: `x` `[rows, from]`, the factor `[to, from]`.
#[derive(Debug, Clone)]
struct FactorProduct;

impl ComposedOp<2> for FactorProduct {
    fn forward<I: Backend>(
        &self,
        [x, factor]: [Tensor<I, 2>; 2],
    ) -> (Tensor<I, 2>, Option<Tensor<I, 2>>) {
        (project_low_rank(cast_to(x, factor.dtype()), factor), None)
    }

    fn backward<I: Backend>(
        &self,
        [x, factor]: [Tensor<I, 2>; 2],
        _: Option<Tensor<I, 2>>,
        d_out: Tensor<I, 2>,
        [x_wanted, factor_wanted]: [bool; 2],
    ) -> [Option<Tensor<I, 2>>; 2] {
        let x_dtype = x.dtype();
        let blocks = row_blocks::<I>(x.dims()[0]);
        let d_factor = factor_wanted
            .then(|| factor_gradient(d_out.clone(), cast_to(x, factor.dtype()), blocks));
        let dx = x_wanted.then(|| cast_to(matmul(d_out, factor, false), x_dtype));
        [dx, d_factor]
    }
}

/// `dyᵀ·x`, the gradient of the factor `F` of `y = x·Fᵀ`: one product through cuBLAS where the
/// CUDA route takes it (cuBLAS splits the long inner dimension itself), else summed over the
/// rows in `blocks` blocks (see [`row_blocks`]; `blocks` divides the rows): each block's
/// partial sum one product of a batched product, then their sum.
///
/// # Shapes
/// - d_out: `[rows, to]`
/// - x: `[rows, from]`
/// - output: `[to, from]`
fn factor_gradient<B: Backend>(
    d_out: Tensor<B, 2>,
    x: Tensor<B, 2>,
    blocks: usize,
) -> Tensor<B, 2> {
    let [rows, to] = d_out.dims();
    let from = x.dims()[1];
    #[cfg(feature = "cuda")]
    if let Some(product) = crate::cublas::matmul(&d_out.clone().transpose(), &x, false) {
        return product;
    }
    if blocks == 1 {
        return d_out.transpose().matmul(x);
    }
    let d_out: Tensor<B, 3> = d_out.reshape([blocks, rows / blocks, to]);
    let x: Tensor<B, 3> = x.reshape([blocks, rows / blocks, from]);
    d_out
        .swap_dims(1, 2)
        .matmul(x)
        .sum_dim(0)
        .reshape([to, from])
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
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Distribution, FloatDType, Tolerance};

    /// bf16 activations into an f32 factor: the same values and gradients as casting first
    /// (the f32 copy of a bf16 value is exact), the input's gradient in bf16.
    #[test]
    fn the_factor_product_of_bf16_inputs_equals_casting_first() {
        type AD = Autodiff<Flex>;
        let device = Default::default();
        Flex::seed(&device, 4);
        let x = Tensor::<AD, 3>::random([2, 24, 40], Distribution::Default, &device)
            .cast(FloatDType::BF16)
            .detach();
        let factor = Tensor::<AD, 2>::random([6, 40], Distribution::Default, &device);
        let upstream = Tensor::<AD, 3>::random([2, 24, 6], Distribution::Default, &device);
        let run = |project: &dyn Fn(Tensor<AD, 3>, Tensor<AD, 2>) -> Tensor<AD, 3>| {
            let (x, factor) = (x.clone().require_grad(), factor.clone().require_grad());
            let out = project(x.clone(), factor.clone());
            let grads = (out.clone() * upstream.clone()).sum().backward();
            let dx = x.grad(&grads).unwrap();
            assert_eq!(dx.dtype(), DType::BF16);
            [
                out.into_data(),
                dx.into_data().convert::<f32>(),
                factor.grad(&grads).unwrap().into_data(),
            ]
        };
        let ours = run(&|x, factor| factor_product(x, factor));
        let cast_first = run(&|x, factor| project_low_rank(x.cast(FloatDType::F32), factor));
        for (ours, theirs) in ours.iter().zip(&cast_first) {
            ours.assert_approx_eq::<f32>(theirs, Tolerance::absolute(1e-5));
        }
    }

    /// The node GPUs take for f32 inputs too (run here on the CPU backend's autodiff), for
    /// both factors' shapes: the same values and gradients as burn's product.
    #[test]
    fn the_factor_product_node_equals_burns_product() {
        type AD = Autodiff<Flex>;
        let device = Default::default();
        Flex::seed(&device, 5);
        let random =
            |dims: [usize; 2]| Tensor::<AD, 2>::random(dims, Distribution::Default, &device);
        // A `[rank, in]` on inputs `[rows, in]`, then B `[out, rank]` on `[rows, rank]`.
        for ([rows, from], to) in [([48, 40], 6), ([48, 6], 40)] {
            let (x, factor, upstream) =
                (random([rows, from]), random([to, from]), random([rows, to]));
            let run = |product: &dyn Fn(Tensor<AD, 2>, Tensor<AD, 2>) -> Tensor<AD, 2>| {
                let (x, factor) = (x.clone().require_grad(), factor.clone().require_grad());
                let out = product(x.clone(), factor.clone());
                let grads = (out.clone() * upstream.clone()).sum().backward();
                [
                    out.into_data(),
                    x.grad(&grads).unwrap().into_data(),
                    factor.grad(&grads).unwrap().into_data(),
                ]
            };
            let node = run(&|x, factor| composed_op::run(FactorProduct, [x, factor]));
            let burns = run(&|x, factor| x.matmul(factor.transpose()));
            for (node, burns) in node.iter().zip(&burns) {
                node.assert_approx_eq::<f32>(burns, Tolerance::absolute(1e-5));
            }
        }
    }

    #[test]
    fn the_factor_gradient_in_row_blocks_equals_one_product() {
        let device = Default::default();
        Flex::seed(&device, 6);
        let d_out = Tensor::<Flex, 2>::random([64, 5], Distribution::Default, &device);
        let x = Tensor::<Flex, 2>::random([64, 12], Distribution::Default, &device);
        let whole = factor_gradient(d_out.clone(), x.clone(), 1).into_data();
        factor_gradient(d_out, x, 16)
            .into_data()
            .assert_approx_eq::<f32>(&whole, Tolerance::absolute(1e-5));
    }

    /// On CUDA with the products queued on cubecl's stream (`BURNISH_MATMUL=cublas-async`),
    /// the factor products, forward and backward, take cuBLAS: their values and gradients
    /// against the CPU's, for bf16 inputs into f32 factors of SmolLM2's widths over 8192 rows
    /// (the factor's gradient one product then, not blocks). Run by `side_by_side.sh` with the
    /// other `cublas_stream` checks.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas, and BURNISH_MATMUL=cublas-async"]
    fn cublas_stream_factor_products_equal_the_cpus() {
        use crate::cublas::{CudaMatmul, Ordering, Plain, cuda_matmul, stream_ordering_refused};
        assert_eq!(*cuda_matmul(), CudaMatmul::Cublas(Ordering::Stream));
        type Cuda = Autodiff<Plain>;
        type Cpu = Autodiff<Flex>;
        let cpu_device = Default::default();
        Flex::seed(&cpu_device, 7);
        for ([rows, from], to) in [([8192, 576], 16), ([8192, 16], 576)] {
            let normal = Distribution::Normal(0.0, 1.0);
            let x = Tensor::<Cpu, 2>::random([rows, from], normal, &cpu_device)
                .cast(FloatDType::BF16)
                .detach();
            let factor = Tensor::<Cpu, 2>::random([to, from], normal, &cpu_device);
            let upstream = Tensor::<Cpu, 2>::random([rows, to], normal, &cpu_device);
            let on_cpu = {
                let (x, factor) = (x.clone().require_grad(), factor.clone().require_grad());
                let out = factor_product(x.clone(), factor.clone());
                let grads = (out.clone() * upstream.clone()).sum().backward();
                [
                    out.into_data(),
                    x.grad(&grads).unwrap().into_data().convert::<f32>(),
                    factor.grad(&grads).unwrap().into_data(),
                ]
            };
            let on_cuda = {
                let device = Default::default();
                let moved = |t: &Tensor<Cpu, 2>| {
                    Tensor::<Cuda, 2>::from_data(t.to_data().convert::<f32>(), &device)
                };
                let x = moved(&x).cast(FloatDType::BF16).require_grad();
                let factor = moved(&factor).require_grad();
                let out = factor_product(x.clone(), factor.clone());
                let grads = (out.clone() * moved(&upstream)).sum().backward();
                [
                    out.into_data(),
                    x.grad(&grads).unwrap().into_data().convert::<f32>(),
                    factor.grad(&grads).unwrap().into_data(),
                ]
            };
            // f32 products in a different order of summation; the input's gradient is rounded
            // to bf16 on both sides (one step of bf16 apart at most).
            let tolerances = [
                Tolerance::absolute(1e-3).set_relative(1e-4),
                Tolerance::absolute(1e-2).set_relative(8e-3),
                Tolerance::absolute(1e-2).set_relative(1e-4),
            ];
            for ((cuda, cpu), tolerance) in on_cuda.iter().zip(&on_cpu).zip(tolerances) {
                cuda.assert_approx_eq::<f32>(cpu, tolerance);
            }
        }
        assert_eq!(stream_ordering_refused(), None);
    }

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
