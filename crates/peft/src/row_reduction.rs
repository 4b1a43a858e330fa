//! Reductions along a tensor's last axis (a softmax's maximum and sum, an RMSNorm's mean of
//! squares), with a routine suited to long rows on the plain GPU backends.
//!
//! burn 0.21 built without autotuning reduces with one unit (one thread) per row. A chunk of the
//! cross-entropy, 1,365 rows of 49,152 logits, is then read by 1,365 threads: 2.4 ms for each
//! of its two reductions on an H100, where the card's memory reads those 268 MB in about 0.1 ms
//! (the per-kernel log of the second H100 run, 2026-11-27: 12 such launches, 25 ms of a 585 ms
//! step); the attention's rows of 512 and 1,024 scores, one thread each, 61 launches and 18 ms
//! more. cubek, whose routines burn's autotuning picks among, has two that spread a row over
//! many threads, and burnish picks them by the row's length:
//! - from [`MIN_CUBE_ROW`] (a vocabulary): a cube (a block of threads) per row, their partial
//!   results combined in shared memory, which every device has;
//! - from [`MIN_PLANE_ROW`] (an attention chunk's keys, a hidden width): a plane (a warp) per
//!   row, where the device has plane operations (CUDA; wgpu's WGSL has none, and keeps burn's
//!   routine);
//!
//! and burn's routine for shorter rows, on every other backend, and for tensors whose gradient
//! is tracked. On by default on both GPU backends, where checked: wgpu (the cube's routine, on a
//! software Vulkan device) and CUDA (both routines, on an H100: SmolLM2-135M SFT at 8 x 1024 took
//! 539 ms a step with them, 580 without, 2026-11-28); `BURNISH_GPU_KERNELS=burn` leaves every
//! row to burn's routine. On a software Vulkan device, which runs a cube's threads and barriers
//! on CPU cores, the cube routine is slower than one thread per row.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// What a row is reduced to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowReduction {
    Max,
    Sum,
    Mean,
}

/// Rows from this length take a cube each: a cube's 256 threads each read a few dozen vectors
/// of four.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
const MIN_CUBE_ROW: usize = 4096;

/// Rows from this length (and under [`MIN_CUBE_ROW`]) take a plane each: a plane's 32 threads
/// each read at least one vector of four.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
const MIN_PLANE_ROW: usize = 128;

/// `t` reduced along its last axis, which stays (of length 1), as burn's `max_dim`, `sum_dim`
/// and `mean_dim` leave it.
pub fn reduce_rows<B: Backend, const D: usize>(
    t: Tensor<B, D>,
    reduction: RowReduction,
) -> Tensor<B, D> {
    let dim = D - 1;
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if let Some(out) = gpu::wide_row_reduction(&t, reduction) {
        return out;
    }
    match reduction {
        RowReduction::Max => t.max_dim(dim),
        RowReduction::Sum => t.sum_dim(dim),
        RowReduction::Mean => t.mean_dim(dim),
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod gpu {
    use std::any::TypeId;

    use burn::backend::Autodiff;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Tensor, TensorPrimitive};
    use burn_cubecl::kernel::reduce::{KernelReduceStrategy, reduce_dim};
    use cubek_reduce::ReduceStrategy;
    use cubek_reduce::components::instructions::ReduceOperationConfig;
    use cubek_reduce::launch::{RoutineStrategy, VectorizationStrategy};
    use cubek_reduce::routines::BlueprintStrategy;
    use cubek_reduce::routines::cube::CubeStrategy;
    use cubek_reduce::routines::plane::PlaneStrategy;

    use super::{MIN_CUBE_ROW, MIN_PLANE_ROW, RowReduction};
    #[cfg(feature = "cuda")]
    use crate::gpu_kernel::PlainCuda;
    #[cfg(feature = "wgpu")]
    use crate::gpu_kernel::PlainWgpu;
    use crate::gpu_kernel::{CubeRuntime, CubeTensor, reduces_wide_rows};
    use crate::rebrand::rebrand;

    /// The routine for rows of `len`, or `None` for burn's.
    pub(super) fn routine(len: usize) -> Option<RoutineStrategy> {
        if len >= MIN_CUBE_ROW {
            let cube = CubeStrategy { use_planes: false };
            Some(RoutineStrategy::Cube(BlueprintStrategy::Inferred(cube)))
        } else if len >= MIN_PLANE_ROW {
            let plane = PlaneStrategy { independent: true };
            Some(RoutineStrategy::Plane(BlueprintStrategy::Inferred(plane)))
        } else {
            None
        }
    }

    /// `t` reduced along its last axis by the [`routine`] for its rows, where `I` is one of the
    /// plain cubecl backends (or its autodiff, for a tensor that is not tracked), the routines
    /// are on there ([`reduces_wide_rows`]) and the device runs the one picked; `None`
    /// otherwise.
    pub(crate) fn wide_row_reduction<I: Backend, const D: usize>(
        t: &Tensor<I, D>,
        reduction: RowReduction,
    ) -> Option<Tensor<I, D>> {
        if t.shape().num_elements() == 0 {
            return None;
        }
        let routine = routine(t.dims()[D - 1])?;
        #[cfg(feature = "cuda")]
        if let Some(out) = reduced_on::<I, PlainCuda, _, D>(t, reduction, &routine) {
            return Some(out);
        }
        #[cfg(feature = "wgpu")]
        if let Some(out) = reduced_on::<I, PlainWgpu, _, D>(t, reduction, &routine) {
            return Some(out);
        }
        None
    }

    /// [`wide_row_reduction`] where `I` is `Plain` (the plain backend of runtime `R`) or its
    /// autodiff.
    fn reduced_on<I, Plain, R, const D: usize>(
        t: &Tensor<I, D>,
        reduction: RowReduction,
        routine: &RoutineStrategy,
    ) -> Option<Tensor<I, D>>
    where
        I: Backend,
        Plain: Backend<FloatTensorPrimitive = CubeTensor<R>>,
        R: CubeRuntime,
    {
        if !reduces_wide_rows::<Plain>() {
            return None;
        }
        if TypeId::of::<I>() == TypeId::of::<Plain>() {
            let plain: Tensor<Plain, D> = rebrand(t.clone());
            return Some(rebrand(reduced(plain, reduction, routine)?));
        }
        if TypeId::of::<I>() == TypeId::of::<Autodiff<Plain>>() && !t.is_require_grad() {
            let tracked: Tensor<Autodiff<Plain>, D> = rebrand(t.clone());
            let out = reduced(tracked.inner(), reduction, routine)?;
            return Some(rebrand(Tensor::<Autodiff<Plain>, D>::from_inner(out)));
        }
        None
    }

    /// burn's reduction of `t`'s last axis by `routine`, as burn's autotuning runs it; `None`
    /// where the device cannot run it (a plane's routine without plane operations).
    fn reduced<Plain, R, const D: usize>(
        t: Tensor<Plain, D>,
        reduction: RowReduction,
        routine: &RoutineStrategy,
    ) -> Option<Tensor<Plain, D>>
    where
        Plain: Backend<FloatTensorPrimitive = CubeTensor<R>>,
        R: CubeRuntime,
    {
        let config = match reduction {
            RowReduction::Max => ReduceOperationConfig::Max,
            RowReduction::Sum => ReduceOperationConfig::Sum,
            RowReduction::Mean => ReduceOperationConfig::Mean,
        };
        let strategy = ReduceStrategy {
            routine: routine.clone(),
            vectorization: VectorizationStrategy {
                parallel_output_vectorization: false,
            },
        };
        let input = t.into_primitive().tensor();
        let out = reduce_dim(
            input,
            None,
            D - 1,
            KernelReduceStrategy::Specific(strategy),
            config,
        )
        .ok()?;
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    #[test]
    fn rows_reduce_as_burns_ops_do() {
        let device = Default::default();
        let t = Tensor::<Flex, 3>::random([2, 3, 70], Distribution::Normal(0.0, 1.0), &device);
        let cases = [
            (RowReduction::Max, t.clone().max_dim(2)),
            (RowReduction::Sum, t.clone().sum_dim(2)),
            (RowReduction::Mean, t.clone().mean_dim(2)),
        ];
        for (reduction, expected) in cases {
            let ours = reduce_rows(t.clone(), reduction);
            assert_eq!(ours.dims(), [2, 3, 1]);
            ours.into_data().assert_eq(&expected.into_data(), true);
        }
    }
}

#[cfg(all(test, any(feature = "cuda", feature = "wgpu")))]
mod gpu_tests {
    //! The routines against the CPU backend's reductions on the same values, on wgpu (a Vulkan
    //! device: a GPU's, or Mesa's lavapipe on the CPU: `cargo test --release -p burnish-peft
    //! --features wgpu -- --ignored wide_row_reduction`) and on CUDA (an NVIDIA GPU, `--features
    //! cuda`).
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::backend::Backend;
    use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
    use burn_cubecl::CubeBackend;
    use cubecl::Runtime;
    use cubecl::features::Plane;
    use cubek_reduce::launch::RoutineStrategy;

    use super::gpu::{routine, wide_row_reduction};
    use super::*;

    /// Values of `shape` drawn on the CPU, the same for both backends.
    fn random<const D: usize>(shape: [usize; D], seed: u64) -> TensorData {
        let device = Default::default();
        Flex::seed(&device, seed);
        Tensor::<Flex, D>::random(shape, Distribution::Normal(0.0, 3.0), &device).into_data()
    }

    /// The CPU backend's reduction (burn's own there).
    fn by_cpu<const D: usize>(values: &TensorData, reduction: RowReduction) -> TensorData {
        let t = Tensor::<Flex, D>::from_data(values.clone(), &Default::default());
        reduce_rows(t, reduction).into_data()
    }

    /// Rows of the lengths the callers reduce (an RMSNorm's width, one past a power of two, an
    /// attention chunk's keys, a vocabulary) and at each routine's threshold, in two and four
    /// dimensions, each reduction against the CPU's, through the routine picked wherever the
    /// device runs it (the plane's where it has plane operations, or none at all); on the
    /// autodiff backend a tensor that is not tracked takes the routines, a tracked one does not.
    fn wide_row_reduction_on<R: Runtime<Device: Default>, Gpu: Backend<Device = R::Device>>() {
        let device = Default::default();
        let planes = R::client(&device)
            .properties()
            .features
            .plane
            .contains(Plane::Ops);
        let reductions = [RowReduction::Max, RowReduction::Sum, RowReduction::Mean];
        let rows = [
            [37, 576],
            [7, MIN_PLANE_ROW + 1],
            [5, MIN_CUBE_ROW],
            [3, 49_152],
        ];
        for (index, shape) in rows.into_iter().enumerate() {
            let values = random(shape, index as u64);
            let cube = matches!(routine(shape[1]), Some(RoutineStrategy::Cube(_)));
            for reduction in reductions {
                let t = Tensor::<Gpu, 2>::from_data(values.clone(), &device);
                let ours = wide_row_reduction(&t, reduction);
                assert_eq!(ours.is_some(), cube || planes, "{shape:?} {reduction:?}");
                if let Some(ours) = ours {
                    let reference = by_cpu::<2>(&values, reduction);
                    let ours = ours.into_data();
                    ours.assert_approx_eq::<f32>(&reference, Tolerance::absolute(1e-3));
                }
            }
        }
        let values = random([2, 3, 5, MIN_CUBE_ROW + 100], 9);
        for reduction in reductions {
            let t = Tensor::<Gpu, 4>::from_data(values.clone(), &device);
            let ours = wide_row_reduction(&t, reduction).expect("a cube per row");
            let reference = by_cpu::<4>(&values, reduction);
            ours.into_data()
                .assert_approx_eq::<f32>(&reference, Tolerance::absolute(1e-3));
        }
        let wide = random([4, MIN_CUBE_ROW], 5);
        let untracked = Tensor::<Autodiff<Gpu>, 2>::from_data(wide, &device);
        assert!(wide_row_reduction(&untracked, RowReduction::Sum).is_some());
        assert!(wide_row_reduction(&untracked.require_grad(), RowReduction::Sum).is_none());
        let short = Tensor::<Gpu, 2>::from_data(random([4, MIN_PLANE_ROW - 1], 3), &device);
        assert!(wide_row_reduction(&short, RowReduction::Sum).is_none());
    }

    #[cfg(feature = "wgpu")]
    #[test]
    #[ignore = "needs a GPU or a Vulkan driver (wgpu)"]
    fn wide_row_reduction_on_wgpu_equals_the_cpu_backends() {
        use cubecl::wgpu::WgpuRuntime;
        wide_row_reduction_on::<WgpuRuntime, CubeBackend<WgpuRuntime, f32, i32, u32>>();
    }

    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn wide_row_reduction_on_cuda_equals_the_cpu_backends() {
        use cubecl::cuda::CudaRuntime;
        wide_row_reduction_on::<CudaRuntime, CubeBackend<CudaRuntime, f32, i32, u8>>();
    }
}
