//! Ordering work on cubecl's stream against work on a stream of our own, on the device alone:
//! the host never waits. cubecl keeps its CUDA stream private, so nothing can be queued on it
//! but its own kernels; two small ones do the ordering, through a pair of counters in device
//! memory ([`Flags`]):
//!
//! 1. [`Flags::signal`] (on cubecl's stream) adds one to the first counter once the work queued
//!    before it has finished;
//! 2. the other stream waits until the first counter reaches the product's number, does its
//!    work, and writes that number into the second counter (`cuStreamWaitValue32` and
//!    `cuStreamWriteValue32`, [`wait_for_signal`] and [`reply`]);
//! 3. [`Flags::await_reply`] (on cubecl's stream again) holds back the work queued after it,
//!    one unit spinning until the second counter equals the first.
//!
//! The counters are per cubecl stream (one per thread), the numbers wrap, and no kernel takes a
//! runtime scalar. The spinning unit takes a slot on one multiprocessor while the other stream
//! works, as a collective's kernels do beside a product in data-parallel training.

use burn::tensor::{DType, Shape};
use cubecl::prelude::*;

use crate::gpu_kernel::{CubeRuntime, CubeTensor};

/// The first counter gains one: the work before this kernel on its stream has finished.
#[cube(launch)]
fn signal_kernel(flags: &mut Tensor<Atomic<u32>>) {
    if UNIT_POS == 0 {
        flags[0].fetch_add(1u32);
    }
}

/// Returns once the second counter equals the first: the other stream's reply has come.
#[cube(launch)]
fn await_reply_kernel(flags: &mut Tensor<Atomic<u32>>) {
    if UNIT_POS == 0 {
        let wanted = flags[0].load();
        let mut replied = flags[1].load();
        while replied != wanted {
            replied = flags[1].load();
        }
    }
}

/// The two counters of one cubecl stream, in the device memory of its client.
#[derive(Debug)]
pub(crate) struct Flags<R: CubeRuntime> {
    counters: CubeTensor<R>,
}

impl<R: CubeRuntime> Flags<R> {
    /// Both counters at `initial`, written by cubecl's stream (queued, not yet done: the caller
    /// syncs before another stream reads them).
    pub fn new(like: &CubeTensor<R>, initial: [u32; 2]) -> Self {
        let bytes: Vec<u8> = initial.iter().flat_map(|c| c.to_ne_bytes()).collect();
        let handle = like.client.create_from_slice(&bytes);
        let counters = CubeTensor::new_contiguous(
            like.client.clone(),
            like.device.clone(),
            Shape::new([2]),
            handle,
            DType::U32,
        );
        Self { counters }
    }

    /// Queues step 1 on cubecl's stream.
    pub fn signal(&self) {
        signal_kernel::launch::<R>(
            &self.counters.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            self.counters.clone().into_tensor_arg(),
        );
    }

    /// Queues step 3 on cubecl's stream.
    pub fn await_reply(&self) {
        await_reply_kernel::launch::<R>(
            &self.counters.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            self.counters.clone().into_tensor_arg(),
        );
    }

    /// The counters' buffer, for the other stream to address.
    pub fn counters(&self) -> &CubeTensor<R> {
        &self.counters
    }
}

/// Step 2's start: `stream` waits until the first counter (a `u32` at `address`) equals
/// `number`.
#[cfg(feature = "cuda")]
pub(crate) fn wait_for_signal(
    stream: cudarc::driver::sys::CUstream,
    address: u64,
    number: u32,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let equal = sys::CUstreamWaitValue_flags_enum::CU_STREAM_WAIT_VALUE_EQ as u32;
    // SAFETY: `address` is the first counter of live `Flags` and `stream` a live stream of
    // the same context.
    unsafe { sys::cuStreamWaitValue32_v2(stream, address, number, equal) }.result()
}

/// Step 2's end: `stream` writes `number` into the second counter (a `u32` at `address`), after
/// its work before the write, whose memory writes it makes visible first.
#[cfg(feature = "cuda")]
pub(crate) fn reply(
    stream: cudarc::driver::sys::CUstream,
    address: u64,
    number: u32,
) -> Result<(), cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let fenced = sys::CUstreamWriteValue_flags_enum::CU_STREAM_WRITE_VALUE_DEFAULT as u32;
    // SAFETY: `address` is the second counter of live `Flags` and `stream` a live stream of
    // the same context.
    unsafe { sys::cuStreamWriteValue32_v2(stream, address, number, fenced) }.result()
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    //! The two kernels on wgpu (a Vulkan device: a GPU's, or Mesa's lavapipe on the CPU):
    //! `cargo test --release -p burnish-peft --features wgpu -- --ignored device_order`. The
    //! CUDA side, with the other stream, is checked through the cuBLAS products that use it
    //! (`cublas` tests).
    use super::*;
    use burn::tensor::{Tensor, TensorPrimitive};
    use burn_cubecl::CubeBackend;
    use cubecl::wgpu::WgpuRuntime;

    type Wgpu = CubeBackend<WgpuRuntime, f32, i32, u32>;

    fn values(flags: &Flags<WgpuRuntime>) -> Vec<u32> {
        let tensor: Tensor<Wgpu, 1, burn::tensor::Int> =
            Tensor::from_primitive(flags.counters().clone());
        tensor
            .into_data()
            .convert::<u32>()
            .to_vec()
            .expect("u32 counters")
    }

    #[test]
    #[ignore = "needs a GPU or a Vulkan driver (wgpu)"]
    fn device_order_signal_counts_and_await_returns_on_the_reply() {
        let device = Default::default();
        let like = Tensor::<Wgpu, 1>::zeros([1], &device).into_primitive();
        let TensorPrimitive::Float(like) = like else {
            unreachable!("a float tensor")
        };
        // The other stream has answered signal 7 already: the wait returns at once.
        let flags = Flags::new(&like, [6, 7]);
        flags.signal();
        flags.await_reply();
        assert_eq!(values(&flags), [7, 7]);
        // The counters wrap.
        let flags = Flags::new(&like, [u32::MAX, 0]);
        flags.signal();
        flags.await_reply();
        assert_eq!(values(&flags), [0, 0]);
    }
}
