//! `x·Wᵀ` and `x·W` on the CUDA backend through cuBLAS, with their own backward: the route that
//! [`project`](crate::project) and [`unproject`](crate::unproject) take for the frozen products
//! of LoRA training (the projections and the LM head), because burn 0.21's CUDA matmul runs at
//! a fraction of cuBLAS's rate on the same card. Every other backend, and every other product,
//! stays on burn's matmul.
//!
//! cuBLAS is loaded at run time (nothing CUDA is needed to build). Both sides work in the
//! device's primary context, so cuBLAS reads and writes cubecl's buffers in place. Each product
//! is ordered against the work cubecl queues in one of two ways ([`Ordering`]): by the host,
//! which drains cubecl's queue before the product (run on a stream of cuBLAS's own) and that
//! stream after it; or by cubecl's own stream, on which cuBLAS then queues the product between
//! cubecl's kernels ([`cubecl_stream`](crate::cubecl_stream) finds it), the host never waiting
//! for the device. With the stream's ordering the adapters' products and the attention's
//! batched products take cuBLAS too ([`batched_matmul`](crate::batched_matmul)).
//!
//! `BURNISH_MATMUL` in the environment picks the route: `cublas` (host-ordered, the default),
//! `cublas-async` (on cubecl's stream), or `burn` (burn's matmul alone, for side-by-side
//! measurements); without a loadable cuBLAS it is burn's, and [`cuda_matmul`] says why.

use std::any::TypeId;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::future::block_on;
use cubecl::stream_id::StreamId;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::sys as driver_sys;
use cudarc::driver::{CudaContext, CudaStream};

use crate::cubecl_stream;
use crate::gemm_layout::{ColumnMajorGemm, StridedOperand};
use crate::rebrand::rebrand;

/// burnish's CUDA backend as the binary instantiates it without the `fusion` feature (with it,
/// `burn::backend::Cuda` wraps this one in burn's fusion backend, whose tensors are not cubecl's
/// and which the route leaves to burn's matmul).
pub(crate) type Plain = CubeBackend<CudaRuntime, f32, i32, u8>;
/// The same backend under autodiff, as training runs it.
type Tracked = Autodiff<Plain>;
pub(crate) type Cube = CubeTensor<CudaRuntime>;
type TrackedTensor = FloatTensor<Tracked>;

/// The environment variable that picks the CUDA products' matmul: `cublas` (the default),
/// `cublas-async` or `burn`.
pub const MATMUL_ENV: &str = "BURNISH_MATMUL";

/// Which matmul the frozen projections use on the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaMatmul {
    /// cuBLAS, through this module, each product ordered against cubecl's stream this way.
    Cublas(Ordering),
    /// burn's own matmul, and why.
    Burn { why: String },
}

/// How a cuBLAS product is ordered against the work cubecl queues before and after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// The host drains cubecl's queue, runs the product and drains cuBLAS's stream: about half
    /// a millisecond a product on an H100, and the host cannot queue ahead of the device.
    Host,
    /// cuBLAS queues the product on cubecl's own stream, which orders it; the host waits only
    /// for cubecl's server thread to take the call in turn, not for the device. Falls back to
    /// [`Ordering::Host`] where that stream cannot be found ([`stream_ordering_refused`] says
    /// why).
    Stream,
}

/// The route for this process, decided once from [`MATMUL_ENV`] and whether cuBLAS loads.
pub fn cuda_matmul() -> &'static CudaMatmul {
    static ROUTE: OnceLock<CudaMatmul> = OnceLock::new();
    ROUTE.get_or_init(|| {
        let asked = std::env::var(MATMUL_ENV).unwrap_or_default();
        let ordering = match asked.as_str() {
            "burn" => {
                return CudaMatmul::Burn {
                    why: format!("{MATMUL_ENV}=burn"),
                };
            }
            "" | "cublas" => Ordering::Host,
            "cublas-async" => Ordering::Stream,
            other => {
                return CudaMatmul::Burn {
                    why: format!(
                        "{MATMUL_ENV}={other} is none of `cublas`, `cublas-async` and `burn`"
                    ),
                };
            }
        };
        // SAFETY: only tries to open the library; no symbol is called.
        if unsafe { blas_sys::is_culib_present() } {
            CudaMatmul::Cublas(ordering)
        } else {
            CudaMatmul::Burn {
                why: "libcublas was not found; add the folder holding the CUDA libraries \
                              (often /usr/local/cuda/lib64) to LD_LIBRARY_PATH"
                    .into(),
            }
        }
    })
}

/// The smallest product, in multiply-adds, that the route takes with each product ordered by
/// the host: about half a millisecond a product on an H100 (2026-11-26, SmolLM2-135M SFT at 8 x
/// 1024 tokens, 430 products a step: 900 ms a step with every product routed, 691 ms on burn's
/// matmul alone). cuBLAS's rate (~700 TFLOP/s against burn's ~94 in bf16) wins that back from
/// about 2^35 multiply-adds: the LM head's chunks, and the projections of models of TinyLlama's
/// width.
pub const MIN_ROUTED_PRODUCT: usize = 1 << 35;

/// The smallest product the route takes when cubecl's stream orders it, which costs the device
/// nothing: the host's cost is a round trip to cubecl's server thread (which runs the cuBLAS
/// call after what was queued before it), some microseconds while that thread is busy, which a
/// product of a million multiply-adds takes on either matmul. The projections of SmolLM2-135M
/// at 8 x 1024 tokens are 2^29.8 to 2^32.7.
pub const MIN_STREAM_ORDERED_PRODUCT: usize = 1 << 20;

/// `x·Wᵀ` (`transposed`; x `[n, k]`, weight `[o, k]`) or `x·W` (x `[n, o]`), both operands of
/// one of f32, bf16 or f16, through cuBLAS when `B` is burnish's CUDA backend, with or without
/// autodiff, the route is on and the product has at least [`MIN_ROUTED_PRODUCT`] multiply-adds
/// (on cubecl's stream: [`MIN_STREAM_ORDERED_PRODUCT`], and any size in f32); `None` otherwise,
/// for the caller to use burn's matmul. f32 products are full f32 here, where burn's are TF32:
/// on cubecl's stream every f32 product takes the route for that alone.
pub(crate) fn matmul<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    transposed: bool,
) -> Option<Tensor<B, 2>> {
    let CudaMatmul::Cublas(ordering) = *cuda_matmul() else {
        return None;
    };
    let smallest = if !on_cubecls_stream() {
        MIN_ROUTED_PRODUCT
    } else if x.dtype() == DType::F32 {
        0
    } else {
        MIN_STREAM_ORDERED_PRODUCT
    };
    let ([rows, inner], [d_out, d_in]) = (x.dims(), weight.dims());
    let cols = if transposed { d_out } else { d_in };
    if rows * inner * cols < smallest {
        return None;
    }
    routed(x, weight, transposed, ordering)
}

/// Whether products on backend `B` can take the route: `B` is the plain CUDA backend, with or
/// without autodiff, and [`cuda_matmul`] is cuBLAS.
pub fn routes<B: Backend>() -> bool {
    let backend = TypeId::of::<B>();
    (backend == TypeId::of::<Plain>() || backend == TypeId::of::<Tracked>())
        && matches!(cuda_matmul(), CudaMatmul::Cublas(_))
}

/// [`matmul`] whatever the product's size, ordered as asked.
fn routed<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
    transposed: bool,
    ordering: Ordering,
) -> Option<Tensor<B, 2>> {
    if !routes::<B>() || x.dtype() != weight.dtype() || data_type(x.dtype()).is_none() {
        return None;
    }
    let backend = TypeId::of::<B>();
    let x = x.clone().into_primitive().tensor();
    let weight = weight.clone().into_primitive().tensor();
    let out: B::FloatTensorPrimitive = if backend == TypeId::of::<Plain>() {
        rebrand(gemm(
            rebrand(x),
            false,
            rebrand(weight),
            transposed,
            ordering,
        ))
    } else {
        let backward = ProductBackward {
            transposed,
            ordering,
        };
        rebrand(backward.tracked(rebrand(x), rebrand(weight)))
    };
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// The autodiff node of `y = x·Wᵀ` (`dx = dy·W`, `dW = dyᵀ·x`) or of `y = x·W` (`dx = dy·Wᵀ`,
/// `dW = xᵀ·dy`), each computed only when its input wants a gradient (a frozen base weight
/// never does), ordered as the forward product was.
#[derive(Debug)]
struct ProductBackward {
    transposed: bool,
    ordering: Ordering,
}

impl Backward<Plain, 2> for ProductBackward {
    /// The checkpointed `x` (kept only if `W` needs a gradient) and `W` (only if `x` does).
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (x_state, weight_state) = ops.state;
        let [x_parent, weight_parent] = ops.parents;
        let grad: Cube = grads.consume::<Plain>(&ops.node);
        let ordering = self.ordering;
        if let (Some(parent), Some(x)) = (weight_parent, x_state) {
            let x: Cube = checkpointer.retrieve_node_output(x);
            let grad_weight = if self.transposed {
                gemm(grad.clone(), true, x, false, ordering)
            } else {
                gemm(x, true, grad.clone(), false, ordering)
            };
            grads.register::<Plain>(parent.id, grad_weight);
        }
        if let (Some(parent), Some(weight)) = (x_parent, weight_state) {
            let weight: Cube = checkpointer.retrieve_node_output(weight);
            let grad_x = gemm(grad, false, weight, !self.transposed, ordering);
            grads.register::<Plain>(parent.id, grad_x);
        }
    }
}

impl ProductBackward {
    /// The forward product under autodiff, with this node recorded for the backward pass.
    fn tracked(self, x: TrackedTensor, weight: TrackedTensor) -> TrackedTensor {
        let (transposed, ordering) = (self.transposed, self.ordering);
        let product = |x: Cube, weight: Cube| gemm(x, false, weight, transposed, ordering);
        let (x_tracked, weight_tracked) = (x.is_tracked(), weight.is_tracked());
        match self
            .prepare::<NoCheckpointing>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = weight_tracked.then(|| prep.checkpoint(&x));
                let weight_state = x_tracked.then(|| prep.checkpoint(&weight));
                let out = product(x.primitive, weight.primitive);
                prep.finish((x_state, weight_state), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(product(x.primitive, weight.primitive)),
        }
    }
}

/// cuBLAS's name for a tensor element type, for the types it multiplies here.
pub(crate) fn data_type(dtype: DType) -> Option<cudaDataType> {
    match dtype {
        DType::F32 => Some(cudaDataType::CUDA_R_32F),
        DType::BF16 => Some(cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(cudaDataType::CUDA_R_16F),
        _ => None,
    }
}

/// Row-major `op(lhs)·op(rhs)`, where `op` transposes when its flag is set; both operands are
/// 2-D and of one dtype, and so is the result, accumulated in f32; ordered against cubecl's
/// stream as `ordering` says.
pub(crate) fn gemm(lhs: Cube, lhs_t: bool, rhs: Cube, rhs_t: bool, ordering: Ordering) -> Cube {
    assert_eq!(lhs.dtype, rhs.dtype, "cuBLAS product of two dtypes");
    let data_type = data_type(lhs.dtype).expect("cuBLAS product of an unsupported dtype");
    let ((lhs, lhs_layout), (rhs, rhs_layout)) = (readable(lhs), readable(rhs));
    let call = ColumnMajorGemm::for_row_major(
        (matrix_dims(&lhs), lhs_t, lhs_layout),
        (matrix_dims(&rhs), rhs_t, rhs_layout),
    )
    .expect("cuBLAS product of mismatched inner dimensions");
    let [rows, cols] = call.output_dims();

    let out = empty_like(&lhs, Shape::new([rows, cols]));
    if rows == 0 || cols == 0 {
        return out;
    }
    let int = |value: usize| i32::try_from(value).expect("cuBLAS dimensions fit in i32");
    let (alpha, beta) = (1.0f32, 0.0f32);
    ordered(&out, ordering, |handle| {
        // SAFETY: the three addresses are of live cubecl buffers (the tensors are held until
        // this function returns) of the sizes `call` describes, which `ordered` keeps from
        // other work until the product is done (on cubecl's stream, a buffer freed meanwhile
        // goes only to work queued after it there); alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires.
        unsafe {
            blas::gemm_ex(
                handle,
                operation(call.transpose_a),
                operation(call.transpose_b),
                int(call.m),
                int(call.n),
                int(call.k),
                (&alpha as *const f32).cast::<c_void>(),
                address(&rhs) as *const c_void,
                data_type,
                int(call.lda),
                address(&lhs) as *const c_void,
                data_type,
                int(call.ldb),
                (&beta as *const f32).cast::<c_void>(),
                address(&out) as *mut c_void,
                data_type,
                int(call.ldc),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .expect("cuBLAS GemmEx runs")
    });
    out
}

/// A fresh contiguous tensor of `shape` in `like`'s dtype, on its device.
pub(crate) fn empty_like(like: &Cube, shape: Shape) -> Cube {
    let handle = like.client.empty(shape.num_elements() * like.dtype.size());
    Cube::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        like.dtype,
    )
}

/// The device address of `tensor`'s first element (valid while the tensor lives).
pub(crate) fn address(tensor: &Cube) -> u64 {
    tensor
        .client
        .get_resource(tensor.handle.clone())
        .expect("cubecl hands out the buffer of a live tensor")
        .resource()
        .ptr
}

/// cuBLAS's operation for an operand transposed or not.
pub(crate) fn operation(transposed: bool) -> cublasOperation_t {
    if transposed {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// `call` (cuBLAS calls on the handle it is given, reading and writing cubecl buffers of
/// `like`'s device), ordered against the work cubecl queues as `ordering` says: with the host's,
/// cubecl's queue drains first and cuBLAS's own stream after; with the stream's, cubecl's
/// server thread runs `call` (cubecl's `exclusive`) on cubecl's stream for the current
/// [`StreamId`], between the kernels it issued there before (all this thread submitted until
/// now: the server takes submissions in order) and those it issues after. The host waits for
/// that one call only, which is also where `call` reads its operands' addresses from the server.
pub(crate) fn ordered(
    like: &Cube,
    ordering: Ordering,
    call: impl FnOnce(blas_sys::cublasHandle_t) + Send,
) {
    let lane = Lane::of(like.device.index);
    let handle = *lane.blas.handle();
    match lane.cubecl_stream(like, ordering) {
        Some(stream) => {
            let (handle, stream) = (handle as usize, stream as usize);
            like.client
                .exclusive(move || {
                    let handle = handle as blas_sys::cublasHandle_t;
                    on_stream(handle, stream as driver_sys::CUstream);
                    call(handle);
                })
                .expect("cubecl's server thread runs the cuBLAS call");
        }
        None => {
            // cubecl's server thread has the context current; this one may not yet.
            lane.stream
                .context()
                .bind_to_thread()
                .expect("the CUDA context binds to this thread");
            on_stream(handle, lane.stream.cu_stream());
            block_on(like.client.sync()).expect("the CUDA queue drains before a cuBLAS product");
            call(handle);
            lane.stream.synchronize().expect("cuBLAS's stream finishes");
        }
    }
}

/// Points cuBLAS `handle` (a lane's, used by one thread at a time) at `stream`, a live stream
/// of its context.
fn on_stream(handle: blas_sys::cublasHandle_t, stream: driver_sys::CUstream) {
    // SAFETY: as the caller promises.
    unsafe { blas::set_stream(handle, stream.cast()) }
        .expect("cuBLAS takes a stream of its context");
}

fn matrix_dims(tensor: &Cube) -> [usize; 2] {
    tensor.meta.shape().dims::<2>()
}

/// `t`, a matrix or a `[b0, b1, rows, cols]` batch of them, and its layout as cuBLAS reads it:
/// in place where its matrices have a unit stride along one axis and its batch axes fold into
/// one stride (rows padded to a pitch, as burn lays out most CUDA tensors, or a transposed
/// view), else made contiguous first.
pub(crate) fn readable(t: Cube) -> (Cube, StridedOperand) {
    let layout = |t: &Cube| {
        let strides = t.meta.strides();
        match t.meta.num_dims() {
            2 => StridedOperand::of_matrix(matrix_dims(t), [strides[0], strides[1]]),
            4 => StridedOperand::of(
                t.meta.shape().dims::<4>(),
                [strides[0], strides[1], strides[2], strides[3]],
            ),
            rank => panic!("cuBLAS operands are 2-D or 4-D, not {rank}-D"),
        }
    };
    if let Some(found) = layout(&t) {
        return (t, found);
    }
    let t = into_contiguous(t);
    let found = layout(&t).expect("cuBLAS reads a contiguous tensor in place");
    (t, found)
}

/// Whether cuBLAS's products queue on cubecl's stream: asked for, and not refused (once cubecl's
/// stream could not be found, the host orders every product).
pub(crate) fn on_cubecls_stream() -> bool {
    *cuda_matmul() == CudaMatmul::Cublas(Ordering::Stream) && stream_ordering_refused().is_none()
}

/// Why cuBLAS's products could not queue on cubecl's stream (the route then orders them by
/// the host), if it was asked to and could not.
pub fn stream_ordering_refused() -> Option<&'static str> {
    REFUSED.get().map(String::as_str)
}

static REFUSED: OnceLock<String> = OnceLock::new();

/// The lanes by device and cubecl stream.
type Lanes = HashMap<(usize, StreamId), Arc<Lane>>;

/// A cuBLAS handle for one cubecl stream's products on one device, and a stream of its own for
/// the products the host orders.
struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    /// cubecl's stream (an address), found on the first product that asks for it, or why it
    /// could not be.
    cubecl: OnceLock<Result<usize, String>>,
}

impl Lane {
    /// The lane of the current [`StreamId`] on device `index`, created on first use and kept
    /// for the process (never dropped: a handle's teardown after the driver's would fail at
    /// exit).
    fn of(index: usize) -> Arc<Lane> {
        static LANES: OnceLock<Mutex<Lanes>> = OnceLock::new();
        let mut lanes = LANES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        lanes
            .entry((index, StreamId::current()))
            .or_insert_with(|| {
                let context = CudaContext::new(index).expect("the CUDA device's primary context");
                let stream = context.new_stream().expect("a CUDA stream for cuBLAS");
                let blas = CudaBlas::new(stream.clone()).expect("a cuBLAS handle");
                Arc::new(Lane {
                    stream,
                    blas,
                    cubecl: OnceLock::new(),
                })
            })
            .clone()
    }

    /// cubecl's stream when `ordering` asks for it and it could be found; `None` for the host's
    /// ordering.
    fn cubecl_stream(&self, like: &Cube, ordering: Ordering) -> Option<driver_sys::CUstream> {
        if ordering == Ordering::Host {
            return None;
        }
        let found = self.cubecl.get_or_init(|| {
            cubecl_stream::of_this_stream(like, self.stream.context()).map(|stream| stream as usize)
        });
        match found {
            Ok(stream) => Some(*stream as driver_sys::CUstream),
            Err(why) => {
                let _ = REFUSED.set(why.clone());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! These run on a machine with an NVIDIA GPU and cuBLAS: `cargo test -p burnish-peft
    //! --features cuda -- --ignored cublas` (or the prepared GPU script). Each holds the cuBLAS
    //! route to the exact product of the same inputs (computed on the host in f64) at the
    //! precision of its dtype, and no farther from it than burn's own CUDA matmul, which it
    //! replaces: burn 0.21 multiplies f32 operands in TF32 on tensor cores (10-bit mantissas),
    //! off the exact product by a few 1e-1 over hundreds of products. Each check runs with
    //! either ordering (`cublas_host_*`, `cublas_stream_*`); a chain of dependent products
    //! checks the stream's ordering where a race would show (no host read between them).
    use super::*;
    use burn::tensor::{Distribution, TensorData, Tolerance};
    use rayon::prelude::*;

    const GPU: &str = "needs an NVIDIA GPU and libcublas";

    /// The route is on, and the stream ordering was not refused (the tests would then check
    /// the host's twice).
    fn route_is_on() {
        assert!(routes::<Plain>(), "{GPU}");
        assert_eq!(stream_ordering_refused(), None);
    }

    fn random<B: Backend>(shape: [usize; 2], seed: u64, device: &B::Device) -> Tensor<B, 2> {
        B::seed(device, seed);
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// Row-major `op(a)·op(b)` in f64 on the host, from the values the device holds.
    fn exact(a: &TensorData, a_t: bool, b: &TensorData, b_t: bool) -> TensorData {
        let (a_dims, b_dims) = (a.shape.to_vec(), b.shape.to_vec());
        let values = |data: &TensorData| data.clone().convert::<f32>().to_vec::<f32>().unwrap();
        let (a, b) = (values(a), values(b));
        let (rows, inner) = if a_t {
            (a_dims[1], a_dims[0])
        } else {
            (a_dims[0], a_dims[1])
        };
        let cols = if b_t { b_dims[0] } else { b_dims[1] };
        let at = |i: usize, k: usize| {
            if a_t {
                a[k * rows + i]
            } else {
                a[i * inner + k]
            }
        };
        let bt = |k: usize, j: usize| {
            if b_t {
                b[j * inner + k]
            } else {
                b[k * cols + j]
            }
        };
        // On every core: the head's shape is billions of multiply-adds per product.
        let out: Vec<f32> = (0..rows * cols)
            .into_par_iter()
            .map(|index| {
                let (i, j) = (index / cols, index % cols);
                (0..inner)
                    .map(|k| f64::from(at(i, k)) * f64::from(bt(k, j)))
                    .sum::<f64>() as f32
            })
            .collect();
        TensorData::new(out, [rows, cols])
    }

    /// The route's result against the exact product: f32 to accumulation-order rounding (on an
    /// H100, up to 3e-4 over 576 products of N(0, 1) values: a twentieth of TF32's error), the
    /// 16-bit types to the rounding of their result.
    fn exactly(ours: &TensorData, exact: &TensorData, dtype: DType) {
        let tolerance = match dtype {
            DType::F32 => Tolerance::absolute(1e-3).set_relative(1e-4),
            _ => Tolerance::absolute(1e-2).set_relative(8e-3),
        };
        ours.clone()
            .convert::<f32>()
            .assert_approx_eq::<f32>(exact, tolerance);
    }

    /// The route's result is no farther from the exact product than burn's matmul, which it
    /// replaces: its largest error at most burn's largest plus a rounding step (f32: 1e-3; the
    /// 16-bit types: 1% of the largest value, about their rounding). burn 0.21's f32 products
    /// on CUDA run in TF32 (0.26 off at values near 9 over 576 products, on an H100 on
    /// 2026-11-28, where an element-wise bound of 0.25 against them had failed the route), so
    /// such a bound says more about burn than about the route: `exactly` checks its values.
    fn as_close_as_burns(ours: &TensorData, burn: TensorData, exact: &TensorData, dtype: DType) {
        let values = |data: TensorData| data.convert::<f32>().to_vec::<f32>().unwrap();
        let (ours, burn, exact) = (values(ours.clone()), values(burn), values(exact.clone()));
        let largest_error = |of: &[f32]| {
            of.iter()
                .zip(&exact)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max)
        };
        let step = match dtype {
            DType::F32 => 1e-3,
            _ => 1e-2 * exact.iter().map(|v| v.abs()).fold(0.0f32, f32::max),
        };
        let (ours_error, burns_error) = (largest_error(&ours), largest_error(&burn));
        assert!(
            ours_error <= burns_error + step,
            "{dtype:?}: the route is off the exact product by up to {ours_error}, burn's matmul \
             by up to {burns_error}"
        );
    }

    /// burn's own `x·Wᵀ` or `x·W`.
    fn burns<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, transposed: bool) -> Tensor<B, 2> {
        if transposed {
            x.matmul(weight.transpose())
        } else {
            x.matmul(weight)
        }
    }

    fn forward_equals_the_exact_product_as_closely_as_burns(ordering: Ordering) {
        route_is_on();
        let device = Default::default();
        for dtype in [DType::F32, DType::BF16] {
            // Odd sizes and the tied-head shape (many outputs), each as x·Wᵀ and as x·W, with an
            // input that is a transposed view or whose rows are padded, and a weight that is
            // stored as it is or as a transposed view (all read in place).
            for (rows, d_in, d_out) in [(7, 33, 65), (256, 576, 1536), (64, 576, 49152)] {
                let cases = [
                    (true, false, false),
                    (false, false, false),
                    (true, true, false),
                    (true, false, true),
                    (false, true, true),
                ];
                for (transposed, padded, weight_view) in cases {
                    // The head's weight as stored only: each of its exact products takes
                    // seconds on the host.
                    if weight_view && d_out > 4096 {
                        continue;
                    }
                    let weight = if weight_view {
                        random::<Plain>([d_in, d_out], 2, &device)
                            .cast(dtype)
                            .transpose()
                    } else {
                        random::<Plain>([d_out, d_in], 2, &device).cast(dtype)
                    };
                    let (from, to) = if transposed {
                        (d_in, d_out)
                    } else {
                        (d_out, d_in)
                    };
                    let x = if padded {
                        // 256 values more a row: 512 bytes or more, which burn's slice keeps
                        // in place (an aligned offset) as a view of the wider rows.
                        let wide = random::<Plain>([rows, from + 256], 1, &device).cast(dtype);
                        let x = wide.narrow(1, 0, from);
                        let primitive: Cube = x.clone().into_primitive().tensor();
                        let strides = primitive.meta.strides();
                        assert!(strides[0] > from && strides[1] == 1, "{strides:?}");
                        x
                    } else {
                        random::<Plain>([from, rows], 1, &device)
                            .cast(dtype)
                            .transpose()
                    };
                    let ours = routed(&x, &weight, transposed, ordering).expect("routed to cuBLAS");
                    assert_eq!(ours.dims(), [rows, to]);
                    assert_eq!(ours.dtype(), dtype);
                    let ours = ours.into_data();
                    let truth = exact(&x.to_data(), false, &weight.to_data(), transposed);
                    exactly(&ours, &truth, dtype);
                    let burn = burns(x, weight.clone(), transposed).into_data();
                    as_close_as_burns(&ours, burn, &truth, dtype);
                }
            }
        }
        route_is_on();
    }

    fn gradients_equal_the_exact_ones_as_closely_as_burns(ordering: Ordering) {
        route_is_on();
        let device = Default::default();
        for dtype in [DType::F32, DType::BF16] {
            for transposed in [true, false] {
                let (from, to) = if transposed { (96, 80) } else { (80, 96) };
                let x = random::<Tracked>([48, from], 3, &device)
                    .cast(dtype)
                    .require_grad();
                let weight = random::<Tracked>([80, 96], 4, &device)
                    .cast(dtype)
                    .require_grad();
                let upstream = random::<Tracked>([48, to], 5, &device).cast(dtype);
                let gradients = |out: Tensor<Tracked, 2>| {
                    let grads = (out * upstream.clone()).sum().backward();
                    (
                        x.grad(&grads).expect("x's gradient").into_data(),
                        weight.grad(&grads).expect("W's gradient").into_data(),
                    )
                };
                let (ours_x, ours_w) =
                    gradients(routed(&x, &weight, transposed, ordering).expect("routed to cuBLAS"));
                // y = x·Wᵀ: dx = dy·W, dW = dyᵀ·x; y = x·W: dx = dy·Wᵀ, dW = xᵀ·dy.
                let (dy, x_values, w_values) = (upstream.to_data(), x.to_data(), weight.to_data());
                let exact_x = exact(&dy, false, &w_values, !transposed);
                let exact_w = if transposed {
                    exact(&dy, true, &x_values, false)
                } else {
                    exact(&x_values, true, &dy, false)
                };
                exactly(&ours_x, &exact_x, dtype);
                exactly(&ours_w, &exact_w, dtype);
                let (burn_x, burn_w) = gradients(burns(x.clone(), weight.clone(), transposed));
                as_close_as_burns(&ours_x, burn_x, &exact_x, dtype);
                as_close_as_burns(&ours_w, burn_w, &exact_w, dtype);
            }
        }
        route_is_on();
    }

    fn leaves_a_frozen_weight_without_gradient(ordering: Ordering) {
        route_is_on();
        let device = Default::default();
        let x = random::<Tracked>([16, 32], 6, &device).require_grad();
        let weight = random::<Tracked>([24, 32], 7, &device);
        let out = routed(&x, &weight, true, ordering).expect("routed to cuBLAS");
        let grads = out.sum().backward();
        let ones = TensorData::new(vec![1.0f32; 16 * 24], [16, 24]);
        exactly(
            &x.grad(&grads).expect("x's gradient").into_data(),
            &exact(&ones, false, &weight.to_data(), false),
            DType::F32,
        );
        assert!(weight.grad(&grads).is_none());
        route_is_on();
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_host_forward_equals_the_exact_product_as_closely_as_burns() {
        forward_equals_the_exact_product_as_closely_as_burns(Ordering::Host);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_stream_forward_equals_the_exact_product_as_closely_as_burns() {
        forward_equals_the_exact_product_as_closely_as_burns(Ordering::Stream);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_host_gradients_equal_the_exact_ones_as_closely_as_burns() {
        gradients_equal_the_exact_ones_as_closely_as_burns(Ordering::Host);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_stream_gradients_equal_the_exact_ones_as_closely_as_burns() {
        gradients_equal_the_exact_ones_as_closely_as_burns(Ordering::Stream);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_host_leaves_a_frozen_weight_without_gradient() {
        leaves_a_frozen_weight_without_gradient(Ordering::Host);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_stream_leaves_a_frozen_weight_without_gradient() {
        leaves_a_frozen_weight_without_gradient(Ordering::Stream);
    }

    /// Forty dependent products, each read at once by burn's element-wise ops on cubecl's
    /// stream and each input dropped after it (its buffer free for the next allocation), queued
    /// with no read by the host between them; then the backward pass through all of them. With
    /// the stream's ordering the values equal the host's: a product that ran before its input
    /// was written, or a buffer reused under a running product, would show.
    #[test]
    #[ignore = "needs an NVIDIA GPU and libcublas"]
    fn cublas_stream_ordering_equals_the_hosts_over_a_chain() {
        route_is_on();
        let device = Default::default();
        let chain = |ordering: Ordering| {
            let start = random::<Tracked>([512, 384], 8, &device)
                .cast(DType::BF16)
                .require_grad();
            let mut x = start.clone();
            for layer in 0..40 {
                let weight = random::<Tracked>([384, 384], 100 + layer, &device).cast(DType::BF16);
                let y = routed(&x, &weight, layer % 2 == 0, ordering).expect("routed to cuBLAS");
                x = (y * 0.05).tanh() + x;
            }
            let grads = x.clone().sum().backward();
            let grad = start.grad(&grads).expect("the start's gradient");
            (x.into_data(), grad.into_data())
        };
        let (host_out, host_grad) = chain(Ordering::Host);
        let (stream_out, stream_grad) = chain(Ordering::Stream);
        let same = Tolerance::absolute(1e-6).set_relative(1e-6);
        stream_out
            .convert::<f32>()
            .assert_approx_eq::<f32>(&host_out.convert::<f32>(), same);
        stream_grad
            .convert::<f32>()
            .assert_approx_eq::<f32>(&host_grad.convert::<f32>(), same);
        route_is_on();
    }
}
