//! The peak memory a `burnish bench` run takes: the process's peak resident set on the CPU, and
//! on a CUDA device the driver's count of device memory in use, sampled after every step, less
//! what was in use before the run built anything.

/// Follows one run's memory on the device it runs on.
pub enum MemoryGauge {
    /// The process's peak resident set, which the kernel keeps itself.
    Host,
    /// Device memory in use as the driver counts it (`cuMemGetInfo`), over the run.
    #[cfg(feature = "cuda")]
    Cuda {
        /// Keeps the device's primary context current for the queries.
        context: std::sync::Arc<cudarc::driver::CudaContext>,
        before: u64,
        peak: u64,
    },
}

impl MemoryGauge {
    /// Starts following the memory of a run on `device` (a burn backend's device).
    pub fn start<D: 'static>(device: &D) -> Self {
        #[cfg(feature = "cuda")]
        if let Some(cuda) =
            (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>()
            && let Ok(context) = cudarc::driver::CudaContext::new(cuda.index)
            && let Some(before) = cuda_in_use(&context)
        {
            return Self::Cuda {
                context,
                before,
                peak: before,
            };
        }
        let _ = device;
        Self::Host
    }

    /// Takes a sample (after a step, when the run's buffers are all allocated).
    pub fn sample(&mut self) {
        #[cfg(feature = "cuda")]
        if let Self::Cuda { context, peak, .. } = self
            && let Some(now) = cuda_in_use(context)
        {
            *peak = (*peak).max(now);
        }
    }

    /// The run's peak, in bytes, if it could be read.
    pub fn peak_bytes(&self) -> Option<u64> {
        match self {
            Self::Host => peak_rss_bytes(),
            #[cfg(feature = "cuda")]
            Self::Cuda { before, peak, .. } => Some(peak - before),
        }
    }

    /// What [`peak_bytes`](Self::peak_bytes) counts, for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Host => "peak resident set of the process",
            #[cfg(feature = "cuda")]
            Self::Cuda { .. } => {
                "peak device memory in use (driver count, sampled after each step) less what was \
                 in use before the model was built"
            }
        }
    }
}

/// Bytes in use on the context's device, every process and context included.
#[cfg(feature = "cuda")]
fn cuda_in_use(context: &cudarc::driver::CudaContext) -> Option<u64> {
    context.bind_to_thread().ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some((total - free) as u64)
}

/// Peak resident memory of this process so far (Linux), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
