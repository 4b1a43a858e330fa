//! The CUDA stream cubecl queues a thread's work on, found so that cuBLAS can queue its
//! products on that same stream: the stream then orders them against cubecl's kernels, and
//! neither the host nor a second stream has to.
//!
//! cubecl keeps its streams private (one per [`StreamId`], modulo the number of streams it
//! keeps, made by its server thread). The driver names the stream of every kernel launch to a
//! CUPTI subscriber, so [`of_this_stream`] subscribes, has cubecl launch one marker kernel of a
//! launch shape nothing else uses, reads the stream from that launch's arguments and
//! unsubscribes. CUPTI (`libcupti`, part of the CUDA toolkit) loads at run time; without it, or
//! where the driver refuses the subscription (another profiler holds it), the caller orders its
//! products by the host instead.

use std::ffi::{CStr, c_void};
use std::ptr;
use std::sync::{Mutex, PoisonError};

use burn::tensor::{DType, Shape};
use cubecl::cuda::CudaRuntime;
use cubecl::future::block_on;
use cubecl::prelude::*;
use cudarc::cupti::sys as cupti;
use cudarc::driver::CudaContext;
use cudarc::driver::sys::{self as driver, CUstream};

use crate::cublas::Cube;

/// The marker's launch shape in cubes (of one unit each), which singles its launch out among
/// those the driver reports while the subscription lasts: no product or element-wise kernel
/// divides its work into 2 × 3 × 1009 cubes.
const MARKER_CUBES: (u32, u32, u32) = (2, 3, 1009);

/// The driver calls whose callbacks are watched: `cuLaunchKernel` (how cubecl launches) and its
/// per-thread-default-stream variant, whose parameters are laid out alike.
const LAUNCHES: [cupti::CUpti_CallbackId; 2] = [
    cupti::CUpti_driver_api_trace_cbid::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32,
    cupti::CUpti_driver_api_trace_cbid::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel_ptsz as u32,
];

/// Writes one; its launch, not its effect, is the point.
#[cube(launch)]
fn marker_kernel(out: &mut Tensor<u32>) {
    if UNIT_POS == 0 {
        out[0] = 1u32;
    }
}

/// The streams of the launches of the marker's shape, as the callback saw them (addresses:
/// streams are pointers).
static SEEN: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// The CUDA stream cubecl queues the work of the current [`StreamId`] on, on `like`'s device,
/// whose primary context is `context`.
/// Takes a CUPTI subscription for the length of one marker launch, so one search runs at a time
/// in the process.
pub(crate) fn of_this_stream(like: &Cube, context: &CudaContext) -> Result<CUstream, String> {
    // SAFETY: only tries to open the library; no symbol is called.
    if !unsafe { cupti::is_culib_present() } {
        return Err(
            "libcupti was not found; add the folder holding it (the CUDA toolkit's \
                    extras/CUPTI/lib64) to LD_LIBRARY_PATH"
                .into(),
        );
    }
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    seen().clear();
    let mut subscriber: cupti::CUpti_SubscriberHandle = ptr::null_mut();
    // SAFETY: `on_launch` matches CUPTI's callback type and reads only the launch callbacks
    // enabled below; the subscription ends before this function returns.
    cupti_call("cuptiSubscribe", unsafe {
        cupti::cuptiSubscribe(&mut subscriber, Some(on_launch), ptr::null_mut())
    })?;
    let watched = LAUNCHES.into_iter().try_for_each(|launch| {
        // SAFETY: `subscriber` is the live subscription made above.
        cupti_call("cuptiEnableCallback", unsafe {
            cupti::cuptiEnableCallback(
                1,
                subscriber,
                cupti::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API,
                launch,
            )
        })
    });
    let launched = watched.and_then(|()| launch_marker(like));
    // SAFETY: ends the subscription made above, whatever happened since.
    let ended = cupti_call("cuptiUnsubscribe", unsafe {
        cupti::cuptiUnsubscribe(subscriber)
    });
    launched?;
    ended?;
    let streams = std::mem::take(&mut *seen());
    let stream = match streams.as_slice() {
        [] => return Err("the driver reported no launch of the marker kernel".into()),
        [first, rest @ ..] if rest.iter().all(|other| other == first) => *first as CUstream,
        _ => {
            return Err(
                "launches of the marker kernel's shape came on several streams: which is \
                 cubecl's for this thread is unknown"
                    .into(),
            );
        }
    };
    in_context(stream, context)?;
    Ok(stream)
}

/// The marker, launched by cubecl on the current stream, and the launch done.
fn launch_marker(like: &Cube) -> Result<(), String> {
    let out = Cube::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::new([1]),
        like.client.empty(DType::U32.size()),
        DType::U32,
    );
    let (x, y, z) = MARKER_CUBES;
    marker_kernel::launch::<CudaRuntime>(
        &out.client,
        CubeCount::Static(x, y, z),
        CubeDim::new_1d(1),
        out.clone().into_tensor_arg(),
    );
    block_on(out.client.sync()).map_err(|e| format!("cubecl's queue failed: {e:?}"))
}

/// CUPTI's callback: notes the stream of a launch of the marker's shape, at the launch's entry.
unsafe extern "C" fn on_launch(
    _userdata: *mut c_void,
    domain: cupti::CUpti_CallbackDomain,
    call: cupti::CUpti_CallbackId,
    data: *const c_void,
) {
    if domain != cupti::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API
        || !LAUNCHES.contains(&call)
    {
        return;
    }
    // SAFETY: the driver's data for a launch call is a `CUpti_CallbackData` whose parameters
    // are `cuLaunchKernel`'s.
    let data = unsafe { &*data.cast::<cupti::CUpti_CallbackData>() };
    if data.callbackSite != cupti::CUpti_ApiCallbackSite::CUPTI_API_ENTER {
        return;
    }
    let params = unsafe { &*data.functionParams.cast::<cupti::cuLaunchKernel_params>() };
    if (params.gridDimX, params.gridDimY, params.gridDimZ) == MARKER_CUBES {
        seen().push(params.hStream as usize);
    }
}

fn seen() -> std::sync::MutexGuard<'static, Vec<usize>> {
    SEEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `stream` belongs to `context` (the device's primary context, the one cuBLAS works in).
fn in_context(stream: CUstream, context: &CudaContext) -> Result<(), String> {
    let mut owner: driver::CUcontext = ptr::null_mut();
    // SAFETY: `stream` is the live stream cubecl launched on, `owner` a place for the answer.
    unsafe { driver::cuStreamGetCtx(stream, &mut owner) }
        .result()
        .map_err(|e| format!("the driver does not know the marker's stream: {e}"))?;
    if owner != context.cu_ctx() {
        return Err("the marker's stream belongs to another context than the device's".into());
    }
    Ok(())
}

/// A CUPTI call's result, its error named.
fn cupti_call(name: &str, result: cupti::CUptiResult) -> Result<(), String> {
    if result == cupti::CUptiResult::CUPTI_SUCCESS {
        return Ok(());
    }
    let mut text: *const std::ffi::c_char = ptr::null();
    // SAFETY: CUPTI points `text` at a static string describing `result`, or leaves it null.
    let described = unsafe { cupti::cuptiGetResultString(result, &mut text) };
    let why = if described == cupti::CUptiResult::CUPTI_SUCCESS && !text.is_null() {
        // SAFETY: a static, NUL-terminated string from CUPTI.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{result:?}")
    };
    Err(format!("CUPTI refused {name}: {why}"))
}
