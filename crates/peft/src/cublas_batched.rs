//! Batched products `[b0, b1, r, k]·[b0, b1, k, c]` through cuBLAS on the CUDA backend: the
//! attention's products (scores, probabilities by values, and their gradients), one strided
//! batched call each. Taken only where the products queue on cubecl's stream
//! ([`Ordering::Stream`]): a host-ordered route would wait on every one of the hundreds a step.
//!
//! cuBLAS reads an operand in place when its two batch axes fold into one stride and its
//! matrix has a unit stride along rows or columns (a transposed view is read as such); any
//! other layout is made contiguous first, as burn's matmul does with the layouts it calls
//! highly permuted.

use std::any::TypeId;
use std::ffi::c_void;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use cudarc::cublas::result as blas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};

use crate::cublas::{
    Cube, MIN_STREAM_ORDERED_PRODUCT, Ordering, Plain, address, data_type, empty_like,
    on_cubecls_stream, operation, ordered, readable,
};
use crate::rebrand::rebrand;

/// How a batched product multiplies f32 operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Compute {
    /// TF32 on tensor cores (cuBLAS's `COMPUTE_32F_FAST_TF32`, 10-bit mantissas), as burn's CUDA
    /// matmul does, at several times full f32's rate: for values that were 16-bit activations
    /// (TF32 holds a bf16 query or key exactly), from [`MIN_STREAM_ORDERED_PRODUCT`]
    /// multiply-adds.
    Tf32,
    /// Full f32, whatever the product's size (on cubecl's stream routing costs the device
    /// nothing): for an f32 model's activations, where TF32 would be the largest error left.
    Full,
}

/// `lhs·rhs` batch by batch, both of one dtype (f32, bf16 or f16) and of the same batch axes,
/// through cuBLAS when `B` is the plain CUDA backend and the route queues products on cubecl's
/// stream (and found it), for products of at least [`MIN_STREAM_ORDERED_PRODUCT`] multiply-adds
/// in all, or of any size in f32 with [`F32Compute::Full`]; `None` otherwise, for the caller to
/// use burn's matmul. f32 operands multiply as `f32_compute` says; 16-bit operands accumulate
/// in f32.
pub fn batched_matmul<B: Backend>(
    lhs: &Tensor<B, 4>,
    rhs: &Tensor<B, 4>,
    f32_compute: F32Compute,
) -> Option<Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Plain>()
        || !on_cubecls_stream()
        || lhs.dtype() != rhs.dtype()
        || data_type(lhs.dtype()).is_none()
    {
        return None;
    }
    let ([b0, b1, rows, inner], [r0, r1, rhs_inner, cols]) = (lhs.dims(), rhs.dims());
    let (smallest, compute) = match (lhs.dtype(), f32_compute) {
        (DType::F32, F32Compute::Tf32) => (
            MIN_STREAM_ORDERED_PRODUCT,
            cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        ),
        (DType::F32, F32Compute::Full) => (0, cublasComputeType_t::CUBLAS_COMPUTE_32F),
        _ => (
            MIN_STREAM_ORDERED_PRODUCT,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
    };
    let multiply_adds = b0 * b1 * rows * inner * cols;
    if [b0, b1] != [r0, r1] || inner != rhs_inner || multiply_adds < smallest {
        return None;
    }
    let primitive = |t: &Tensor<B, 4>| -> Cube { rebrand(t.clone().into_primitive().tensor()) };
    let out = batched(primitive(lhs), primitive(rhs), compute);
    Some(Tensor::from_primitive(TensorPrimitive::Float(rebrand(out))))
}

/// The batched product, computed as `compute` says, into a fresh contiguous `[b0, b1, rows,
/// cols]` tensor.
fn batched(lhs: Cube, rhs: Cube, compute: cublasComputeType_t) -> Cube {
    let [b0, b1, rows, inner] = lhs.meta.shape().dims::<4>();
    let cols = rhs.meta.shape().dims::<4>()[3];
    let dtype = lhs.dtype;
    let cuda_type = data_type(dtype).expect("cuBLAS product of an unsupported dtype");
    let ((lhs, lhs_layout), (rhs, rhs_layout)) = (readable(lhs), readable(rhs));
    let out = empty_like(&lhs, Shape::new([b0, b1, rows, cols]));
    let int = |value: usize| i32::try_from(value).expect("cuBLAS dimensions fit in i32");
    let long = |value: usize| i64::try_from(value).expect("cuBLAS strides fit in i64");
    let (alpha, beta) = (1.0f32, 0.0f32);
    // Row-major `C = L·R` as the column-major `Cᵀ = Rᵀ·Lᵀ` (see `gemm_layout`): a row-major
    // operand read column-major is its transpose already, a transposed view needs `T`.
    ordered(&out, Ordering::Stream, |handle| {
        // SAFETY: the addresses are of live cubecl buffers (the tensors are held until this
        // function returns) laid out as their `StridedOperand`s describe (leading dimensions
        // and batch strides within each buffer), which `ordered` keeps from other work until
        // the product is done (on cubecl's stream, a buffer freed meanwhile goes only to work
        // queued after it there); alpha and beta are f32 as both compute types require.
        unsafe {
            blas::gemm_strided_batched_ex(
                handle,
                operation(rhs_layout.transposed),
                operation(lhs_layout.transposed),
                int(cols),
                int(rows),
                int(inner),
                (&alpha as *const f32).cast::<c_void>(),
                address(&rhs) as *const c_void,
                cuda_type,
                int(rhs_layout.leading),
                long(rhs_layout.batch_stride),
                address(&lhs) as *const c_void,
                cuda_type,
                int(lhs_layout.leading),
                long(lhs_layout.batch_stride),
                (&beta as *const f32).cast::<c_void>(),
                address(&out) as *mut c_void,
                cuda_type,
                int(cols),
                long(rows * cols),
                int(b0 * b1),
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .expect("cuBLAS GemmStridedBatchedEx runs")
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cublas::{CudaMatmul, cuda_matmul, stream_ordering_refused};
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    const GPU: &str = "needs an NVIDIA GPU and libcublas, and BURNISH_MATMUL=cublas-async";

    /// The batched route against the CPU backend's f32 product of the same values, for operands
    /// read in place (contiguous, a transposed view, a narrowed one) and copied first
    /// (heads-major views of position-major storage), in f32 (TF32: errors of a few 1e-3 here;
    /// full f32: rounding of the accumulation order) and bf16; and a product too small for the
    /// TF32 threshold, which full f32 takes.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas, and BURNISH_MATMUL=cublas-async"]
    fn cublas_stream_batched_products_equal_the_cpus() {
        assert_eq!(
            *cuda_matmul(),
            CudaMatmul::Cublas(Ordering::Stream),
            "{GPU}"
        );
        let device = Default::default();
        let random = |shape: [usize; 4], seed: u64| {
            Plain::seed(&device, seed);
            Tensor::<Plain, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let cases: Vec<(Tensor<Plain, 4>, Tensor<Plain, 4>)> = vec![
            (random([8, 3, 512, 64], 1), random([8, 3, 64, 1024], 2)),
            (
                random([8, 3, 512, 64], 3),
                random([8, 3, 1024, 64], 4)
                    .narrow(2, 0, 768)
                    .swap_dims(2, 3),
            ),
            (
                random([8, 1024, 3, 64], 5)
                    .swap_dims(1, 2)
                    .narrow(2, 256, 512),
                random([8, 3, 64, 1024], 6),
            ),
            (
                random([8, 3, 1024, 512], 7).swap_dims(2, 3),
                random([8, 1024, 3, 64], 8).swap_dims(1, 2),
            ),
        ];
        let small = (random([1, 2, 16, 16], 9), random([1, 2, 16, 24], 10));
        let runs = [
            (DType::F32, F32Compute::Tf32),
            (DType::BF16, F32Compute::Tf32),
            (DType::F32, F32Compute::Full),
        ];
        for (dtype, f32_compute) in runs {
            let full = f32_compute == F32Compute::Full;
            for (lhs, rhs) in cases.iter().chain(full.then_some(&small)) {
                let (lhs, rhs) = (lhs.clone().cast(dtype), rhs.clone().cast(dtype));
                let ours = batched_matmul(&lhs, &rhs, f32_compute).unwrap_or_else(|| {
                    panic!("not routed to cuBLAS: {:?}", stream_ordering_refused())
                });
                assert_eq!(ours.dtype(), dtype);
                let cpu = |t: &Tensor<Plain, 4>| {
                    Tensor::<Flex, 4>::from_data(t.to_data().convert::<f32>(), &Default::default())
                };
                let reference = cpu(&lhs).matmul(cpu(&rhs)).into_data();
                let tolerance = match (dtype, f32_compute) {
                    (DType::F32, F32Compute::Full) => Tolerance::absolute(1e-3).set_relative(1e-5),
                    (DType::F32, F32Compute::Tf32) => Tolerance::absolute(5e-2).set_relative(1e-2),
                    _ => Tolerance::absolute(1e-1).set_relative(2e-2),
                };
                ours.into_data()
                    .convert::<f32>()
                    .assert_approx_eq::<f32>(&reference, tolerance);
            }
        }
        let (lhs, rhs) = small;
        assert!(
            batched_matmul(&lhs, &rhs, F32Compute::Tf32).is_none(),
            "TF32 takes only products from the threshold"
        );
        assert_eq!(stream_ordering_refused(), None);
    }
}
