#!/usr/bin/env bash
# Where a CUDA training step's time goes. One `burnish bench` row timed on the cuBLAS route and
# on burn's matmul, with the process's CPU time beside its wall time (a step bound by the host's
# kernel launches keeps a core busy throughout); the same row at 1 x 128 tokens (a step whose
# time hardly shrinks with 64 times fewer tokens is bound by launches, not by the device's
# arithmetic); then the row under cubecl's per-kernel profiling (each kernel timed on its own,
# with about 15 us of overhead in each time on an H100; cuBLAS's products are not cubecl
# kernels), summed per kernel by kernel_profile.py, the raw log kept as kernels.log.gz (launch
# order: a layer's kernels can be told apart by their place in it).
# Run from the repository root on the GPU machine, carrying gpu-bin/.
#
# SHAPE, MODE, BATCH, SEQ and DTYPE pick the row (default: smollm2-135m SFT, 8 x 1024, bf16);
# BUILD names the binary (plain, or one of prepare.sh's other builds: fusion, tuned); results
# land in OUT (default: gpu-results/). PARTS names the parts to run: timings, profile and
# details (one step with each launch's details); the default is "timings profile";
# side_by_side.sh runs the profile after its bench rows, and the details last.
set -uo pipefail
DEVICE=cuda
OUT=${OUT:-gpu-results}
SHAPE=${SHAPE:-smollm2-135m}
MODE=${MODE:-sft}
BATCH=${BATCH:-8}
SEQ=${SEQ:-1024}
DTYPE=${DTYPE:-bf16}
mkdir -p "$OUT"
export RUST_BACKTRACE=0
source "$(dirname "$0")/device_env.sh"
BUILD=${BUILD:-plain}
PARTS=${PARTS:-timings profile}
[ "$BUILD" = plain ] || BIN=$WORK/burnish-$BUILD
TIMEFORMAT='wall %R s, user %U s, sys %S s'

bench() {
  local batch=$1 seq=$2
  shift 2
  timeout 150 "$BIN" bench --shape "$SHAPE" --mode "$MODE" --batch "$batch" --seq "$seq" \
    --dtype "$DTYPE" --device cuda --json "$@" 2>>"$OUT/bench.err"
}

if [[ $PARTS == *timings* ]]; then
  for matmul in cublas burn; do
    echo "== $SHAPE $MODE $BATCH x $SEQ, $matmul"
    time BURNISH_MATMUL=$matmul bench "$BATCH" "$SEQ" --warmup 3 --steps 10
  done
  echo "== $SHAPE $MODE 1 x 128, cublas"
  bench 1 128 --warmup 3 --steps 10
fi
if [[ $PARTS == *profile* ]]; then
  echo "== kernel profile, $SHAPE $MODE $BATCH x $SEQ, ${BURNISH_MATMUL:-cublas}"
  CUBECL_DEBUG_LOG=stderr CUBECL_DEBUG_OPTION=profile timeout 150 "$BIN" bench --shape "$SHAPE" \
    --mode "$MODE" --batch "$BATCH" --seq "$SEQ" --dtype "$DTYPE" --device cuda --json \
    --warmup 1 --steps 2 >/dev/null 2>"$WORK/kernels.log"
  grep -c '' "$WORK/kernels.log"
  python3 "$(dirname "$0")/kernel_profile.py" "$WORK/kernels.log" 3 60 >"$OUT/kernels.txt"
  head -n 30 "$OUT/kernels.txt"
  gzip -c "$WORK/kernels.log" >"$OUT/kernels.log.gz"
fi
# One step again, each launch logged with its details (the layouts of its operands, their
# rank and type, its cube count: what tells a copy of a layer's scores from one of a LoRA
# factor), as kernels-full.log.gz.
if [[ $PARTS == *details* ]]; then
  echo "== kernel profile with each launch's details, $SHAPE $MODE $BATCH x $SEQ, one step"
  CUBECL_DEBUG_LOG=stderr CUBECL_DEBUG_OPTION=profile-full timeout 150 "$BIN" bench \
    --shape "$SHAPE" --mode "$MODE" --batch "$BATCH" --seq "$SEQ" --dtype "$DTYPE" \
    --device cuda --json --warmup 0 --steps 1 >/dev/null 2>"$WORK/kernels-full.log"
  grep -c '^|' "$WORK/kernels-full.log"
  gzip -c "$WORK/kernels-full.log" >"$OUT/kernels-full.log.gz"
fi
rm -rf "$WORK"
