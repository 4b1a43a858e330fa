//! Kernels of burnish's own on the GPU backends, written once in cubecl for CUDA and wgpu, and
//! how generic code reaches them. Composed of burn's tensor ops, the work between the matrix
//! products (an RMSNorm, a SwiGLU and their backward passes) is a kernel launch and a pass over
//! memory per op, a dozen for an RMSNorm's backward; a GPU step of a small model is bound by
//! those launches. A kernel here does such a pass in one.
//!
//! Only burn's plain cubecl backends take them: under burn's fusion backend the tensors are not
//! cubecl's, and its fused kernels do this work instead. Dispatch is by `TypeId`, as in
//! [`composed_op`](crate::composed_op), so callers keep no extra bound: [`launch`] returns
//! `None` on every other backend, whose callers use burn's ops. On CUDA they stay off unless
//! [`GPU_KERNELS_ENV`] asks for them: checked on wgpu, they computed wrong values on a card
//! (their outputs were allocated with burn's row padding, since mended; not yet run on a card
//! again). The same switch also picks how long rows are reduced
//! ([`row_reduction`](crate::row_reduction)): by routines of burn's own suited to them, on by
//! default on both (checked on wgpu and on an H100).

use std::any::TypeId;
use std::sync::OnceLock;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
pub use burn_cubecl::CubeRuntime;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
pub use burn_cubecl::tensor::CubeTensor;
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::{CubeCount, CubeDim};

use crate::rebrand::rebrand;

/// A kernel of `N` matrices to `M`, for any cubecl runtime.
pub trait GpuKernel<const N: usize, const M: usize> {
    /// The outputs, or `None` where the kernel does not take these inputs (a dtype it is not
    /// written for), for the caller's burn ops to compute instead. [`launch`] hands over no
    /// empty input.
    fn launch<R: CubeRuntime>(&self, inputs: &[CubeTensor<R>; N]) -> Option<[CubeTensor<R>; M]>;
}

/// Whether a kernel written for floats takes `dtype`.
pub fn float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// A fresh tensor of `like`'s device and `shape`, laid out row after row with no gap: the
/// kernels index their outputs linearly. (burn's `empty_device_dtype` may pad each row to an
/// aligned pitch, as it does on CUDA: a kernel writing linearly there fills the padding and
/// leaves every row after the first wrong, which is how burnish's kernels failed on a card.)
pub fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: [usize; 2],
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        dtype,
    )
}

/// The `[rows, width]` of a matrix.
pub fn dims<R: CubeRuntime>(t: &CubeTensor<R>) -> [usize; 2] {
    t.meta.shape().dims::<2>()
}

/// One unit per element of `like`.
pub fn elementwise<R: CubeRuntime>(like: &CubeTensor<R>) -> (CubeCount, CubeDim) {
    let elements = like.meta.num_elements();
    let cube_dim = CubeDim::new(&like.client, elements);
    let cube_count = calculate_cube_count_elemwise(&like.client, elements, cube_dim);
    (cube_count, cube_dim)
}

/// The environment variable that picks the kernels (and [`WIDE_ROW_REDUCTION`]): unset, those
/// checked on the backend at hand (on wgpu every one; on CUDA the routines for long rows alone,
/// checked on an H100 on 2026-11-28: burnish's kernels computed wrong values there, every row
/// after a kernel's first, until their outputs were made unpadded; the next card checks them);
/// `all`, every one on either backend; `burn`, none (their work left to burn's ops and default
/// routines, for side-by-side measurements); or a comma-separated list of names
/// (`RmsNormForward,SwigluBackward`), those alone, to tell which kernel a wrong result comes
/// from.
pub const GPU_KERNELS_ENV: &str = "BURNISH_GPU_KERNELS";

/// The name [`GPU_KERNELS_ENV`] gives the reduction of long rows by routines suited to them
/// ([`row_reduction`](crate::row_reduction)): not a kernel of burnish's own but routines of
/// burn's (cubek's), picked over burn's default.
const WIDE_ROW_REDUCTION: &str = "WideRowReduction";

/// Which kernels [`GPU_KERNELS_ENV`] turns on.
#[derive(Debug, PartialEq)]
enum Chosen {
    Checked,
    All,
    Named(Vec<String>),
}

impl Chosen {
    fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") => Self::Checked,
            Some("all") => Self::All,
            Some("burn") => Self::Named(Vec::new()),
            Some(list) => Self::Named(list.split(',').map(|n| n.trim().to_owned()).collect()),
        }
    }

    /// Whether `kernel` (or [`WIDE_ROW_REDUCTION`]) runs on a plain backend, CUDA or wgpu.
    fn includes(&self, kernel: &str, cuda: bool) -> bool {
        match self {
            Self::Checked => !cuda || kernel == WIDE_ROW_REDUCTION,
            Self::All => true,
            Self::Named(names) => names.iter().any(|n| n == kernel),
        }
    }

    /// Whether any kernel of burnish's own runs there.
    fn any(&self, cuda: bool) -> bool {
        match self {
            Self::Checked => !cuda,
            Self::All => true,
            Self::Named(names) => names.iter().any(|n| n != WIDE_ROW_REDUCTION),
        }
    }
}

/// This process's choice ([`GPU_KERNELS_ENV`], read once).
fn chosen() -> &'static Chosen {
    static CHOSEN: OnceLock<Chosen> = OnceLock::new();
    CHOSEN.get_or_init(|| Chosen::parse(std::env::var(GPU_KERNELS_ENV).ok().as_deref()))
}

/// A kernel's name as [`GPU_KERNELS_ENV`] lists it: its type's, without the path.
fn name<K>() -> &'static str {
    let path = std::any::type_name::<K>();
    path.rsplit("::").next().unwrap_or(path)
}

/// burn's CUDA backend without fusion, as burnish builds it.
#[cfg(feature = "cuda")]
pub(crate) type PlainCuda = CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
/// burn's wgpu backend without fusion, as burnish builds it.
#[cfg(feature = "wgpu")]
pub(crate) type PlainWgpu = CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// Whether `I` is one of the plain cubecl backends burnish builds (CUDA, wgpu), which take the
/// kernels, and any of burnish's own is on there.
pub fn takes<I: Backend>() -> bool {
    plain::<I>().is_some_and(|cuda| chosen().any(cuda))
}

/// Whether `I` is one of the plain cubecl backends and reduces long rows there by routines
/// suited to them ([`row_reduction`](crate::row_reduction)).
pub fn reduces_wide_rows<I: Backend>() -> bool {
    plain::<I>().is_some_and(|cuda| chosen().includes(WIDE_ROW_REDUCTION, cuda))
}

/// Whether `I` is one of the plain cubecl backends and kernel `K` is on there: a caller that
/// relies on `K` running (laying its inputs out for it) asks first.
pub fn takes_kernel<I: Backend, K>() -> bool {
    plain::<I>().is_some_and(|cuda| chosen().includes(name::<K>(), cuda))
}

/// Whether `I` is one of the plain cubecl backends burnish builds: `Some(true)` for CUDA,
/// `Some(false)` for wgpu.
fn plain<I: Backend>() -> Option<bool> {
    #[cfg(feature = "cuda")]
    if TypeId::of::<I>() == TypeId::of::<PlainCuda>() {
        return Some(true);
    }
    #[cfg(feature = "wgpu")]
    if TypeId::of::<I>() == TypeId::of::<PlainWgpu>() {
        return Some(false);
    }
    None
}

/// `kernel` on `inputs` when `I` is one of the plain cubecl backends burnish builds (CUDA,
/// wgpu), the kernel is on there and no input is empty; `None` on any other backend and where
/// the kernel declines the inputs.
pub fn launch<I: Backend, K: GpuKernel<N, M>, const N: usize, const M: usize>(
    kernel: &K,
    inputs: &[Tensor<I, 2>; N],
) -> Option<[Tensor<I, 2>; M]> {
    if !takes_kernel::<I, K>() || inputs.iter().any(|t| t.shape().num_elements() == 0) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_picks_the_checked_all_none_or_the_named_kernels() {
        let checked = Chosen::parse(None);
        assert!(
            checked.includes("RmsNormForward", false) && !checked.includes("RmsNormForward", true)
        );
        assert!(checked.any(false) && !checked.any(true));
        assert!(checked.includes(WIDE_ROW_REDUCTION, false));
        assert!(checked.includes(WIDE_ROW_REDUCTION, true));
        assert!(!Chosen::parse(Some("burn")).includes(WIDE_ROW_REDUCTION, false));
        let routine_alone = Chosen::parse(Some(WIDE_ROW_REDUCTION));
        assert!(routine_alone.includes(WIDE_ROW_REDUCTION, true) && !routine_alone.any(true));
        let all = Chosen::parse(Some("all"));
        assert!(all.includes("RmsNormForward", true) && all.any(true));
        let none = Chosen::parse(Some("burn"));
        assert!(!none.includes("RmsNormForward", false) && !none.any(false));
        let two = Chosen::parse(Some("RmsNormForward, SwigluBackward"));
        assert!(two.includes("RmsNormForward", true) && two.includes("SwigluBackward", false));
        assert!(!two.includes("SwigluForward", false) && two.any(true));
    }

    #[test]
    fn a_kernel_is_named_by_its_type_alone() {
        struct SomeKernel;
        assert_eq!(name::<SomeKernel>(), "SomeKernel");
    }
}
