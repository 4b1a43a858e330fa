# Sourced by the GPU scripts on the GPU machine, from the repository root, with OUT and DEVICE
# set: unpacks the binaries prepare.sh gzipped into WORK (BIN, TESTS and MODEL_TESTS for
# burnish-peft's and burnish-model's tests, and the other builds as $WORK/burnish-<name>; plain
# builds can be named with BURNISH, TESTS and MODEL_TESTS), makes the CUDA
# libraries and headers that load at run time findable, and notes where they were found in
# $OUT/env.txt.
WORK=$(mktemp -d)
for packed in gpu-bin/*.gz; do
  [ -e "$packed" ] || continue
  unpacked="$WORK/$(basename "$packed" .gz)"
  gzip -dc "$packed" >"$unpacked" && chmod +x "$unpacked"
done
BIN=${BURNISH:-$WORK/burnish}
TESTS=${TESTS:-$WORK/peft-tests}
MODEL_TESTS=${MODEL_TESTS:-$WORK/model-tests}
# cuBLAS, CUPTI and NVRTC load at run time, and NVRTC needs the toolkit's headers: make them
# findable, from the toolkit or from the Python packages' copies of its libraries.
if [ -z "${CUDA_PATH:-}" ] && [ ! -d /usr/local/cuda ] && command -v nvcc >/dev/null; then
  export CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")")
fi
for lib in libcublas.so libcupti.so libnvrtc.so; do
  found=$(find "${CUDA_PATH:-/usr/local/cuda}/" /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu/ \
    /opt/torch/.venv/lib/ -name "$lib*" 2>/dev/null | head -n 1)
  [ -n "$found" ] && export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
{
  echo "CUDA_PATH=${CUDA_PATH:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  command -v nvcc
  ls "${CUDA_PATH:-/usr/local/cuda}/include/cuda_bf16.h"
} >"$OUT/env.txt" 2>&1
# Each process would compile the same kernels again: keep cubecl's compiled kernels in a cache
# in the working directory (cubecl reads cubecl.toml there).
[ "$DEVICE" = cuda ] && [ ! -e cubecl.toml ] && printf '[compilation]\ncache = "local"\n' >cubecl.toml
