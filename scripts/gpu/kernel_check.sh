#!/usr/bin/env bash
# Whether burnish's GPU kernels compute what the CPU backend does on CUDA, and if not which:
# first burnish-model's kernel tests (each kernel through its module against the CPU's, the
# mismatching positions named; the CUDA source of every kernel compiled in kernel-sources.log.gz);
# then the first bench row (SmolLM2-135M SFT, 8 x 1024, bf16 base, two steps: a loss that turns
# NaN shows at the second) with no kernel, all of them, and each alone (BURNISH_GPU_KERNELS names
# them); then all of them with f32 activations and on the tiny shape, and the fixture scores with
# and without them. Results in OUT (default: gpu-results/), one line per run in kernel-check.txt.
# Run from the repository root on the GPU machine, carrying gpu-bin/ (prepare.sh).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export RUST_BACKTRACE=0
source "$(dirname "$0")/device_env.sh"
export BURNISH_MATMUL=burn

BURNISH_GPU_KERNELS=all CUBECL_DEBUG_LOG="$WORK/kernel-sources.log" CUBECL_DEBUG_OPTION=debug \
  timeout 120 "$MODEL_TESTS" --ignored gpu_kernels on_cuda --test-threads 1 >"$OUT/model-tests.txt" 2>&1
echo "model tests: exit $? ($(grep -c '\.\.\. ok' "$OUT/model-tests.txt") passed)" | tee -a "$OUT/kernel-check.txt"
gzip -c "$WORK/kernel-sources.log" >"$OUT/kernel-sources.log.gz" 2>/dev/null

# run LABEL KERNELS [BENCH ARGS...]: one bench run with BURNISH_GPU_KERNELS=KERNELS.
run() {
  local label=$1 kernels=$2
  shift 2
  local result
  result=$(BURNISH_GPU_KERNELS=$kernels timeout 60 "$BIN" bench --device "$DEVICE" --warmup 1 --steps 1 \
    --json "$@" 2>"$OUT/check-$label.err" | tail -n 1)
  echo "$label: ${result:-failed: $(grep -m 1 -e '^Error' -e 'panicked' "$OUT/check-$label.err")}" |
    tee -a "$OUT/kernel-check.txt"
}

row=(--shape smollm2-135m --mode sft --batch 8 --seq 1024 --dtype bf16)
run none burn "${row[@]}"
run all all "${row[@]}"
for kernel in RmsNormForward RmsNormBackward SwigluForward SwigluBackward \
  CausalSoftmax,CausalSoftmaxBackward; do
  run "$kernel" "$kernel" "${row[@]}"
done
BURNISH_ACTIVATIONS=f32 run all-f32-activations all "${row[@]}"
run all-tiny all --shape tiny --mode sft --batch 2 --seq 64 --dtype bf16

for kernels in burn all; do
  for dtype in f32 bf16; do
    BURNISH_GPU_KERNELS=$kernels timeout 60 "$BIN" score --model tests/fixtures/models/llama \
      --ids 1,17,42,99,5,23,64,128,7,250,31,88,12,199,3,77 --device "$DEVICE" --dtype "$dtype" \
      --json >"$OUT/check-score-$kernels-$dtype.json" 2>>"$OUT/check-score.err"
  done
done
python3 - "$OUT" <<'PY' | tee -a "$OUT/kernel-check.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for dtype in ["f32", "bf16"]:
    try:
        a, b = (json.loads((out / f"check-score-{k}-{dtype}.json").read_text())["logprobs"]
                for k in ["burn", "all"])
        print(f"score llama {dtype}: max |kernels - burn| {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    except (OSError, ValueError, KeyError) as e:
        print(f"score llama {dtype}: missing ({e})")
PY
rm -rf "$WORK"
