//! What a device can hold in one buffer. cubecl refuses an allocation larger than its runtime's
//! largest page, and burn then panics: on wgpu that is the device's largest storage binding
//! (Vulkan's `maxStorageBufferRange`: 128 MiB on some drivers, Mesa's software lavapipe among
//! them, gigabytes on most GPUs), on CUDA a quarter of the card's memory. Work done in chunks to
//! bound its memory (the attention's scores, the loss's logits) sizes its chunks to fit.

use burn::tensor::backend::Backend;

/// The largest buffer, in bytes, that `device` of backend `B` allocates, where `B` is built on
/// one of the cubecl runtimes burnish builds (wgpu, CUDA; plain, with autodiff or with fusion);
/// `None` elsewhere (the CPU backend allocates what the host's memory allows).
fn largest_buffer<B: Backend>(device: &B::Device) -> Option<u64> {
    #[cfg(feature = "wgpu")]
    if let Some(bytes) = on::<B, cubecl::wgpu::WgpuRuntime>(device) {
        return Some(bytes);
    }
    #[cfg(feature = "cuda")]
    if let Some(bytes) = on::<B, cubecl::cuda::CudaRuntime>(device) {
        return Some(bytes);
    }
    let _ = device;
    None
}

/// [`largest_buffer`] where `B`'s device is runtime `R`'s.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn on<B: Backend, R: cubecl::Runtime>(device: &B::Device) -> Option<u64>
where
    R::Device: 'static,
{
    use std::any::Any;
    let device = (device as &dyn Any).downcast_ref::<R::Device>()?;
    Some(R::client(device).properties().memory.max_page_size)
}

/// How many f32 values a chunk of work on `device` may hold in one buffer: `preferred`, or
/// where the device's largest buffer is smaller, what half of it holds (a margin for the
/// rounding of the allocator's pools), at least one.
pub fn f32_per_buffer<B: Backend>(device: &B::Device, preferred: usize) -> usize {
    match largest_buffer::<B>(device) {
        Some(bytes) => {
            let fit = usize::try_from(bytes / 8).unwrap_or(usize::MAX);
            preferred.min(fit).max(1)
        }
        None => preferred,
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;

    #[test]
    fn the_cpu_backend_takes_what_is_preferred() {
        let device = Default::default();
        assert_eq!(largest_buffer::<Flex>(&device), None);
        assert_eq!(f32_per_buffer::<Autodiff<Flex>>(&device, 1 << 26), 1 << 26);
    }
}
