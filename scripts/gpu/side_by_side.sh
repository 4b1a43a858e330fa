#!/usr/bin/env bash
# One prepared device run, most important first, inside a time budget. First the checks, each
# deciding what the rows run on: the cuBLAS route against the exact product and burn's matmul,
# with each product queued on cubecl's own stream and ordered by the host; the routines that
# reduce long rows; burnish's GPU kernels against the CPU's. Then `burnish bench` on the best
# of what passed (the stream-ordered route, burnish's kernels) and the transformers + PEFT peer
# (peer_lora.py, run by peer_reserved.py to add torch's reserved memory) side by side on the
# card: the first rows, the CUDA build's scores against the CPU's on the fixture models, the
# larger shapes; QLoRA's NF4 base (checked against the CPU, then the first rows over it); each
# of the first SFT row's alternatives on its own (the other cuBLAS ordering, checked or not
# unless its check hung; burn's ops in place of burnish's kernels; rows packed with four
# documents, as the SFT recipes pack them); a kernel profile of the
# first row; the quickstart recipe trained end to end; the first row with f32 activations
# under the bf16 base, and on burn's matmul alone (the cuBLAS route's gain); the same rows and
# scores from the build with burn's fusion backend and, when prepare.sh made it (TUNED=1), with
# fusion and autotuning; the first rows with activation checkpointing; one step profiled with
# each kernel launch's details. A ratio table closes it; autotune.txt lists the kernels the
# tuned build chose. Run from the repository root.
#
# On the development machine (the GPU machine has no Rust toolchain):
#   scripts/gpu/prepare.sh                 # fills gpu-bin/
# then on the GPU machine, carrying gpu-bin/:
#   scripts/gpu/side_by_side.sh            # results under $OUT (default: gpu-results/)
#
# BUDGET (seconds, default 540) bounds the whole run: each step has its own time limit, and a
# step that no longer fits is skipped and named; WARMUP and STEPS set each bench row's untimed
# and timed steps (3 and 10); TUNE_LEVEL the tuned build's autotuning effort (minimal).
# DEVICE=cpu PLAN=quick DTYPE=f32 runs the same flow on the CPU with the peer's tiny shape (a dry
# run of the script itself).
set -uo pipefail

DEVICE=${DEVICE:-cuda}
PLAN=${PLAN:-full}
DTYPE=${DTYPE:-bf16} # the base's precision in the bench rows (the peer holds its model in bf16)
OUT=${OUT:-gpu-results}
BUDGET=${BUDGET:-540}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
TUNE_LEVEL=${TUNE_LEVEL:-minimal} # cubecl's autotuning effort in the tuned build
mkdir -p "$OUT"
export RUST_BACKTRACE=0
START=$SECONDS
log() { echo "== $* ($((SECONDS - START)) s)"; }

# The binaries, the libraries they load at run time, and cubecl's kernel cache.
source "$(dirname "$0")/device_env.sh"
PEER=${PEER:-gpu-bin/peer_lora.py}

# step LIMIT NAME COMMAND...: runs COMMAND under min(LIMIT, what is left of the budget), or
# skips it when less than 20 s would be left for it.
step() {
  local limit=$1 name=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "skipped (budget spent): $name" >>"$OUT/skipped.txt"
    echo "skipped (budget spent): $name" >&2
    return 124
  fi
  timeout "$limit" "$@"
}

cp gpu-bin/commit "$OUT/commit.txt" 2>/dev/null || echo "gpu-bin/commit missing: the binaries' commit is unknown"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/card.csv"
fi

# bench ENV_MATMUL SHAPE MODE BATCH SEQ LIMIT: one `burnish bench` row appended to ours.jsonl,
# run by $BENCH_BIN (default: the plain build), with $BENCH_FLAGS added (default: none).
bench() {
  local matmul=$1 shape=$2 mode=$3 batch=$4 seq=$5 limit=$6 bin=${BENCH_BIN:-$BIN}
  BURNISH_MATMUL=$matmul step "$limit" "bench $shape $mode $matmul $(basename "$bin") ${BENCH_FLAGS:-}" "$bin" bench --shape "$shape" \
    --mode "$mode" --batch "$batch" --seq "$seq" --dtype "$DTYPE" --warmup "$WARMUP" --steps "$STEPS" \
    --device "$DEVICE" ${BENCH_FLAGS:-} --json >>"$OUT/ours.jsonl" 2>>"$OUT/ours.err" ||
    echo "{\"shape\": \"$shape\", \"mode\": \"$mode\", \"batch\": $batch, \"seq\": $seq, \"matmul\": \"$matmul\", \"error\": \"exit $?\"}" \
      >>"$OUT/ours.jsonl"
}

if [ "$PLAN" = quick ]; then
  first=("tiny sft 2 64" "tiny dpo 2 64")
  rest=()
  peer_args=(quick)
else
  first=("smollm2-135m sft 8 1024" "smollm2-135m dpo 4 1024")
  rest=("smollm2-360m sft 8 1024" "smollm2-360m dpo 4 1024" "tinyllama-1.1b sft 8 1024"
    "tinyllama-1.1b dpo 4 1024")
  peer_args=()
fi
: >"$OUT/ours.jsonl"
# The token ids the parity checks score.
IDS=1,17,42,99,5,23,64,128,7,250,31,88,12,199,3,77

# The route the bench rows take: cuBLAS on cubecl's stream when its checks pass (a hang shows
# as its step's timeout); else cuBLAS ordered by the host when its checks pass (checked only
# then: they spend most of their time on exact products on the host, and the host's ordering
# passed on an H100 on 2026-11-28); else burn's matmul, so that the run still measures
# something. The first row is timed on a checked cuBLAS ordering the rows do not take, so that
# a failed check still leaves the route's time on record.
ROUTE=burn
passed=()
hung=()
if [ "$DEVICE" = cuda ]; then
  log "cuBLAS route against the exact product and burn's matmul, on cubecl's stream then host-ordered (burnish-peft's tests)"
  for ordering in stream host; do
    [ $ordering = host ] && matmul=cublas || matmul=cublas-async
    [ $ordering = host ] && [ "${passed[*]}" = cublas-async ] && break
    BURNISH_MATMUL=$matmul step 90 "cublas $ordering tests" "$TESTS" --ignored "cublas_$ordering" \
      --test-threads 1 >"$OUT/cublas-$ordering-tests.txt" 2>&1
    status=$?
    echo "exit $status" >>"$OUT/cublas-$ordering-tests.txt"
    tail -n 3 "$OUT/cublas-$ordering-tests.txt"
    [ "$status" = 0 ] && passed+=("$matmul")
    [ "$status" = 124 ] && hung+=("$matmul")
  done
  for matmul in cublas-async cublas; do
    [[ " ${passed[*]} " == *" $matmul "* ]] && ROUTE=$matmul && break
  done
  echo "the bench rows take the route $ROUTE"
  # Long rows reduced by cubek's routines for them (burnish_peft::reduce_rows, on by default)
  # against the CPU's reductions: when they fail, every row takes burn's default reductions.
  log "reductions of long rows against the CPU's (burnish-peft's tests)"
  step 60 "wide row reduction tests" "$TESTS" --ignored wide_row_reduction --test-threads 1 \
    >"$OUT/wide-row-reduction-tests.txt" 2>&1
  status=$?
  echo "exit $status" >>"$OUT/wide-row-reduction-tests.txt"
  tail -n 3 "$OUT/wide-row-reduction-tests.txt"
  if [ "$status" != 0 ]; then
    export BURNISH_GPU_KERNELS=burn
    echo "the long rows' reductions failed their check: every row takes burn's"
  fi
  # burnish's own GPU kernels (RMSNorm, SwiGLU, the attention's causal softmax), off on CUDA
  # by default since they computed wrong values there (burn pads CUDA buffers' rows; their
  # outputs now have none): burnish-model's checks of them against the CPU. When they pass,
  # every row takes them, and the first SFT row is timed without them too (what they gain);
  # when they fail, scripts/gpu/kernel_check.sh tells which is wrong. Every kernel by name, so
  # that the long rows' routines stay off when their check failed.
  kernels=all
  [ "${BURNISH_GPU_KERNELS:-}" = burn ] &&
    kernels=RmsNormForward,RmsNormBackward,SwigluForward,SwigluBackward,CausalSoftmax,CausalSoftmaxBackward
  log "burnish's GPU kernels against the CPU's (burnish-model's tests)"
  BURNISH_GPU_KERNELS=$kernels step 90 "gpu kernel tests" "$MODEL_TESTS" --ignored on_cuda \
    --test-threads 1 >"$OUT/gpu-kernels-tests.txt" 2>&1
  status=$?
  echo "exit $status" >>"$OUT/gpu-kernels-tests.txt"
  tail -n 3 "$OUT/gpu-kernels-tests.txt"
  if [ "$status" = 0 ]; then
    # Unset again for the row without them: the default (the long rows' routines alone), or
    # none where those failed.
    KERNELS_OFF=${BURNISH_GPU_KERNELS:-}
    export BURNISH_GPU_KERNELS=$kernels
    echo "burnish's GPU kernels passed their check: every row takes them"
  else
    echo "burnish's GPU kernels failed their check: the rows leave their work to burn's ops"
  fi
fi

log "burnish bench on $DEVICE, base in $DTYPE, matmul $ROUTE"
for row in "${first[@]}"; do bench $ROUTE $row 150; done
# Kernels that pass their checks could still fail a training step (a non-finite loss): then the
# rows go back to burn's ops, and the first rows run again.
if [ -n "${KERNELS_OFF+set}" ] && tail -n "${#first[@]}" "$OUT/ours.jsonl" | grep -q '"error"'; then
  echo "a row failed with burnish's GPU kernels: the rows leave their work to burn's ops again"
  export BURNISH_GPU_KERNELS=$KERNELS_OFF
  unset KERNELS_OFF
  for row in "${first[@]}"; do bench $ROUTE $row 150; done
fi

log "peer: transformers + PEFT"
DEV=$DEVICE step 240 "peer" python3 "$(dirname "$0")/peer_reserved.py" "$PEER" "${peer_args[@]}" \
  >"$OUT/peer.txt" 2>"$OUT/peer.err" ||
  echo "peer failed or timed out: see $OUT/peer.err"

# On the bench rows' route: on cubecl's stream every f32 product takes cuBLAS in full f32.
log "parity: burnish score on the fixture models, $DEVICE (f32 and bf16, matmul $ROUTE) against cpu (f32)"
for model in llama mistral qwen2; do
  for run in "cpu f32" "$DEVICE f32" "$DEVICE bf16"; do
    read -r dev dtype <<<"$run"
    name="score-$model-$dev-$dtype"
    BURNISH_MATMUL=$ROUTE step 60 "$name" "$BIN" score --model "tests/fixtures/models/$model" --ids "$IDS" --device "$dev" \
      --dtype "$dtype" --json >"$OUT/$name.json" 2>"$OUT/$name.err" ||
      echo "score $model on $dev in $dtype failed: see $OUT/$name.err"
  done
done

log "burnish bench, larger shapes"
for row in "${rest[@]}"; do bench $ROUTE $row 120; done

# QLoRA's 4-bit base: its products and gradients against the CPU's, its weights read back by
# burnish's kernel (Nf4Dequantize), then the first rows over it, taking that kernel where it
# passed (the peer's rows hold a bf16 base; compare with ours above for what NF4 saves and
# costs).
if [ "$DEVICE" = cuda ]; then
  log "NF4 products and gradients against the CPU's (burnish-peft's tests), with its kernel"
  BURNISH_GPU_KERNELS=Nf4Dequantize step 60 "nf4 tests" "$TESTS" --ignored nf4_on_cuda \
    --test-threads 1 >"$OUT/nf4-tests.txt" 2>&1
  status=$?
  echo "exit $status" >>"$OUT/nf4-tests.txt"
  tail -n 3 "$OUT/nf4-tests.txt"
  nf4_kernels=${BURNISH_GPU_KERNELS:-}
  if [ "$status" = 0 ]; then
    case "$nf4_kernels" in
      all) ;;
      "") nf4_kernels=WideRowReduction,Nf4Dequantize ;;
      burn) nf4_kernels=Nf4Dequantize ;;
      *) nf4_kernels=$nf4_kernels,Nf4Dequantize ;;
    esac
  fi
  log "burnish bench, the first rows over a 4-bit NF4 base (kernels: ${nf4_kernels:-default})"
  for row in "${first[@]}"; do
    BURNISH_GPU_KERNELS=$nf4_kernels DTYPE=nf4 bench $ROUTE $row 150
  done
fi

# The first SFT row's alternatives, one at a time: the cuBLAS ordering the rows do not take,
# and burn's ops in place of burnish's GPU kernels.
if [ "$DEVICE" = cuda ]; then
  for matmul in cublas cublas-async; do
    [ "$matmul" = "$ROUTE" ] && continue
    # An ordering whose checks ran out of time (a hang) would spend the row's whole limit.
    [[ " ${hung[*]} " == *" $matmul "* ]] && continue
    # An ordering left unchecked (the host's, when the stream's passed) is not timed.
    [ "$matmul" = cublas ] && ordering=host || ordering=stream
    [ -e "$OUT/cublas-$ordering-tests.txt" ] || continue
    [[ " ${passed[*]} " == *" $matmul "* ]] && verdict="checks passed" || verdict="checks failed"
    log "burnish bench, the first row on $matmul ($verdict)"
    bench $matmul ${first[0]} 150
  done
fi
if [ -n "${KERNELS_OFF+set}" ]; then
  log "burnish bench, the first row without burnish's GPU kernels (what they gain)"
  BURNISH_GPU_KERNELS=$KERNELS_OFF bench $ROUTE ${first[0]} 150
fi
# Rows packed as the SFT recipes pack them (train.pack): four documents a row, whose attention
# takes the kernels from each query's first key (or burn's ops and a mask without them).
log "burnish bench, the first row packed with four documents a row"
BENCH_FLAGS="--documents 4" bench $ROUTE ${first[0]} 150

# Where the first row's time goes now: cubecl's per-kernel times for the plain build
# (kernels.txt; the raw log as kernels.log.gz).
if [ "$DEVICE" = cuda ]; then
  log "kernel profile of the first SFT row"
  step 90 "kernel profile" env PARTS=profile BURNISH_MATMUL=$ROUTE OUT="$OUT" BURNISH="$BIN" \
    "$(dirname "$0")/kernel_profile.sh" >"$OUT/profile.txt" 2>&1
  head -n 12 "$OUT/profile.txt"
fi

log "end to end: the quickstart recipe trained on $DEVICE, matmul $ROUTE (the CPU gets 0/48 -> 48/48)"
BURNISH_MATMUL=$ROUTE step 90 "quickstart" "$BIN" train recipes/quickstart.toml --device "$DEVICE" \
  --set output.dir="$OUT/quickstart-run" >"$OUT/quickstart.txt" 2>"$OUT/quickstart.err" ||
  echo "quickstart on $DEVICE failed: see $OUT/quickstart.err"
grep "exact match" "$OUT/quickstart.txt"

# The first row with the activations kept in f32 under the bf16 base (as before bf16
# activations): what they gain, and a measurement should bf16 activations fail on the card.
if [ "$DEVICE" = cuda ] && [ "$DTYPE" = bf16 ]; then
  log "burnish bench, f32 activations under the bf16 base"
  BURNISH_ACTIVATIONS=f32 bench $ROUTE ${first[0]} 150
fi

if [ "$ROUTE" != burn ]; then
  log "burnish bench on burn's matmul (the cuBLAS route's gain)"
  bench burn ${first[0]} 150
fi

# The other builds on the first rows, and their scores: burn's fusion backend, then fusion with
# cubecl's autotuning at level $TUNE_LEVEL (its first step of each shape times the candidate
# kernels: the row's wall time, logged, holds that cost; the tuned choices are cached on disk).
for variant in fusion tuned; do
  bin=$WORK/burnish-$variant
  [ -x "$bin" ] || continue
  log "burnish bench, the $variant build"
  for row in "${first[@]}"; do
    began=$SECONDS
    CUBECL_AUTOTUNE_LEVEL=$TUNE_LEVEL BENCH_BIN=$bin bench $ROUTE $row 300
    echo "$variant $row: $((SECONDS - began)) s wall, warm-up included"
  done
  for model in llama qwen2; do
    for dtype in f32 bf16; do
      name="score-$model-$DEVICE-$variant-$dtype"
      CUBECL_AUTOTUNE_LEVEL=$TUNE_LEVEL step 60 "$name" "$bin" score \
        --model "tests/fixtures/models/$model" --ids "$IDS" --device "$DEVICE" --dtype "$dtype" \
        --json >"$OUT/$name.json" 2>"$OUT/$name.err" ||
        echo "score $model, $variant build, in $dtype failed: see $OUT/$name.err"
    done
  done
done

# The tuned build's choices (cubecl caches them under target/autotune): which kernel won each
# product and reduction, and by how much.
if [ -d target/autotune ]; then
  cp -r target/autotune "$OUT/"
  python3 "$(dirname "$0")/autotune_summary.py" target/autotune >"$OUT/autotune.txt" 2>&1
fi

log "burnish bench with the layers recomputed in the backward pass (train.gradient_checkpointing)"
for row in "${first[@]}"; do BENCH_FLAGS=--gradient-checkpointing bench $ROUTE $row 150; done

# Last, one step of the first SFT row with each kernel launch's details (kernels-full.log.gz),
# to tell which tensors the profile's copies and casts are of.
if [ "$DEVICE" = cuda ]; then
  log "kernel profile with each launch's details, one step of the first SFT row"
  step 60 "kernel details" env PARTS=details BURNISH_MATMUL=$ROUTE OUT="$OUT" BURNISH="$BIN" \
    "$(dirname "$0")/kernel_profile.sh" >"$OUT/profile-details.txt" 2>&1
fi

log "summary"
python3 "$(dirname "$0")/summary.py" "$OUT" "$DEVICE" | tee "$OUT/summary.txt"
rm -rf "$WORK"
