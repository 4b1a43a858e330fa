//! Frozen base weights held as 4-bit NormalFloat (NF4) codes, QLoRA's format, quantized as
//! bitsandbytes quantizes them (`quantize_4bit` with `quant_type="nf4"`, blocks of 64 values,
//! one absolute maximum per block): each block's values are multiplied by the reciprocal of
//! their largest magnitude and each is given the index of the nearest of the sixteen NF4 levels
//! (a value exactly between two takes the lower); a weight is read back as
//! `level[code] · absmax` in f32, then cast to the activations' precision.
//!
//! With double quantization (bitsandbytes' `compress_statistics`, QLoRA's default) the maxima
//! themselves are quantized, less their mean, to 8-bit codes of bitsandbytes' dynamic map in
//! blocks of 256 (the same nearest-level rule), and the weight reads back through the maxima
//! those codes give; they are held read back, in f32.
//!
//! The codes are packed six to an f32 value (`Σ code_k · 16^k`, below 2^24, so exact in f32 and
//! unpacked with exact float ops on every backend): 0.67 bytes a weight, plus 4 bytes per block
//! of 64 for the maxima, against 2 for bf16 (bitsandbytes packs two to a byte: 0.5). A product
//! with such a weight is one autodiff node ([`composed_op`]) whose backward pass dequantizes the
//! weight again, so no layer's dequantized weight outlives its own product.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use rayon::prelude::*;

use crate::composed_op::{self, ComposedOp};
use crate::cpu_tensors::{self, PARALLEL_CHUNK, from_values, values_of};
use crate::linear::{cast_to, project, unproject};

/// The sixteen NF4 levels, bitsandbytes' (`create_normal_map`), as f32.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per block, each block with its own absolute maximum (bitsandbytes' default).
pub const NF4_BLOCK: usize = 64;

/// Maxima per block of their double quantization (bitsandbytes' `quantize_blockwise` default).
pub const NESTED_BLOCK: usize = 256;

/// The code of [`NF4_LEVELS`]' zero.
const ZERO_CODE: u8 = 7;

/// Codes per packed f32 value.
pub(crate) const CODES_PER_VALUE: usize = 6;

/// A frozen weight `[out, in]` as NF4 codes and per-block maxima.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// `[ceil(blocks · 64 / 6), 1]`: the codes of the weight's values in row-major order,
    /// padded to whole blocks, six to a value.
    pub packed: Param<Tensor<B, 2>>,
    /// `[blocks, 1]`: each block's absolute maximum.
    pub absmax: Param<Tensor<B, 2>>,
    /// `[16, 1]`: [`NF4_LEVELS`].
    pub levels: Param<Tensor<B, 2>>,
    #[module(skip)]
    dims: [usize; 2],
}

impl<B: Backend> Nf4Weight<B> {
    /// `values` (`[out, in]` in row-major order, as `dims` says) quantized on the host, the
    /// maxima double-quantized when `double_quant`, and held on `device`.
    pub fn quantize(
        values: &[f32],
        dims: [usize; 2],
        double_quant: bool,
        device: &B::Device,
    ) -> Self {
        assert_eq!(
            values.len(),
            dims[0] * dims[1],
            "values of a weight of {dims:?}"
        );
        let (codes, absmax) = nf4_codes(values);
        let absmax = match double_quant {
            true => double_quantized(&absmax),
            false => absmax,
        };
        Self::from_codes(codes, absmax, dims, device)
    }

    /// A weight of `dims` whose values' NF4 codes (one per value, row-major, at least
    /// `dims[0] · dims[1]` of them) and blocks' maxima (one per [`NF4_BLOCK`] values) are given,
    /// as a pre-quantized checkpoint stores them, held on `device`.
    pub fn from_codes(
        mut codes: Vec<u8>,
        absmax: Vec<f32>,
        dims: [usize; 2],
        device: &B::Device,
    ) -> Self {
        let count = dims[0] * dims[1];
        assert!(codes.len() >= count, "codes of a weight of {dims:?}");
        assert_eq!(
            absmax.len(),
            count.div_ceil(NF4_BLOCK),
            "maxima of a weight of {dims:?}"
        );
        // Whole blocks, padded with zero's code, as [`dequantize_with_ops`] reads them.
        codes.truncate(count);
        codes.resize(absmax.len() * NF4_BLOCK, ZERO_CODE);
        let packed = pack(&codes);
        let frozen = |data: Vec<f32>| {
            let rows = data.len();
            Param::from_tensor(Tensor::from_data(TensorData::new(data, [rows, 1]), device))
                .set_require_grad(false)
        };
        Self {
            packed: frozen(packed),
            absmax: frozen(absmax),
            levels: frozen(NF4_LEVELS.to_vec()),
            dims,
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// The weight read back, in f32.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        dequantize(
            self.packed.val(),
            self.absmax.val(),
            self.levels.val(),
            self.dims,
            DType::F32,
        )
    }

    /// `x·Wᵀ` with the weight dequantized to `x`'s precision, as one autodiff node that keeps
    /// the codes rather than the dequantized weight for its backward pass.
    ///
    /// # Shapes
    /// - x: `[..., in]`
    /// - output: `[..., out]`
    pub fn project<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let [out, width] = self.dims;
        let rows = dims[..D - 1].iter().product::<usize>();
        dims[D - 1] = out;
        let inputs = [
            x.reshape([rows, width]),
            self.packed.val(),
            self.absmax.val(),
            self.levels.val(),
        ];
        composed_op::run(Nf4Product { dims: self.dims }, inputs).reshape(dims)
    }
}

/// [`Nf4Weight::project`]'s node: `x` `[rows, in]`, then the packed codes, maxima and levels.
#[derive(Debug, Clone)]
struct Nf4Product {
    dims: [usize; 2],
}

impl Nf4Product {
    /// The weight in `x`'s precision.
    fn weight<I: Backend>(
        &self,
        [packed, absmax, levels]: [Tensor<I, 2>; 3],
        x: &Tensor<I, 2>,
    ) -> Tensor<I, 2> {
        dequantize(packed, absmax, levels, self.dims, x.dtype())
    }
}

impl ComposedOp<4> for Nf4Product {
    fn forward<I: Backend>(
        &self,
        [x, packed, absmax, levels]: [Tensor<I, 2>; 4],
    ) -> (Tensor<I, 2>, Option<Tensor<I, 2>>) {
        let weight = self.weight([packed, absmax, levels], &x);
        (project(x, weight), None)
    }

    fn backward<I: Backend>(
        &self,
        [x, packed, absmax, levels]: [Tensor<I, 2>; 4],
        _: Option<Tensor<I, 2>>,
        d_out: Tensor<I, 2>,
        [x_wanted, ..]: [bool; 4],
    ) -> [Option<Tensor<I, 2>>; 4] {
        let dx = x_wanted.then(|| {
            let weight = self.weight([packed, absmax, levels], &x);
            cast_to(unproject(cast_to(d_out, x.dtype()), weight), x.dtype())
        });
        [dx, None, None, None]
    }
}

/// `level[code] · absmax` of every value of a weight of `dims`, computed in f32 and held in
/// `dtype`: on the CPU one parallel pass over the codes; on the plain GPU backends one kernel
/// ([`Nf4Dequantize`](crate::nf4_kernel::Nf4Dequantize)) where it is on; elsewhere burn's ops
/// (a handful of element-wise passes).
fn dequantize<B: Backend>(
    packed: Tensor<B, 2>,
    absmax: Tensor<B, 2>,
    levels: Tensor<B, 2>,
    dims: [usize; 2],
    dtype: DType,
) -> Tensor<B, 2> {
    if let (Some(packed), Some(absmax)) = (values_of(&packed), values_of(&absmax)) {
        let (packed, absmax) = (cpu_tensors::values(&packed), cpu_tensors::values(&absmax));
        let values = dequantize_on_host(packed, absmax, dims);
        return cast_to(from_values(cpu_tensors::tensor(values, dims.into())), dtype);
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        let kernel = crate::nf4_kernel::Nf4Dequantize { dims, dtype };
        let inputs = [packed.clone(), absmax.clone(), levels.clone()];
        if let Some([weight]) = crate::gpu_kernel::launch(&kernel, &inputs) {
            return weight;
        }
    }
    cast_to(dequantize_with_ops(packed, absmax, levels, dims), dtype)
}

/// [`dequantize`] in burn's ops, on any backend.
fn dequantize_with_ops<B: Backend>(
    packed: Tensor<B, 2>,
    absmax: Tensor<B, 2>,
    levels: Tensor<B, 2>,
    dims: [usize; 2],
) -> Tensor<B, 2> {
    let [values, _] = packed.dims();
    let [blocks, _] = absmax.dims();
    let device = packed.device();
    let places: Vec<f32> = (0..CODES_PER_VALUE).map(|k| 16f32.powi(k as i32)).collect();
    let places = Tensor::<B, 2>::from_data(TensorData::new(places, [1, CODES_PER_VALUE]), &device);
    let codes = (packed / places)
        .floor()
        .remainder_scalar(16.0)
        .reshape([values * CODES_PER_VALUE])
        .slice(0..blocks * NF4_BLOCK)
        .int();
    let scaled = levels.select(0, codes).reshape([blocks, NF4_BLOCK]) * absmax;
    scaled
        .reshape([blocks * NF4_BLOCK])
        .slice(0..dims[0] * dims[1])
        .reshape(dims)
}

/// [`dequantize`] on the host: `level[code] · absmax` for the `dims[0] · dims[1]` values whose
/// codes `packed` holds, in row-major order.
fn dequantize_on_host(packed: &[f32], absmax: &[f32], dims: [usize; 2]) -> Vec<f32> {
    let mut out = vec![0f32; dims[0] * dims[1]];
    out.par_chunks_mut(PARALLEL_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let first = chunk * PARALLEL_CHUNK;
            for (i, value) in values.iter_mut().enumerate() {
                let index = first + i;
                let word = packed[index / CODES_PER_VALUE] as u32;
                let code = (word >> (4 * (index % CODES_PER_VALUE))) & 0xF;
                *value = NF4_LEVELS[code as usize] * absmax[index / NF4_BLOCK];
            }
        });
    out
}

/// The NF4 codes of `values` (padded with zeros' code to whole blocks) and each block's absolute
/// maximum, as bitsandbytes computes them (see [`blockwise_codes`]).
pub fn nf4_codes(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    blockwise_codes(values, &NF4_LEVELS, NF4_BLOCK)
}

/// `maxima` through bitsandbytes' double quantization and read back: less their mean, coded by
/// [`blockwise_codes`] over [`dynamic_map`] in blocks of [`NESTED_BLOCK`], then
/// `map[code] · block maximum + mean`, each step rounded to f32 as bitsandbytes rounds it. The
/// mean is summed in f64 and rounded once; torch sums it in f32 lanes, which can differ in the
/// last place.
pub fn double_quantized(maxima: &[f32]) -> Vec<f32> {
    let mean = (maxima.iter().map(|&m| f64::from(m)).sum::<f64>() / maxima.len() as f64) as f32;
    let centred: Vec<f32> = maxima.iter().map(|&m| m - mean).collect();
    let map = dynamic_map();
    let (codes, nested) = blockwise_codes(&centred, &map, NESTED_BLOCK);
    nested_maxima(&codes[..maxima.len()], &nested, &map, NESTED_BLOCK, mean)
}

/// Double-quantized maxima read back, as bitsandbytes reads them (its own or a checkpoint's):
/// `map[code] · nested_absmax[i / block] + offset`, with its f32 rounding (the product, then
/// the sum).
pub fn nested_maxima(
    codes: &[u8],
    nested_absmax: &[f32],
    map: &[f32],
    block: usize,
    offset: f32,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &code)| map[usize::from(code)] * nested_absmax[i / block] + offset)
        .collect()
}

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), sorted: for each decade
/// `10^e`, e from −6 to 0, the `2^(e+6)` midpoints of an even f32 split of [0.1, 1] scaled by
/// `10^e` in f32, and their negatives; then 0 and 1. The split is `torch.linspace`'s on the
/// CPU: the first half of the points from 0.1 up, the rest from 1 down, each one fused
/// multiply-add of the f32 step.
pub fn dynamic_map() -> Vec<f32> {
    let mut map = vec![0.0f32, 1.0];
    for i in 0..7i32 {
        let steps = (1usize << i) + 1;
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (steps - 1) as f32;
        let point = |k: usize| match k < steps / 2 {
            true => step.mul_add(k as f32, start),
            false => (-step).mul_add((steps - k - 1) as f32, end),
        };
        let decade: f32 = format!("1e{}", i - 6).parse().expect("a decimal power");
        for k in 0..steps - 1 {
            let mean = (point(k) + point(k + 1)) / 2.0;
            map.extend([decade * mean, -(decade * mean)]);
        }
    }
    map.sort_by(f32::total_cmp);
    map
}

/// The codes of `values` over `levels` (sorted; padded with zero's code to whole blocks) and
/// each block's absolute maximum, as bitsandbytes' portable kernels (and its CUDA ones) compute
/// them: a whole block's values are multiplied by the f32 reciprocal of its maximum (at least
/// 1e-38), a last partial block's divided by it (its stored maximum then at least 1e-38),
/// clamped to [-1, 1], and given the number of level midpoints (f32) below them.
pub fn blockwise_codes(values: &[f32], levels: &[f32], block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let midpoints: Vec<f32> = levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let code = |scaled: f32| {
        let scaled = scaled.clamp(-1.0, 1.0);
        midpoints.partition_point(|&m| m < scaled) as u8
    };
    let blocks = values.len().div_ceil(block_size);
    let mut codes = vec![code(0.0); blocks * block_size];
    let mut maxima = vec![0f32; blocks];
    codes
        .par_chunks_mut(block_size)
        .zip(maxima.par_iter_mut())
        .zip(values.par_chunks(block_size))
        .for_each(|((codes, maximum), block)| {
            let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            if block.len() == block_size {
                let reciprocal = 1.0 / largest.max(1e-38);
                for (code_of, v) in codes.iter_mut().zip(block) {
                    *code_of = code(v * reciprocal);
                }
                *maximum = largest;
            } else {
                let largest = largest.max(1e-38);
                for (code_of, v) in codes.iter_mut().zip(block) {
                    *code_of = code(v / largest);
                }
                *maximum = largest;
            }
        });
    (codes, maxima)
}

/// `codes` six to an f32 value, the first in the lowest four bits; the last value padded with
/// zeros.
fn pack(codes: &[u8]) -> Vec<f32> {
    codes
        .par_chunks(CODES_PER_VALUE)
        .map(|group| {
            let word = group
                .iter()
                .rev()
                .fold(0u32, |word, &code| (word << 4) | u32::from(code));
            word as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    type B = Flex;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 5) as f32))
            .collect()
    }

    /// Every level is its own code; the midpoints go to the lower level; values beyond the
    /// maximum's are clamped; a zero block reads back as zeros.
    #[test]
    fn codes_are_the_nearest_levels() {
        let mut block = NF4_LEVELS.to_vec();
        block.resize(NF4_BLOCK, 0.0);
        let (codes, maxima) = nf4_codes(&block);
        assert_eq!(maxima, vec![1.0]);
        assert_eq!(&codes[..16], &(0..16).collect::<Vec<u8>>()[..]);
        let between = (NF4_LEVELS[8] + NF4_LEVELS[9]) / 2.0;
        let (codes, _) = nf4_codes(&[between, 1.0]);
        assert_eq!(&codes[..2], &[8, 15]);
        let (codes, maxima) = nf4_codes(&[0.0; NF4_BLOCK]);
        assert_eq!(maxima, vec![0.0]);
        assert!(codes.iter().all(|&c| c == 7));
    }

    /// Packing, then the CPU's pass or burn's ops that unpack and scale, give back
    /// `level[code] · absmax` for every value, a partial last block and the packing's padding
    /// included.
    #[test]
    fn dequantized_values_are_level_times_maximum() {
        for dims in [[5, 40], [64, 160]] {
            let n = dims[0] * dims[1];
            let values = values(n);
            let weight = Nf4Weight::<B>::quantize(&values, dims, false, &Default::default());
            let (codes, maxima) = nf4_codes(&values);
            let expected: Vec<f32> = (0..n)
                .map(|i| NF4_LEVELS[codes[i] as usize] * maxima[i / NF4_BLOCK])
                .collect();
            let got = weight.dequantize().into_data().to_vec::<f32>().unwrap();
            assert_eq!(got, expected);
            let with_ops = dequantize_with_ops(
                weight.packed.val(),
                weight.absmax.val(),
                weight.levels.val(),
                dims,
            );
            assert_eq!(with_ops.into_data().to_vec::<f32>().unwrap(), expected);
            // NF4's levels are at most 0.31 apart.
            for (i, (v, q)) in values.iter().zip(&got).enumerate() {
                let largest = maxima[i / NF4_BLOCK];
                assert!((v - q).abs() <= 0.16 * largest, "{v} read back as {q}");
            }
        }
    }

    /// The product and its input gradient equal those of the dequantized weight as a plain
    /// frozen matrix.
    #[test]
    fn products_and_gradients_equal_the_dequantized_weights() {
        products_and_gradients_on::<Flex>(1e-5);
    }

    /// [`products_and_gradients_equal_the_dequantized_weights`] on backend `G`, to `tolerance`
    /// (relative, at least absolute), and the dequantized weight equal to the CPU's.
    fn products_and_gradients_on<G: Backend>(tolerance: f32) {
        type A<G> = Autodiff<G>;
        let device = Default::default();
        let dims = [24, 100];
        let weight = Nf4Weight::<A<G>>::quantize(&values(2400), dims, true, &device);
        let cpu = Nf4Weight::<Flex>::quantize(&values(2400), dims, true, &Default::default());
        let cpu_values = cpu.dequantize().into_data().to_vec::<f32>().unwrap();
        assert_eq!(
            weight.dequantize().into_data().to_vec::<f32>().unwrap(),
            cpu_values
        );
        // Without autodiff the GPU backends read the weight back by a kernel of their own.
        let plain = Nf4Weight::<G>::quantize(&values(2400), dims, true, &device);
        assert_eq!(
            plain.dequantize().into_data().to_vec::<f32>().unwrap(),
            cpu_values
        );
        let x_values = values(3 * 100);
        let x = || {
            Tensor::<A<G>, 2>::from_data(TensorData::new(x_values.clone(), [3, 100]), &device)
                .require_grad()
        };
        let (ours_x, plain_x) = (x(), x());
        let ours = weight.project(ours_x.clone());
        let plain = plain_x.clone().matmul(weight.dequantize().transpose());
        let close = |a: Tensor<A<G>, 2>, b: Tensor<A<G>, 2>| {
            let a = a.into_data().to_vec::<f32>().unwrap();
            let b = b.into_data().to_vec::<f32>().unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= tolerance * y.abs().max(1.0), "{x} vs {y}");
            }
        };
        close(ours.clone(), plain.clone());
        let ours_grads = ours.powi_scalar(2).sum().backward();
        let plain_grads = plain.powi_scalar(2).sum().backward();
        let grad =
            |x: &Tensor<A<G>, 2>, grads| Tensor::<A<G>, 2>::from_inner(x.grad(grads).unwrap());
        close(grad(&ours_x, &ours_grads), grad(&plain_x, &plain_grads));
    }

    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a GPU or a Vulkan driver (wgpu)"]
    fn nf4_on_wgpu_equals_the_cpu() {
        products_and_gradients_on::<burn::backend::Wgpu>(1e-4);
    }

    /// TF32 products: the tolerance of burn's f32 matmul on CUDA.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn nf4_on_cuda_equals_the_cpu() {
        products_and_gradients_on::<burn::backend::Cuda>(1e-2);
    }
}
