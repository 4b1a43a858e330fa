//! RMSNorm, SwiGLU and the causal softmax of the chunked attention, forward and backward, as
//! cubecl kernels for the GPU backends (launched through [`burnish_peft::gpu_kernel`]): what
//! `RmsNormOp`, `SwigluOp` and `chunked_attention` compute in burn's ops, each pass one kernel
//! launch and one pass over memory, where burn's ops take five to fifteen (and the attention a
//! materialized causal mask).
//! Arithmetic in f32 whatever the tensors' precision, each result rounded once to its tensor's.
//! Inputs are `[rows, width]` matrices (an RMSNorm's weight `[1, width]`), made contiguous
//! first; every float dtype the backend holds is taken (f32, bf16, f16).

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use burnish_peft::gpu_kernel::{
    CubeRuntime, CubeTensor, GpuKernel, dims, elementwise, empty, float,
};
use cubecl::prelude::*;
use cubecl::server::CubeCountSelection;

/// Units of a row kernel's cube: each strides over its row's columns, then the cube sums their
/// partial sums in shared memory (a power of two).
const ROW_UNITS: usize = 256;

/// Whether the kernels take tensors of `dtype`.
fn per_row<R: CubeRuntime>(like: &CubeTensor<R>, rows: usize) -> (CubeCount, CubeDim) {
    let cubes = u32::try_from(rows).expect("a GPU kernel's rows fit in u32");
    let cube_count = CubeCountSelection::new(&like.client, cubes).cube_count();
    (cube_count, CubeDim::new_1d(ROW_UNITS as u32))
}

/// The sum (or with `maximum`, the largest) of every unit's `partial`, in every unit: a tree
/// over shared memory.
#[cube]
fn cube_reduce(partial: f32, #[comptime] units: usize, #[comptime] maximum: bool) -> f32 {
    let mut values = SharedMemory::<f32>::new(units);
    values[UNIT_POS as usize] = partial;
    sync_cube();
    let mut active = CUBE_DIM;
    while active > 1 {
        active /= 2;
        if UNIT_POS < active {
            let mine = values[UNIT_POS as usize];
            let other = values[(UNIT_POS + active) as usize];
            if maximum {
                values[UNIT_POS as usize] = max(mine, other);
            } else {
                values[UNIT_POS as usize] = mine + other;
            }
        }
        sync_cube();
    }
    values[0]
}

/// `y = x · r · w` with `r = 1 / sqrt(mean(x²) + eps)` per row; `r` kept for the backward pass.
#[cube(launch)]
fn rms_norm_forward_kernel<X: Float, W: Float>(
    x: &Tensor<X>,
    weight: &Tensor<W>,
    out: &mut Tensor<X>,
    inv_rms: &mut Tensor<f32>,
    #[comptime] eps_bits: u32,
    #[comptime] units: usize,
    #[define(X, W)] _dtypes: [StorageType; 2],
) {
    // A constant of the compiled kernel (one per model's epsilon), not a runtime scalar.
    let eps = f32::new(comptime!(f32::from_bits(eps_bits)));
    let row = CUBE_POS;
    if row >= inv_rms.len() {
        terminate!();
    }
    let width = weight.len();
    let start = row * width;
    let mut squares = 0.0f32;
    let mut col = UNIT_POS as usize;
    while col < width {
        let value = f32::cast_from(x[start + col]);
        squares += value * value;
        col += units;
    }
    let total = cube_reduce(squares, units, false);
    let r = 1.0f32 / f32::sqrt(total / f32::cast_from(width) + eps);
    if UNIT_POS == 0 {
        inv_rms[row] = r;
    }
    let mut col = UNIT_POS as usize;
    while col < width {
        let scaled = f32::cast_from(x[start + col]) * r;
        out[start + col] = X::cast_from(scaled * f32::cast_from(weight[col]));
        col += units;
    }
}

/// `dx = r · g − x · r³ · mean(g · x)` with `g = dy · w`, per row.
#[cube(launch)]
fn rms_norm_backward_kernel<X: Float, W: Float, G: Float>(
    x: &Tensor<X>,
    weight: &Tensor<W>,
    inv_rms: &Tensor<f32>,
    d_out: &Tensor<G>,
    d_x: &mut Tensor<X>,
    #[comptime] units: usize,
    #[define(X, W, G)] _dtypes: [StorageType; 3],
) {
    let row = CUBE_POS;
    if row >= inv_rms.len() {
        terminate!();
    }
    let width = weight.len();
    let start = row * width;
    let mut dot = 0.0f32;
    let mut col = UNIT_POS as usize;
    while col < width {
        let g = f32::cast_from(d_out[start + col]) * f32::cast_from(weight[col]);
        dot += g * f32::cast_from(x[start + col]);
        col += units;
    }
    let total = cube_reduce(dot, units, false);
    let r = inv_rms[row];
    let correction = r * r * r * (total / f32::cast_from(width));
    let mut col = UNIT_POS as usize;
    while col < width {
        let g = f32::cast_from(d_out[start + col]) * f32::cast_from(weight[col]);
        let value = g * r - f32::cast_from(x[start + col]) * correction;
        d_x[start + col] = X::cast_from(value);
        col += units;
    }
}

/// The first key the query of row `row` of a chunk of scores sees: key 0 (causality alone), or
/// with `bounded` the query's entry in `first_keys` (`[batch, seq]`, positions as f32; a batch
/// row's queries take `rows_per_batch` rows of scores).
#[cube]
fn first_key(
    first_keys: &Tensor<f32>,
    row: usize,
    query: u32,
    rows_per_batch: u32,
    #[comptime] bounded: bool,
) -> usize {
    let mut first = 0usize;
    if bounded {
        let batch = row / rows_per_batch as usize;
        let at = batch * first_keys.shape(1) + query as usize;
        first = u32::cast_from(first_keys[at]) as usize;
    }
    first
}

/// Per row of a chunk of attention scores (`[rows, seen]`, the rows the chunk's queries, `len`
/// per head and batch row, from position `start`): the softmax over the keys the row's query
/// sees and its log-sum-exp. The query at position `p` sees keys `first..=p`, `first` being
/// 0 (causality alone) or with `bounded` its entry in `first_keys` ([`first_key`]: its
/// document's first position, a sliding window's); the other keys get 0.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn causal_softmax_kernel(
    scores: &Tensor<f32>,
    first_keys: &Tensor<f32>,
    probs: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    start: u32,
    len: u32,
    rows_per_batch: u32,
    #[comptime] units: usize,
    #[comptime] bounded: bool,
) {
    let row = CUBE_POS;
    if row >= lse.len() {
        terminate!();
    }
    let seen = scores.shape(1);
    let query = start + (row as u32) % len;
    let visible = (query + 1) as usize;
    let lowest = first_key(first_keys, row, query, rows_per_batch, bounded);
    let first = row * seen;
    // The first visible key is seen by every unit: a start for every unit's maximum.
    let mut largest = scores[first + lowest];
    let mut col = lowest + UNIT_POS as usize;
    while col < visible {
        largest = max(largest, scores[first + col]);
        col += units;
    }
    let largest = cube_reduce(largest, units, true);
    let mut total = 0.0f32;
    let mut col = lowest + UNIT_POS as usize;
    while col < visible {
        total += f32::exp(scores[first + col] - largest);
        col += units;
    }
    let total = cube_reduce(total, units, false);
    if UNIT_POS == 0 {
        lse[row] = largest + f32::ln(total);
    }
    let mut col = UNIT_POS as usize;
    while col < seen {
        let p = f32::exp(scores[first + col] - largest) / total;
        probs[first + col] = select(col >= lowest && col < visible, p, 0.0f32);
        col += units;
    }
}

/// The backward pass of [`causal_softmax_kernel`]'s rows, from the scores recomputed: the
/// probabilities `P = exp(S − lse)` on the keys each query sees (0 elsewhere), and the scores'
/// gradient `P ∘ (dP − rowsum(dO ∘ O))`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn causal_softmax_backward_kernel(
    scores: &Tensor<f32>,
    lse: &Tensor<f32>,
    d_probs: &Tensor<f32>,
    row_dots: &Tensor<f32>,
    first_keys: &Tensor<f32>,
    probs: &mut Tensor<f32>,
    d_scores: &mut Tensor<f32>,
    start: u32,
    len: u32,
    rows_per_batch: u32,
    #[comptime] bounded: bool,
) {
    let i = ABSOLUTE_POS;
    if i >= probs.len() {
        terminate!();
    }
    let seen = scores.shape(1);
    let row = i / seen;
    let col = i % seen;
    let query = start + (row as u32) % len;
    let visible = (query + 1) as usize;
    let lowest = first_key(first_keys, row, query, rows_per_batch, bounded);
    let p = select(
        col >= lowest && col < visible,
        f32::exp(scores[i] - lse[row]),
        0.0f32,
    );
    probs[i] = p;
    d_scores[i] = p * (d_probs[i] - row_dots[row]);
}

/// `silu(g) · u = g · u / (1 + e^-g)`.
#[cube(launch)]
fn swiglu_forward_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    let u = f32::cast_from(up[i]);
    out[i] = F::cast_from(g * u / (f32::exp(-g) + 1.0f32));
}

/// `du = dh · g · σ(g)`, `dg = dh · u · σ(g) · (1 + g · (1 − σ(g)))`.
#[cube(launch)]
fn swiglu_backward_kernel<F: Float, G: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    d_out: &Tensor<G>,
    d_gate: &mut Tensor<F>,
    d_up: &mut Tensor<F>,
    #[define(F, G)] _dtypes: [StorageType; 2],
) {
    let i = ABSOLUTE_POS;
    if i >= d_gate.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    let u = f32::cast_from(up[i]);
    let dh = f32::cast_from(d_out[i]);
    let sigma = 1.0f32 / (f32::exp(-g) + 1.0f32);
    d_up[i] = F::cast_from(dh * g * sigma);
    let slope = g * (1.0f32 - sigma) + 1.0f32;
    d_gate[i] = F::cast_from(dh * u * sigma * slope);
}

/// RMSNorm's forward pass: `[x, weight]` to `[y, r]` (`r` `[rows, 1]` in f32).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormForward {
    pub eps: f64,
}

impl GpuKernel<2, 2> for RmsNormForward {
    fn launch<R: CubeRuntime>(
        &self,
        [x, weight]: &[CubeTensor<R>; 2],
    ) -> Option<[CubeTensor<R>; 2]> {
        if !float(x.dtype) || !float(weight.dtype) {
            return None;
        }
        let (x, weight) = (into_contiguous(x.clone()), into_contiguous(weight.clone()));
        let [rows, width] = dims(&x);
        let out = empty(&x, [rows, width], x.dtype);
        let inv_rms = empty(&x, [rows, 1], DType::F32);
        let (cube_count, cube_dim) = per_row(&x, rows);
        let dtypes = [x.dtype.into(), weight.dtype.into()];
        rms_norm_forward_kernel::launch::<R>(
            &x.client.clone(),
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            inv_rms.clone().into_tensor_arg(),
            (self.eps as f32).to_bits(),
            ROW_UNITS,
            dtypes,
        );
        Some([out, inv_rms])
    }
}

/// RMSNorm's backward pass for the input: `[x, weight, r, dy]` to `[dx]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmsNormBackward;

impl GpuKernel<4, 1> for RmsNormBackward {
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; 4]) -> Option<[CubeTensor<R>; 1]> {
        if inputs.iter().any(|t| !float(t.dtype)) || inputs[2].dtype != DType::F32 {
            return None;
        }
        let [x, weight, inv_rms, d_out] = inputs.clone().map(into_contiguous);
        let [rows, width] = dims(&x);
        let d_x = empty(&x, [rows, width], x.dtype);
        let (cube_count, cube_dim) = per_row(&x, rows);
        let dtypes = [x.dtype.into(), weight.dtype.into(), d_out.dtype.into()];
        rms_norm_backward_kernel::launch::<R>(
            &x.client.clone(),
            cube_count,
            cube_dim,
            x.into_tensor_arg(),
            weight.into_tensor_arg(),
            inv_rms.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_x.clone().into_tensor_arg(),
            ROW_UNITS,
            dtypes,
        );
        Some([d_x])
    }
}

/// The causal softmax of one chunk of attention scores, in f32: `[scores]` (`[rows, seen]`) to
/// `[scores, first keys]` (`[rows, seen]`, `[batch, seq]`) to `[probabilities, log-sum-exp]`
/// (`[rows, 1]`) for queries `start..start + len` (the rows cycle through them, `heads · len`
/// rows a batch row). Each query sees the keys from its first one (key 0, or with
/// `first_keys` its entry in the second input; without, the second input is not read) to
/// itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalSoftmax {
    start: usize,
    len: usize,
    heads: usize,
    first_keys: bool,
}

impl CausalSoftmax {
    pub(crate) fn new(start: usize, len: usize, heads: usize, first_keys: bool) -> Self {
        Self {
            start,
            len,
            heads,
            first_keys,
        }
    }

    /// The chunk's `start`, `len` and rows per batch row, or `None` when they do not fit the
    /// kernels' u32.
    fn positions(&self) -> Option<(u32, u32, u32)> {
        Some((
            u32::try_from(self.start).ok()?,
            u32::try_from(self.len).ok()?,
            u32::try_from(self.heads.checked_mul(self.len)?).ok()?,
        ))
    }

    /// The kernels' first-keys argument: `input` made contiguous when it holds first keys,
    /// else `scores` again (unread; no copy made).
    fn first_keys_of<R: CubeRuntime>(
        &self,
        input: &CubeTensor<R>,
        scores: &CubeTensor<R>,
    ) -> CubeTensor<R> {
        if self.first_keys {
            into_contiguous(input.clone())
        } else {
            scores.clone()
        }
    }
}

impl GpuKernel<2, 2> for CausalSoftmax {
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; 2]) -> Option<[CubeTensor<R>; 2]> {
        let (start, len, rows_per_batch) = self.positions()?;
        if inputs.iter().any(|t| t.dtype != DType::F32) {
            return None;
        }
        let scores = into_contiguous(inputs[0].clone());
        let first_keys = self.first_keys_of(&inputs[1], &scores);
        let [rows, seen] = dims(&scores);
        let probs = empty(&scores, [rows, seen], DType::F32);
        let lse = empty(&scores, [rows, 1], DType::F32);
        let (cube_count, cube_dim) = per_row(&scores, rows);
        causal_softmax_kernel::launch::<R>(
            &scores.client.clone(),
            cube_count,
            cube_dim,
            scores.into_tensor_arg(),
            first_keys.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            start,
            len,
            rows_per_batch,
            ROW_UNITS,
            self.first_keys,
        );
        Some([probs, lse])
    }
}

/// [`CausalSoftmax`]'s backward pass: `[scores, lse, dP, rowsum(dO ∘ O), first keys]` to `[P,
/// dS]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalSoftmaxBackward(pub CausalSoftmax);

impl GpuKernel<5, 2> for CausalSoftmaxBackward {
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; 5]) -> Option<[CubeTensor<R>; 2]> {
        let (start, len, rows_per_batch) = self.0.positions()?;
        if inputs.iter().any(|t| t.dtype != DType::F32) {
            return None;
        }
        let [scores, lse, d_probs, row_dots] =
            [0, 1, 2, 3].map(|i| into_contiguous(inputs[i].clone()));
        let first_keys = self.0.first_keys_of(&inputs[4], &scores);
        let shape = dims(&scores);
        let probs = empty(&scores, shape, DType::F32);
        let d_scores = empty(&scores, shape, DType::F32);
        let (cube_count, cube_dim) = elementwise(&scores);
        causal_softmax_backward_kernel::launch::<R>(
            &scores.client.clone(),
            cube_count,
            cube_dim,
            scores.into_tensor_arg(),
            lse.into_tensor_arg(),
            d_probs.into_tensor_arg(),
            row_dots.into_tensor_arg(),
            first_keys.into_tensor_arg(),
            probs.clone().into_tensor_arg(),
            d_scores.clone().into_tensor_arg(),
            start,
            len,
            rows_per_batch,
            self.0.first_keys,
        );
        Some([probs, d_scores])
    }
}

/// SwiGLU's forward pass: `[gate, up]` to `[silu(gate) · up]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwigluForward;

impl GpuKernel<2, 1> for SwigluForward {
    fn launch<R: CubeRuntime>(
        &self,
        [gate, up]: &[CubeTensor<R>; 2],
    ) -> Option<[CubeTensor<R>; 1]> {
        if !float(gate.dtype) || gate.dtype != up.dtype {
            return None;
        }
        let (gate, up) = (into_contiguous(gate.clone()), into_contiguous(up.clone()));
        let out = empty(&gate, dims(&gate), gate.dtype);
        let (cube_count, cube_dim) = elementwise(&gate);
        let dtype = gate.dtype.into();
        swiglu_forward_kernel::launch::<R>(
            &gate.client.clone(),
            cube_count,
            cube_dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype,
        );
        Some([out])
    }
}

/// SwiGLU's backward pass: `[gate, up, dh]` to `[d_gate, d_up]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwigluBackward;

impl GpuKernel<3, 2> for SwigluBackward {
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; 3]) -> Option<[CubeTensor<R>; 2]> {
        let [gate, up, d_out] = inputs;
        if !float(gate.dtype) || gate.dtype != up.dtype || !float(d_out.dtype) {
            return None;
        }
        let [gate, up, d_out] = inputs.clone().map(into_contiguous);
        let d_gate = empty(&gate, dims(&gate), gate.dtype);
        let d_up = empty(&gate, dims(&gate), gate.dtype);
        let (cube_count, cube_dim) = elementwise(&gate);
        let dtypes = [gate.dtype.into(), d_out.dtype.into()];
        swiglu_backward_kernel::launch::<R>(
            &gate.client.clone(),
            cube_count,
            cube_dim,
            gate.into_tensor_arg(),
            up.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_gate.clone().into_tensor_arg(),
            d_up.clone().into_tensor_arg(),
            dtypes,
        );
        Some([d_gate, d_up])
    }
}

#[cfg(test)]
mod tests {
    //! The kernels through the modules that take them (`RmsNorm`, the MLP's gating), under
    //! autodiff on a GPU backend, against the same modules on the CPU backend (whose kernels are
    //! checked against burn's ops and transformers' values) on the same inputs. On wgpu they
    //! need a Vulkan device (a GPU's, or Mesa's lavapipe on the CPU): `cargo test --release -p
    //! burnish-model --features wgpu -- --ignored gpu_kernels`; on CUDA an NVIDIA GPU, with
    //! `BURNISH_GPU_KERNELS=all` (`--features cuda`).
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::tensor::backend::{AutodiffBackend, Backend};
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
    use burn_cubecl::CubeBackend;

    use crate::RmsNorm;
    use crate::mlp::swiglu;

    type Cpu = Autodiff<Flex>;

    /// Random values of `shape` drawn on the CPU, identical for both backends.
    fn random<const D: usize>(shape: [usize; D], seed: u64) -> TensorData {
        let device = Default::default();
        Flex::seed(&device, seed);
        Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, 2.0), &device).into_data()
    }

    fn on<B: Backend, const D: usize>(data: &TensorData) -> Tensor<B, D> {
        Tensor::from_data(data.clone(), &Default::default())
    }

    fn close(ours: TensorData, reference: TensorData) {
        ours.assert_approx_eq::<f32>(&reference, Tolerance::absolute(2e-5).set_relative(2e-5));
    }

    /// The output and the input's gradient (and the weight's, when it is trainable) of an
    /// RMSNorm on backend `B`.
    fn rms_norm<B: AutodiffBackend>(
        [x, weight, upstream]: &[TensorData; 3],
        trainable: bool,
    ) -> Vec<TensorData> {
        let x = on::<B, 3>(x).require_grad();
        let norm = RmsNorm::new(on::<B, 1>(weight), 1e-5);
        let norm = if trainable { norm } else { norm.no_grad() };
        let out = norm.forward(x.clone());
        let grads = (out.clone() * on::<B, 3>(upstream)).sum().backward();
        let mut values = vec![
            out.into_data(),
            x.grad(&grads).expect("x's gradient").into_data(),
        ];
        values.extend(norm.weight.val().grad(&grads).map(|g| g.into_data()));
        values
    }

    /// RMSNorm on `Gpu` against the CPU backend's.
    fn rms_norm_on<Gpu: AutodiffBackend>() {
        assert!(
            burnish_peft::gpu_kernel::takes::<Gpu::InnerBackend>(),
            "the GPU kernels are off here: set BURNISH_GPU_KERNELS=all"
        );
        // Widths under, at and over the cube's 256 units, none a multiple of them but one.
        for (shape, seed) in [([2, 37, 96], 1), ([1, 5, 256], 2), ([3, 11, 1000], 3)] {
            let inputs = [
                random(shape, seed),
                random([shape[2]], seed + 10),
                random(shape, seed + 20),
            ];
            for trainable in [false, true] {
                let ours = rms_norm::<Gpu>(&inputs, trainable);
                let reference = rms_norm::<Cpu>(&inputs, trainable);
                assert_eq!(ours.len(), reference.len());
                for (ours, reference) in ours.into_iter().zip(reference) {
                    close(ours, reference);
                }
            }
        }
    }

    /// SwiGLU's output and both inputs' gradients on backend `B`.
    fn gating<B: AutodiffBackend>([gate, up, upstream]: &[TensorData; 3]) -> [TensorData; 3] {
        let (gate, up) = (
            on::<B, 3>(gate).require_grad(),
            on::<B, 3>(up).require_grad(),
        );
        let out = swiglu(gate.clone(), up.clone());
        let grads = (out.clone() * on::<B, 3>(upstream)).sum().backward();
        let grad = |t: &Tensor<B, 3>| t.grad(&grads).expect("a gradient").into_data();
        [out.into_data(), grad(&gate), grad(&up)]
    }

    /// SwiGLU on `Gpu` against the CPU backend's.
    fn swiglu_on<Gpu: AutodiffBackend>() {
        assert!(
            burnish_peft::gpu_kernel::takes::<Gpu::InnerBackend>(),
            "the GPU kernels are off here: set BURNISH_GPU_KERNELS=all"
        );
        let shape = [2, 33, 160];
        let inputs = [random(shape, 4), random(shape, 5), random(shape, 6)];
        let ours = gating::<Gpu>(&inputs);
        let reference = gating::<Cpu>(&inputs);
        for (ours, reference) in ours.into_iter().zip(reference) {
            close(ours, reference);
        }
    }

    #[cfg(feature = "wgpu")]
    type Wgpu = Autodiff<CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>>;
    #[cfg(feature = "cuda")]
    type Cuda = Autodiff<CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>;

    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a GPU or a Vulkan driver (wgpu)"]
    fn gpu_kernels_rms_norm_on_wgpu_equals_the_cpu_backends() {
        rms_norm_on::<Wgpu>();
    }

    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a GPU or a Vulkan driver (wgpu)"]
    fn gpu_kernels_swiglu_on_wgpu_equals_the_cpu_backends() {
        swiglu_on::<Wgpu>();
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU, and BURNISH_GPU_KERNELS=all"]
    fn gpu_kernels_rms_norm_on_cuda_equals_the_cpu_backends() {
        rms_norm_on::<Cuda>();
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU, and BURNISH_GPU_KERNELS=all"]
    fn gpu_kernels_swiglu_on_cuda_equals_the_cpu_backends() {
        swiglu_on::<Cuda>();
    }
}
