"""Whether the CUDA driver takes the stream memory operations that order burnish's cuBLAS
products on the device (cuStreamWaitValue32 and cuStreamWriteValue32, burnish-peft's
`device_order`), on memory from cuMemAlloc and on memory from the stream-ordered pool
(cuMemAllocAsync, where cubecl allocates its buffers). On an H100 (driver 580, 2026-11-28) the
driver refused them on cubecl's buffer with CUDA_ERROR_INVALID_VALUE; this tells whether the
pool's memory is the cause. Needs only the driver's libcuda (no toolkit, no Rust); prints one
line per check. Usage: python3 stream_memop_probe.py"""
import ctypes

cuda = ctypes.CDLL("libcuda.so.1")
CU_STREAM_NON_BLOCKING = 1
CU_STREAM_WAIT_VALUE_EQ = 1
CU_STREAM_WRITE_VALUE_DEFAULT = 0
ATTRIBUTES = {"can_use_stream_mem_ops": 92, "memory_pools_supported": 115}


def call(name, *args):
    """The CUresult of driver function `name`, with its name when it is an error."""
    result = getattr(cuda, name)(*args)
    if result == 0:
        return "ok"
    text = ctypes.c_char_p()
    cuda.cuGetErrorName(result, ctypes.byref(text))
    return f"{text.value.decode()} ({result})"


def ordered(label, address, stream):
    """The wait and the write on `address` (two u32 counters at zero), then a sync."""
    for name, args in [
        ("cuStreamWaitValue32_v2", (address, ctypes.c_uint32(0), CU_STREAM_WAIT_VALUE_EQ)),
        ("cuStreamWriteValue32_v2", (ctypes.c_uint64(address.value + 4), ctypes.c_uint32(0),
                                     CU_STREAM_WRITE_VALUE_DEFAULT)),
        ("cuStreamSynchronize", ()),
    ]:
        print(f"{label}: {name}: {call(name, stream, *args)}", flush=True)


def main():
    device, context, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
    print("cuInit:", call("cuInit", 0))
    print("cuDeviceGet:", call("cuDeviceGet", ctypes.byref(device), 0))
    print("primary context:", call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device))
    print("cuCtxSetCurrent:", call("cuCtxSetCurrent", context))
    for name, attribute in ATTRIBUTES.items():
        value = ctypes.c_int(-1)
        result = call("cuDeviceGetAttribute", ctypes.byref(value), attribute, device)
        print(f"attribute {name}: {value.value} ({result})")
    print("cuStreamCreate:", call("cuStreamCreate", ctypes.byref(stream), CU_STREAM_NON_BLOCKING))
    plain, pooled = ctypes.c_uint64(), ctypes.c_uint64()
    print("cuMemAlloc:", call("cuMemAlloc_v2", ctypes.byref(plain), ctypes.c_size_t(512)))
    print("cuMemsetD32:", call("cuMemsetD32_v2", plain, ctypes.c_uint(0), ctypes.c_size_t(2)))
    ordered("cuMemAlloc memory", plain, stream)
    print("cuMemAllocAsync:",
          call("cuMemAllocAsync", ctypes.byref(pooled), ctypes.c_size_t(512), stream))
    print("cuMemsetD32Async:",
          call("cuMemsetD32Async", pooled, ctypes.c_uint(0), ctypes.c_size_t(2), stream))
    print("cuStreamSynchronize:", call("cuStreamSynchronize", stream))
    ordered("pool memory", pooled, stream)


main()
