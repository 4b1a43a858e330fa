//! NF4 weights read back in one pass on the GPU backends: each unit unpacks one value's code
//! from its packed f32, scales the level by its block's maximum and writes the weight in the
//! precision the product takes, where burn's ops take a division, a floor, a remainder, a cast,
//! a gather, a product and a cast, each a pass over the whole weight.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use cubecl::prelude::*;

use crate::gpu_kernel::{CubeRuntime, CubeTensor, GpuKernel, elementwise, empty, float};
use crate::nf4::{CODES_PER_VALUE, NF4_BLOCK};

/// `out[i] = levels[code_i] · absmax[i / 64]`, `code_i` the `i % 6`-th four bits of
/// `packed[i / 6]`.
#[cube(launch)]
fn nf4_dequantize_kernel<O: Float>(
    packed: &Tensor<f32>,
    absmax: &Tensor<f32>,
    levels: &Tensor<f32>,
    out: &mut Tensor<O>,
    #[comptime] codes_per_value: usize,
    #[comptime] block: usize,
    #[define(O)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let word = u32::cast_from(packed[i / codes_per_value]);
    let shift = u32::cast_from(i % codes_per_value) * 4;
    let code = usize::cast_from((word >> shift) & 15);
    out[i] = O::cast_from(levels[code] * absmax[i / block]);
}

/// An NF4 weight of `dims` read back in `dtype`: `[packed codes, block maxima, levels]` (f32,
/// as [`Nf4Weight`](crate::Nf4Weight) holds them) to `[weight]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Nf4Dequantize {
    pub dims: [usize; 2],
    pub dtype: DType,
}

impl GpuKernel<3, 1> for Nf4Dequantize {
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; 3]) -> Option<[CubeTensor<R>; 1]> {
        if inputs.iter().any(|t| t.dtype != DType::F32) || !float(self.dtype) {
            return None;
        }
        let [packed, absmax, levels] = inputs.clone().map(into_contiguous);
        let out = empty(&packed, self.dims, self.dtype);
        let (cube_count, cube_dim) = elementwise(&out);
        nf4_dequantize_kernel::launch::<R>(
            &packed.client.clone(),
            cube_count,
            cube_dim,
            packed.into_tensor_arg(),
            absmax.into_tensor_arg(),
            levels.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            CODES_PER_VALUE,
            NF4_BLOCK,
            self.dtype.into(),
        );
        Some([out])
    }
}
