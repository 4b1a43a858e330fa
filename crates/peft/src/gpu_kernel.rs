//! Kernels of burnish's own on the GPU backends, written once in cubecl for CUDA and wgpu, and
//! how generic code reaches them. Composed of burn's tensor ops, the work between the matrix
//! products (an RMSNorm, a SwiGLU and their backward passes) is a kernel launch and a pass over
//! memory per op, a dozen for an RMSNorm's backward; a GPU step of a small model is bound by
//! those launches. A kernel here does such a pass in one.
//!
//! Only burn's plain cubecl backends take them: under burn's fusion backend the tensors are not
//! cubecl's, and its fused kernels do this work instead. Dispatch is by `TypeId`, as in
//! [`composed_op`](crate::composed_op), so callers keep no extra bound: [`launch`] returns
//! `None` on every other backend, whose callers use burn's ops.

use std::any::TypeId;
use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
pub use burn_cubecl::CubeRuntime;
pub use burn_cubecl::tensor::CubeTensor;

use crate::rebrand::rebrand;

/// A kernel of `N` matrices to `M`, for any cubecl runtime.
pub trait GpuKernel<const N: usize, const M: usize> {
    /// The outputs, or `None` where the kernel does not take these inputs (a dtype it is not
    /// written for), for the caller's burn ops to compute instead. [`launch`] hands over no
    /// empty input.
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; N]) -> Option<[CubeTensor<R>; M]>;
}

/// The environment variable that turns the kernels off: `burn` leaves their work to burn's ops
/// everywhere, for side-by-side measurements (and as a way around a kernel a device mishandles).
pub const GPU_KERNELS_ENV: &str = "BURNISH_GPU_KERNELS";

/// Whether the kernels are on for this process ([`GPU_KERNELS_ENV`], read once).
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| !std::env::var(GPU_KERNELS_ENV).is_ok_and(|v| v == "burn"))
}

/// burn's CUDA backend without fusion, as burnish builds it.
#[cfg(feature = "cuda")]
type PlainCuda = CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
/// burn's wgpu backend without fusion, as burnish builds it.
#[cfg(feature = "wgpu")]
type PlainWgpu = CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// Whether `I` is one of the plain cubecl backends burnish builds (CUDA, wgpu), which take the
/// kernels, and they are on.
pub fn takes<I: Backend>() -> bool {
    if !enabled() {
        return false;
    }
    #[cfg(feature = "cuda")]
    if TypeId::of::<I>() == TypeId::of::<PlainCuda>() {
        return true;
    }
    #[cfg(feature = "wgpu")]
    if TypeId::of::<I>() == TypeId::of::<PlainWgpu>() {
        return true;
    }
    false
}

/// `kernel` on `inputs` when `I` is one of the plain cubecl backends burnish builds (CUDA,
/// wgpu) and no input is empty; `None` on any other backend and where the kernel declines the
/// inputs.
pub fn launch<I: Backend, K: GpuKernel<N, M>, const N: usize, const M: usize>(
    kernel: &K,
    inputs: &[Tensor<I, 2>; N],
) -> Option<[Tensor<I, 2>; M]> {
    if !takes::<I>() || inputs.iter().any(|t| t.shape().num_elements() == 0) {
        return None;
    }
    #[cfg(feature = "cuda")]
    if TypeId::of::<I>() == TypeId::of::<PlainCuda>() {
        return on::<I, PlainCuda, _, K, N, M>(kernel, inputs);
    }
    #[cfg(feature = "wgpu")]
    if TypeId::of::<I>() == TypeId::of::<PlainWgpu>() {
        return on::<I, PlainWgpu, _, K, N, M>(kernel, inputs);
    }
    None
}

/// `kernel` on `inputs`, where `I` is `Plain`, the plain backend of runtime `R`.
fn on<I, Plain, R, K, const N: usize, const M: usize>(
    kernel: &K,
    inputs: &[Tensor<I, 2>; N],
) -> Option<[Tensor<I, 2>; M]>
where
    I: Backend,
    Plain: Backend<FloatTensorPrimitive = CubeTensor<R>>,
    R: CubeRuntime,
    K: GpuKernel<N, M>,
{
    let tensors = inputs.each_ref().map(|t| {
        rebrand::<FloatTensor<I>, FloatTensor<Plain>>(t.clone().into_primitive().tensor())
    });
    let outputs = kernel.launch(&tensors)?;
    Some(outputs.map(|t| Tensor::from_primitive(TensorPrimitive::Float(rebrand(t)))))
}
