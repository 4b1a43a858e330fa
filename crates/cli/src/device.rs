//! Device selection: parsing `--device auto|cpu|cuda[:N]|wgpu` and running a job on the burn
//! backend that device needs. The CPU backend is always compiled in; CUDA and wgpu only with the
//! `cuda` and `wgpu` cargo features. This is the only place in burnish that picks a backend.

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use burnish_model::{BaseDtype, HfConfig, Pretrained};
use clap::Args;

/// The CPU backend (see the README for why this one).
pub type Cpu = burn::backend::Flex;

/// A device as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA if compiled in and a driver is present, then wgpu if compiled in, then CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Wgpu,
}

impl FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}`; use auto, cpu, cuda, cuda:N or wgpu"
                )),
            },
        }
    }
}

/// Work that runs on any backend; the device decides which.
pub trait Job {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Result<Self::Output>;
}

/// Whether an NVIDIA driver is loaded, checked without touching CUDA (creating a CUDA context
/// without a driver aborts the process).
fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// Resolves `auto` to a concrete device among those compiled in.
pub fn resolve(arg: DeviceArg) -> DeviceArg {
    match arg {
        DeviceArg::Auto if cfg!(feature = "cuda") && nvidia_driver_present() => DeviceArg::Cuda(0),
        DeviceArg::Auto if cfg!(feature = "wgpu") => DeviceArg::Wgpu,
        DeviceArg::Auto => DeviceArg::Cpu,
        other => other,
    }
}

/// Runs `job` on the backend of `arg`.
pub fn run_on<J: Job>(arg: DeviceArg, job: J) -> Result<J::Output> {
    match resolve(arg) {
        DeviceArg::Cpu | DeviceArg::Auto => job.run::<Cpu>(Default::default()),
        DeviceArg::Cuda(index) => run_cuda(index, job),
        DeviceArg::Wgpu => run_wgpu(job),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<J: Job>(index: usize, job: J) -> Result<J::Output> {
    if !nvidia_driver_present() {
        bail!("--device cuda: no NVIDIA driver is loaded on this machine; use --device cpu");
    }
    if let burnish_peft::cublas::CudaMatmul::Burn { why } = burnish_peft::cublas::cuda_matmul() {
        eprintln!("note: CUDA matrix products run on burn's matmul, not cuBLAS: {why}");
    }
    let device = burn::backend::cuda::CudaDevice { index };
    let output = job.run::<burn::backend::Cuda>(device.clone());
    if let Some(why) = burnish_peft::cublas::stream_ordering_refused() {
        eprintln!("note: the cuBLAS products were ordered by the host, not cubecl's stream: {why}");
    }
    // Let the device finish what the job left queued (freeing its buffers, say) before the
    // process exits: the driver tears down at exit and cubecl's server thread would panic on
    // a call into it.
    let _ = <burn::backend::Cuda as Backend>::sync(&device);
    output
}

/// `--dtype` of the commands that run a model without training it (`score`, `generate`, `chat`).
#[derive(Debug, Clone, Args)]
pub struct FrozenDtype {
    /// Precision the base weights are held in: f32, bf16 (half the memory; on a GPU the
    /// activations are bf16 too), nf4 (QLoRA's 4-bit codes for the layers' projections, their
    /// block maxima double-quantized), nf4-plain (the same, maxima as they are), or auto (nf4
    /// for a checkpoint saved in 4 bits, else bf16 on a GPU, f32 on the CPU).
    #[arg(long, default_value = "auto")]
    pub dtype: BaseDtype,
}

impl FrozenDtype {
    /// The checkpoint in `model_dir`, with the PEFT-format `adapter` on it when given, held on
    /// `device` in the precision this asks for, resolved.
    pub fn load<B: Backend>(
        &self,
        model_dir: &Path,
        adapter: Option<&Path>,
        device: &B::Device,
    ) -> Result<Pretrained<B>> {
        let dtype = checkpoint_dtype(self.dtype, model_dir, true)?;
        let dtype = base_dtype_for::<B>(dtype, device, true)?;
        Pretrained::<B>::load_with_adapter(model_dir, adapter, dtype, device)
            .with_context(|| format!("loading {}", model_dir.display()))
    }
}

/// `dtype` for the checkpoint in `model_dir` as a base that stays frozen or trains: `auto` is
/// nf4 for a checkpoint saved in 4 bits (a `*-bnb-4bit` model), whose codes are then held as
/// they are; an NF4 base that would train is an error.
pub fn checkpoint_dtype(dtype: BaseDtype, model_dir: &Path, frozen: bool) -> Result<BaseDtype> {
    let config_path = model_dir.join("config.json");
    let stored_in_nf4 = HfConfig::from_file(&config_path)?.stored_in_nf4();
    let dtype = match dtype {
        BaseDtype::Auto if stored_in_nf4 => BaseDtype::Nf4,
        other => other,
    };
    if dtype.is_nf4() && !frozen {
        let what = match stored_in_nf4 {
            true => format!("{} is a 4-bit checkpoint", model_dir.display()),
            false => "an nf4 base".to_string(),
        };
        bail!(
            "{what}, whose weights cannot train: add an `[adapter]` section (QLoRA), or read \
             the weights back to floats with `model.dtype = \"f32\"` to train every one"
        );
    }
    Ok(dtype)
}

/// `dtype` made concrete for backend `B` on `device`, for a base that stays frozen or trains:
/// `auto` is bf16 for a frozen base on a GPU that computes in bf16 (CUDA; not wgpu, whose shaders
/// have no bf16), f32 otherwise; an explicit bf16 that the device cannot compute in is an error.
pub fn base_dtype_for<B: Backend>(
    dtype: BaseDtype,
    device: &B::Device,
    frozen: bool,
) -> Result<BaseDtype> {
    let bf16 = B::supports_dtype(device, DType::BF16);
    let resolved = dtype.resolve(!burnish_peft::on_cpu::<B>() && bf16, frozen);
    let computes_in_bf16 = resolved.is_nf4() && !burnish_peft::on_cpu::<B>();
    if (resolved == BaseDtype::Bf16 || computes_in_bf16) && !bf16 {
        bail!(
            "this device ({}) cannot compute in bf16, which a {resolved} base computes in here; \
             use --dtype f32 (`model.dtype = \"f32\"` in a recipe)",
            B::name(device)
        );
    }
    Ok(resolved)
}

/// What the frozen projections' matrix products run on under backend `B` with the base held in
/// `dtype` (resolved), for reports: `cublas-large` is cuBLAS for the products of at least
/// `burnish_peft::cublas::MIN_ROUTED_PRODUCT` multiply-adds, each ordered by the host, and burn's
/// matmul for the rest (CUDA without the `fusion` feature); `cublas-async` cuBLAS from
/// `MIN_STREAM_ORDERED_PRODUCT` on, queued on cubecl's stream (`cublas-async-refused` when that
/// stream could not be found and the host ordered them); `cpu-bf16` the CPU's bf16 kernel.
pub fn product_route<B: Backend>(dtype: BaseDtype) -> &'static str {
    #[cfg(feature = "cuda")]
    if burnish_peft::cublas::routes::<B>() {
        use burnish_peft::cublas::{CudaMatmul, Ordering, cuda_matmul, stream_ordering_refused};
        return match (cuda_matmul(), stream_ordering_refused()) {
            (CudaMatmul::Cublas(Ordering::Stream), None) => "cublas-async",
            (CudaMatmul::Cublas(Ordering::Stream), Some(_)) => "cublas-async-refused",
            _ => "cublas-large",
        };
    }
    if burnish_peft::on_cpu::<B>() && dtype == BaseDtype::Bf16 && burnish_peft::cpu_bf16_available()
    {
        return "cpu-bf16";
    }
    "burn"
}

/// Whether burnish's own GPU kernels (`burnish_peft::gpu_kernel`) run on `B`: on the plain CUDA
/// and wgpu backends unless turned off, for `bench`'s report.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn own_gpu_kernels<B: Backend>() -> bool {
    burnish_peft::gpu_kernel::takes::<B>()
}

/// How `B` reduces a long row (a softmax's maximum and sum), for `bench`'s report: `wide` with
/// cubek's routines for long rows (`burnish_peft::reduce_rows`), `burn` with burn's default.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub fn row_reduction<B: Backend>() -> &'static str {
    if burnish_peft::gpu_kernel::reduces_wide_rows::<B>() {
        "wide"
    } else {
        "burn"
    }
}

/// Without a GPU backend built, every row is reduced by burn's default.
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
#[allow(clippy::extra_unused_type_parameters)] // the signature the GPU builds have
pub fn row_reduction<B: Backend>() -> &'static str {
    "burn"
}

/// Without a GPU backend built, burnish's own GPU kernels run nowhere.
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
#[allow(clippy::extra_unused_type_parameters)] // the signature the GPU builds have
pub fn own_gpu_kernels<B: Backend>() -> bool {
    false
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: Job>(_index: usize, _job: J) -> Result<J::Output> {
    bail!("--device cuda: this burnish was built without CUDA; rebuild with `--features cuda`")
}

#[cfg(feature = "wgpu")]
fn run_wgpu<J: Job>(job: J) -> Result<J::Output> {
    job.run::<burn::backend::Wgpu>(Default::default())
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<J: Job>(_job: J) -> Result<J::Output> {
    bail!("--device wgpu: this burnish was built without wgpu; rebuild with `--features wgpu`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cuda:2".parse(), Ok(DeviceArg::Cuda(2)));
        assert_eq!("cuda".parse(), Ok(DeviceArg::Cuda(0)));
        assert_eq!("cpu".parse(), Ok(DeviceArg::Cpu));
        assert!("tpu".parse::<DeviceArg>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn auto_without_gpu_features_is_cpu() {
        if !cfg!(feature = "cuda") && !cfg!(feature = "wgpu") {
            assert_eq!(resolve(DeviceArg::Auto), DeviceArg::Cpu);
        }
    }
}
