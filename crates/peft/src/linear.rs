//! The adaptable linear layer: a base projection in Hugging Face layout (`weight` `[out, in]`,
//! optional `bias` `[out]`) to which a LoRA adapter attaches. With an adapter attached the base
//! is frozen (no gradient, so no optimizer state); the adapter can be switched off, which turns
//! the same model into its own DPO reference, and merged into the base or unmerged again. With a
//! DoRA adapter the layer computes `m/‖W + s·B·A‖ ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b`, the row norms held
//! constant in the backward pass, exactly as PEFT's DoRA layer does. A frozen base weight can
//! be held as NF4 codes instead (QLoRA; see [`Nf4Weight`]).

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, FloatDType, Tensor, TensorData};

use crate::error::{PeftError, Result};
use crate::lora::Lora;
use crate::nf4::Nf4Weight;
use crate::rebrand::on_cpu;
use crate::tensor_io::f32_values;

/// A linear layer's base weight `[out, in]`, exactly as the checkpoint holds it (so loading and
/// saving need no transposes), or frozen as NF4 codes.
// One per linear layer: the variants' size difference (three tensor handles) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum BaseWeight<B: Backend> {
    Dense(Param<Tensor<B, 2>>),
    Nf4(Nf4Weight<B>),
}

impl<B: Backend> BaseWeight<B> {
    /// A weight `[out, in]` that trains unless frozen later.
    pub fn dense(weight: Tensor<B, 2>) -> Self {
        Self::Dense(Param::from_tensor(weight))
    }

    /// A weight `[out, in]` that never trains.
    pub fn frozen(weight: Tensor<B, 2>) -> Self {
        Self::Dense(Param::from_tensor(weight).set_require_grad(false))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Dense(weight) => weight.shape().dims(),
            Self::Nf4(weight) => weight.dims(),
        }
    }

    pub fn device(&self) -> B::Device {
        match self {
            Self::Dense(weight) => weight.device(),
            Self::Nf4(weight) => weight.absmax.device(),
        }
    }

    /// The weight `[out, in]`: the parameter itself (tracked if it trains), or the NF4 codes
    /// read back in f32.
    pub fn val(&self) -> Tensor<B, 2> {
        match self {
            Self::Dense(weight) => weight.val(),
            Self::Nf4(weight) => weight.dequantize(),
        }
    }

    /// `x·Wᵀ` (see [`project`]); for NF4 codes one node that keeps the codes, not the
    /// dequantized weight, for the backward pass.
    pub fn project<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Dense(weight) => project(x, weight.val()),
            Self::Nf4(weight) => weight.project(x),
        }
    }

    /// Whether the weight is held as NF4 codes.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Self::Nf4(_))
    }
}

/// A linear projection `y = x·Wᵀ + b (+ LoRA)`.
#[derive(Module, Debug)]
pub struct AdaptableLinear<B: Backend> {
    pub weight: BaseWeight<B>,
    /// `[out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub lora: Option<Lora<B>>,
    /// When false the adapter is skipped (the base model alone).
    #[module(skip)]
    pub adapter_enabled: bool,
    /// True while the adapter's update is folded into `weight`.
    #[module(skip)]
    pub merged: bool,
    /// While a DoRA adapter is merged: the factor `m/‖W + s·B·A‖` each output row was scaled
    /// by, to take it back out.
    #[module(skip)]
    merged_dora_scale: Option<Vec<f32>>,
}

impl<B: Backend> AdaptableLinear<B> {
    /// Wraps a weight `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::from_base(BaseWeight::dense(weight), bias)
    }

    /// A projection over `weight` as it is held (dense or NF4 codes), without an adapter.
    pub fn from_base(weight: BaseWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight,
            bias: bias.map(Param::from_tensor),
            lora: None,
            adapter_enabled: true,
            merged: false,
            merged_dora_scale: None,
        }
    }

    /// Input features.
    pub fn d_in(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Attaches `lora` and freezes the base weight and bias.
    pub fn attach(&mut self, mut lora: Lora<B>) {
        if !self.weight.is_quantized() {
            self.weight = BaseWeight::frozen(self.weight.val());
        }
        self.bias = self
            .bias
            .take()
            .map(|b| Param::from_tensor(b.val()).set_require_grad(false));
        lora.remember_base(self.weight.val());
        self.lora = Some(lora);
        self.merged = false;
    }

    /// Holds the base weight in `dtype` (bf16 halves its memory and, on GPUs, runs its products
    /// on the tensor cores) and freezes it; activations, the bias and any adapter stay in their
    /// own precision. Only for inference and adapter training: a weight held this way is never
    /// updated.
    pub fn hold_base_in(&mut self, dtype: FloatDType) {
        if self.weight.is_quantized() {
            return;
        }
        self.weight = BaseWeight::frozen(self.weight.val().cast(dtype));
        if let Some(lora) = &mut self.lora {
            lora.remember_base(self.weight.val());
        }
    }

    /// # Shapes
    /// - input: `[..., in]`
    /// - output: `[..., out]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        match self.active_lora() {
            Some(lora) => match &lora.magnitude {
                Some(magnitude) => self.forward_dora(lora, magnitude.val(), input),
                None => self.forward_base(input.clone()) + lora.forward(input),
            },
            None => self.forward_base(input),
        }
    }

    /// DoRA's output `x·Wᵀ + (m/n - 1) ⊙ x'·Wᵀ + m/n ⊙ s·x'·Aᵀ·Bᵀ + b`, with `n` the row norms
    /// of `W + s·B·A` (a constant) and `x'` the adapter's input. Without dropout `x' = input`,
    /// and the sum is `m/n ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b`; while dropout draws, `x'` is the dropped
    /// input, whose `x'·Wᵀ` is a product of its own.
    fn forward_dora<const D: usize>(
        &self,
        lora: &Lora<B>,
        magnitude: Tensor<B, 1>,
        input: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let projected = self.weight.project(input.clone());
        let dtype = projected.dtype();
        let norms = lora.row_norms(self.weight.val());
        let scale = cast_to((magnitude / norms).unsqueeze::<D>(), dtype);
        let output = if B::ad_enabled(&input.device()) && lora.dropout.prob > 0.0 {
            let dropped = lora.dropout.forward(input);
            let dropped_projected = self.weight.project(dropped.clone());
            let adapted = (dropped_projected.clone() + lora.update(dropped)) * scale;
            projected + adapted - dropped_projected
        } else {
            (projected + lora.update(input)) * scale
        };
        match &self.bias {
            Some(bias) => output + cast_to(bias.val(), dtype).unsqueeze(),
            None => output,
        }
    }

    /// [`AdaptableLinear::forward`] of layers that all read `input` (a layer's query, key and
    /// value projections; its gate and up projections). On GPU backends their adapters' A
    /// factors multiply the input as one product (see `Lora::forward_shared`), for fewer of the
    /// thin products that run slowest there; each layer runs on its own on the CPU, where the
    /// grouped form measured no faster (the slices of the shared product cost about what the
    /// products saved), and wherever grouping cannot be (an adapter missing, off or merged,
    /// dropout).
    ///
    /// # Shapes
    /// - input: `[..., in]`
    /// - outputs: `[..., out_i]`, in the order of `layers`
    pub fn forward_shared<const D: usize, const N: usize>(
        layers: [&Self; N],
        input: Tensor<B, D>,
    ) -> [Tensor<B, D>; N] {
        if on_cpu::<B>() {
            return layers.map(|layer| layer.forward(input.clone()));
        }
        Self::forward_grouped(layers, input)
    }

    /// [`AdaptableLinear::forward_shared`] on any backend.
    fn forward_grouped<const D: usize, const N: usize>(
        layers: [&Self; N],
        input: Tensor<B, D>,
    ) -> [Tensor<B, D>; N] {
        let loras: Option<Vec<&Lora<B>>> = layers.iter().map(|layer| layer.active_lora()).collect();
        let Some(updates) = loras.and_then(|loras| Lora::forward_shared(&loras, input.clone()))
        else {
            return layers.map(|layer| layer.forward(input.clone()));
        };
        let mut updates = updates.into_iter();
        layers.map(|layer| {
            let update = updates.next().expect("one update per layer");
            layer.forward_base(input.clone()) + update
        })
    }

    /// The base projection, bias included (in the activations' precision).
    fn forward_base<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let base = self.weight.project(input);
        match &self.bias {
            Some(bias) => {
                let bias = cast_to(bias.val(), base.dtype());
                base + bias.unsqueeze()
            }
            None => base,
        }
    }

    /// The adapter that takes part in the forward pass: attached, switched on, not merged.
    fn active_lora(&self) -> Option<&Lora<B>> {
        self.lora
            .as_ref()
            .filter(|_| self.adapter_enabled && !self.merged)
    }

    /// The weight `[out, in]` when this layer is nothing more than a frozen matrix: no bias, no
    /// adapter taking part in the forward pass, and no gradient wanted for the weight. What a
    /// caller needs to run the product its own way (a loss computed chunk by chunk).
    pub fn frozen_weight(&self) -> Option<Tensor<B, 2>> {
        let weight = self.weight.val();
        (self.bias.is_none() && self.active_lora().is_none() && !weight.is_require_grad())
            .then_some(weight)
    }

    /// The base weight with the adapter's update `s·B·A` folded in (and for DoRA each row then
    /// scaled to its magnitude), when an unmerged adapter is attached; an error naming `name` if
    /// any merged value would not be finite.
    pub fn merged_weight(&self, name: &str) -> Result<Option<Tensor<B, 2>>> {
        Ok(self
            .merged_weight_and_scale(name)?
            .map(|(weight, _)| weight))
    }

    /// [`AdaptableLinear::merged_weight`] and, for DoRA, the factor each row was scaled by.
    fn merged_weight_and_scale(&self, name: &str) -> Result<Option<MergedWeight<B>>> {
        let Some(lora) = self.lora.as_ref().filter(|_| !self.merged) else {
            return Ok(None);
        };
        let delta = lora.delta_weight();
        let merged = self.weight.val().cast(delta.dtype()) + delta;
        let (merged, scale) = match &lora.magnitude {
            Some(magnitude) => {
                let norms = merged
                    .clone()
                    .powi_scalar(2)
                    .sum_dim(1)
                    .sqrt()
                    .squeeze_dim(1);
                let scale = magnitude.val() / norms;
                (merged * scale.clone().unsqueeze_dim(1), Some(scale))
            }
            None => (merged, None),
        };
        let all_finite: i64 = merged.clone().is_finite().all().int().into_scalar().elem();
        if all_finite == 0 {
            return Err(PeftError::NonFinite {
                module: name.into(),
            });
        }
        Ok(Some((merged, scale)))
    }

    /// Folds the adapter into the base weight (`W + s·B·A`, DoRA's rows scaled); forward then
    /// skips the adapter. Refuses, leaving the layer unchanged, if the result would not be
    /// finite.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        if let Some((weight, scale)) = self.merged_weight_and_scale(name)? {
            self.set_merged_weight(weight);
            self.merged_dora_scale = scale.map(f32_values);
        }
        Ok(())
    }

    /// Installs a weight computed by [`AdaptableLinear::merged_weight`].
    pub fn set_merged_weight(&mut self, weight: Tensor<B, 2>) {
        self.weight = BaseWeight::frozen(weight);
        self.merged = true;
    }

    /// Takes an adapter merged by [`AdaptableLinear::merge`] back out of the base weight.
    pub fn unmerge(&mut self) {
        if let (Some(lora), true) = (&self.lora, self.merged) {
            let delta = lora.delta_weight();
            let mut weight = self.weight.val().cast(delta.dtype());
            if let Some(scale) = self.merged_dora_scale.take() {
                let rows = scale.len();
                let scale =
                    Tensor::<B, 1>::from_data(TensorData::new(scale, [rows]), &delta.device());
                weight = weight / scale.unsqueeze_dim(1);
            }
            self.weight = BaseWeight::frozen(weight - delta);
            self.merged = false;
        }
    }
}

/// A merged weight `[out, in]` and, for DoRA, the factor `[out]` its rows were scaled by.
type MergedWeight<B> = (Tensor<B, 2>, Option<Tensor<B, 1>>);

/// `x` in `dtype`; `x` itself, with no cast in the autodiff graph, when it is already.
pub fn cast_to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// `x·Wᵀ` for a weight stored `[out, in]`, as one 2-D matrix product over all leading
/// positions. The transposed weight stays a strided view that the matmul reads in place: going
/// through a batched (3-D) product instead would copy every weight on every call. A weight held
/// in another precision than `x` (a bf16 base under f32 activations) gets `x` cast to it for
/// the product and the result cast back. On the CUDA backend the product goes through cuBLAS
/// (see the `cublas` module).
///
/// # Shapes
/// - x: `[..., in]`
/// - weight: `[out, in]`
/// - output: `[..., out]`
pub fn project<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>) -> Tensor<B, D> {
    product(x, weight, true, Route::Projection)
}

/// Blocks of rows an adapter factor's gradient is split into on a GPU (see [`row_blocks`]).
const ROW_BLOCKS: usize = 16;
/// Rows from which a factor's gradient is split: fewer leave too few rows per block to pay for
/// the extra sum.
const MIN_SPLIT_ROWS: usize = 4096;

/// [`project`] for an adapter's low-rank factors: on the CPU the split product
/// (`cpu_split_product`); on CUDA cuBLAS where the route queues products on cubecl's stream
/// (host-ordered, these thin products would lose more to the wait than they gain, and its
/// threshold leaves them to burn); burn's matmul elsewhere.
pub(crate) fn project_low_rank<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    product(x, weight, true, Route::LowRank)
}

/// How many blocks of rows the gradient of an adapter's factor over `rows` rows is summed in on
/// backend `B`: one on the CPU and for few rows, [`ROW_BLOCKS`] on a GPU. That gradient,
/// `dyᵀ·x`, is a thin result (`[rank, in]` or `[out, rank]`) summed over every row, which one
/// product computes with a handful of the device's cores each running through all the rows
/// (about 0.5 ms for 8192 rows of SmolLM2's widths on an H100, measured 2026-11-26: 420 of
/// them, a fifth of a training step); in blocks, each block's partial sum is its own product of
/// one batched product, then they are added.
pub(crate) fn row_blocks<B: Backend>(rows: usize) -> usize {
    if on_cpu::<B>() || rows < MIN_SPLIT_ROWS || !rows.is_multiple_of(ROW_BLOCKS) {
        1
    } else {
        ROW_BLOCKS
    }
}

/// `x·W` for a weight stored `[out, in]`: the way back through [`project`] (what a gradient
/// through the projection takes), with the same handling of precision and of CUDA.
///
/// # Shapes
/// - x: `[..., out]`
/// - weight: `[out, in]`
/// - output: `[..., in]`
pub fn unproject<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    product(x, weight, false, Route::Projection)
}

/// Which matmul a product may take on the CPU backend (elsewhere both take [`matmul`]).
#[derive(Clone, Copy)]
enum Route {
    /// The bf16 kernel for a bf16 weight (on CPUs that have one), else the split product
    /// (`cpu_split_product`).
    Projection,
    /// An adapter's thin factor: the split product.
    LowRank,
}

/// `x·Wᵀ` (`transposed`) or `x·W` over all leading positions of `x`.
fn product<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    transposed: bool,
    route: Route,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let [d_out, d_in] = weight.dims();
    let (from, to) = if transposed {
        (d_in, d_out)
    } else {
        (d_out, d_in)
    };
    let rows = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = to;
    let dtype = x.dtype();
    let held: DType = weight.dtype();
    let flat: Tensor<B, 2> = x.reshape([rows, from]);
    let on_the_cpu = match route {
        Route::Projection => crate::cpu_bf16::matmul(&flat, &weight, transposed),
        Route::LowRank => None,
    }
    .or_else(|| crate::cpu_split_product::matmul(&flat, &weight, transposed));
    if let Some(out) = on_the_cpu {
        return out.reshape(dims);
    }
    let out = if held == dtype {
        matmul(flat, weight, transposed)
    } else {
        matmul(flat.cast(held), weight, transposed).cast(dtype)
    };
    out.reshape(dims)
}

/// `x·Wᵀ` (`transposed`) or `x·W` for 2-D operands of one dtype: through cuBLAS where the CUDA
/// route takes the product (see `cublas::matmul`), burn's matmul otherwise.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, transposed: bool) -> Tensor<B, 2> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cublas::matmul(&x, &weight, transposed) {
        return out;
    }
    if transposed {
        x.matmul(weight.transpose())
    } else {
        x.matmul(weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{TensorData, Tolerance};

    #[test]
    fn forward_matches_hand_computed_affine_map() {
        let device = Default::default();
        // W = [[1, 2], [3, 4], [5, 6]] maps 2 -> 3 features.
        let weight = Tensor::<Flex, 2>::from_floats([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], &device);
        let bias = Tensor::<Flex, 1>::from_floats([0.5, -0.5, 1.0], &device);
        let layer = AdaptableLinear::new(weight, Some(bias));
        let x = Tensor::<Flex, 2>::from_floats([[1.0, -1.0]], &device);
        let y = layer.forward(x);
        y.into_data().assert_approx_eq::<f32>(
            &TensorData::from([[-0.5, -1.5, 0.0]]),
            Tolerance::absolute(1e-6),
        );
        assert_eq!((layer.d_in(), layer.d_out()), (2, 3));
    }

    #[test]
    fn layers_sharing_their_input_give_each_its_own_output_and_gradients() {
        use burn::backend::Autodiff;
        use burn::tensor::Distribution;
        type AD = Autodiff<Flex>;
        let device = Default::default();
        AD::seed(&device, 11);
        let random =
            |dims: [usize; 2]| Tensor::<AD, 2>::random(dims, Distribution::Default, &device);
        // Three layers reading 10 features, with ranks 2, 3, 4, scales 0.5, 2, 1, and a bias.
        let layers: Vec<AdaptableLinear<AD>> = [(5, 2, 0.5), (7, 3, 2.0), (6, 4, 1.0)]
            .into_iter()
            .enumerate()
            .map(|(i, (d_out, rank, scale))| {
                let bias =
                    (i == 1).then(|| Tensor::random([d_out], Distribution::Default, &device));
                let mut layer = AdaptableLinear::new(random([d_out, 10]), bias);
                let (a, b) = (
                    random([rank, 10]).require_grad(),
                    random([d_out, rank]).require_grad(),
                );
                layer.attach(Lora::new(a, b, scale, 0.0));
                layer
            })
            .collect();
        let x = Tensor::<AD, 3>::random([2, 6, 10], Distribution::Default, &device).require_grad();
        let run = |shared: bool| {
            let outs: Vec<Tensor<AD, 3>> = if shared {
                AdaptableLinear::forward_grouped([&layers[0], &layers[1], &layers[2]], x.clone())
                    .into()
            } else {
                layers
                    .iter()
                    .map(|layer| layer.forward(x.clone()))
                    .collect()
            };
            // A loss that weighs every output element differently.
            let loss = outs
                .iter()
                .map(|out| (out.clone() * out.clone().sin()).sum())
                .reduce(|a, b| a + b)
                .expect("three outputs");
            let grads = loss.backward();
            let mut values: Vec<TensorData> = outs.into_iter().map(|out| out.into_data()).collect();
            values.push(x.grad(&grads).expect("x's gradient").into_data());
            for layer in &layers {
                let lora = layer.lora.as_ref().expect("attached");
                values.push(
                    lora.lora_a
                        .val()
                        .grad(&grads)
                        .expect("A's gradient")
                        .into_data(),
                );
                values.push(
                    lora.lora_b
                        .val()
                        .grad(&grads)
                        .expect("B's gradient")
                        .into_data(),
                );
            }
            values
        };
        let (one_by_one, shared) = (run(false), run(true));
        assert_eq!(one_by_one.len(), 10);
        for (shared, alone) in shared.iter().zip(&one_by_one) {
            // The same sums, grouped into one product.
            shared.assert_approx_eq::<f32>(alone, Tolerance::absolute(1e-5).set_relative(1e-5));
        }
    }

    #[test]
    fn dora_rescales_each_row_to_its_magnitude_and_merges_and_unmerges() {
        let device = Default::default();
        let weight = Tensor::<Flex, 2>::from_floats([[3.0, 0.0], [0.0, 1.0]], &device);
        let mut layer =
            AdaptableLinear::new(weight, Some(Tensor::from_floats([0.5, -1.0], &device)));
        // ΔW = 0.5·B·A = [[1, 1], [0, 0]]: W + ΔW = [[4, 1], [0, 1]], row norms √17 and 1.
        let a = Tensor::<Flex, 2>::from_floats([[1.0, 1.0]], &device);
        let b = Tensor::<Flex, 2>::from_floats([[2.0], [0.0]], &device);
        let lora = Lora::new(a, b, 0.5, 0.0);
        let norms = lora.row_norms(layer.weight.val()).into_data();
        norms.assert_approx_eq::<f32>(
            &TensorData::from([17f32.sqrt(), 1.0]),
            Tolerance::absolute(1e-6),
        );
        layer.attach(lora.with_magnitude(Tensor::from_floats([2.0, 3.0], &device)));
        let x = Tensor::<Flex, 2>::from_floats([[1.0, 2.0]], &device);
        // (W + ΔW)·x = [6, 2], rows scaled by 2/√17 and 3, then the bias.
        let expected = TensorData::from([[12.0 / 17f32.sqrt() + 0.5, 6.0 - 1.0]]);
        let tolerance = Tolerance::absolute(1e-5);
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected, tolerance);
        layer.merge("m").unwrap();
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected, tolerance);
        layer.unmerge();
        layer
            .weight
            .val()
            .into_data()
            .assert_approx_eq::<f32>(&TensorData::from([[3.0f32, 0.0], [0.0, 1.0]]), tolerance);
    }

    #[test]
    fn lora_adds_scaled_low_rank_update_and_merges_to_the_same_output() {
        let device = Default::default();
        let weight = Tensor::<Flex, 2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
        let mut layer = AdaptableLinear::new(weight, None);
        // A = [[1, 1]] (r = 1), B = [[2], [0]], s = 0.5: ΔW = [[1, 1], [0, 0]].
        let a = Tensor::<Flex, 2>::from_floats([[1.0, 1.0]], &device);
        let b = Tensor::<Flex, 2>::from_floats([[2.0], [0.0]], &device);
        layer.attach(Lora::new(a, b, 0.5, 0.0));
        let x = Tensor::<Flex, 2>::from_floats([[3.0, 4.0]], &device);
        let expected = TensorData::from([[10.0f32, 4.0]]);
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));

        layer.adapter_enabled = false;
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(
                &TensorData::from([[3.0f32, 4.0]]),
                Tolerance::absolute(1e-6),
            );
        layer.adapter_enabled = true;

        layer.merge("m").unwrap();
        layer
            .forward(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-6));
        layer.unmerge();
        layer.weight.val().into_data().assert_approx_eq::<f32>(
            &TensorData::from([[1.0f32, 0.0], [0.0, 1.0]]),
            Tolerance::absolute(1e-6),
        );
    }

    #[test]
    fn merging_refuses_non_finite_weights() {
        let device = Default::default();
        let weight = Tensor::<Flex, 2>::from_floats([[1.0, 0.0]], &device);
        let mut layer = AdaptableLinear::new(weight, None);
        let a = Tensor::<Flex, 2>::from_floats([[f32::INFINITY, 0.0]], &device);
        let b = Tensor::<Flex, 2>::from_floats([[1.0]], &device);
        layer.attach(Lora::new(a, b, 1.0, 0.0));
        let err = layer.merge("model.layers.0.mlp.up_proj").unwrap_err();
        assert!(err.to_string().contains("model.layers.0.mlp.up_proj"));
        assert!(!layer.merged);
        assert_eq!(
            layer.weight.val().into_data().to_vec::<f32>().unwrap(),
            vec![1.0, 0.0]
        );
    }
}
