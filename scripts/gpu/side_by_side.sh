#!/usr/bin/env bash
# One prepared device run: the CUDA build's scores against the CPU's on the fixture models, then
# `burnish bench` and the transformers + PEFT peer (peer_lora.py) side by side on the same card,
# with a ratio table at the end. Run from the repository root.
#
# On the development machine (the GPU machine has no Rust toolchain):
#   cargo build --release --features cuda
#   mkdir -p gpu-bin && cp target/release/burnish ../shared/bench/peer_lora.py gpu-bin/
# then on the GPU machine, carrying gpu-bin/:
#   scripts/gpu/side_by_side.sh            # results under $OUT (default: gpu-results/)
#
# DEVICE=cpu PLAN=quick DTYPE=f32 runs the same flow on the CPU with the peer's tiny shape (a dry
# run of the script itself). Each command has its own time limit, so one hang cannot eat the device time.
set -uo pipefail

BIN=${BURNISH:-gpu-bin/burnish}
PEER=${PEER:-gpu-bin/peer_lora.py}
DEVICE=${DEVICE:-cuda}
PLAN=${PLAN:-full}
DTYPE=${DTYPE:-bf16} # the base's precision in the bench rows (the peer holds its model in bf16)
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export RUST_BACKTRACE=0
log() { echo "== $* ($(date +%T))"; }

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/card.csv"
fi

log "parity: burnish score on the fixture models, $DEVICE (f32 and bf16) against cpu (f32)"
IDS=1,17,42,99,5,23,64,128,7,250,31,88,12,199,3,77
for model in llama mistral qwen2; do
  for run in "cpu f32" "$DEVICE f32" "$DEVICE bf16"; do
    read -r dev dtype <<<"$run"
    name="score-$model-$dev-$dtype"
    timeout 180 "$BIN" score --model "tests/fixtures/models/$model" --ids "$IDS" --device "$dev" \
      --dtype "$dtype" --json >"$OUT/$name.json" 2>"$OUT/$name.err" ||
      echo "score $model on $dev in $dtype failed: see $OUT/$name.err"
  done
done

if [ "$PLAN" = quick ]; then
  plan=("tiny sft 2 64" "tiny dpo 2 64")
  peer_args=(quick)
else
  plan=("smollm2-135m sft 8 1024" "smollm2-135m dpo 4 1024" "smollm2-360m sft 8 1024"
    "smollm2-360m dpo 4 1024" "tinyllama-1.1b sft 8 1024" "tinyllama-1.1b dpo 4 1024")
  peer_args=()
fi

log "burnish bench on $DEVICE, base in $DTYPE"
: >"$OUT/ours.jsonl"
for row in "${plan[@]}"; do
  read -r shape mode batch seq <<<"$row"
  timeout 240 "$BIN" bench --shape "$shape" --mode "$mode" --batch "$batch" --seq "$seq" \
    --dtype "$DTYPE" --warmup 3 --steps 10 --device "$DEVICE" --json \
    >>"$OUT/ours.jsonl" 2>>"$OUT/ours.err" ||
    echo "{\"shape\": \"$shape\", \"mode\": \"$mode\", \"batch\": $batch, \"seq\": $seq, \"error\": \"exit $?\"}" \
      >>"$OUT/ours.jsonl"
done

log "peer: transformers + PEFT"
DEV=$DEVICE timeout 420 python3 "$PEER" "${peer_args[@]}" >"$OUT/peer.txt" 2>"$OUT/peer.err" ||
  echo "peer failed or timed out: see $OUT/peer.err"

log "summary"
python3 "$(dirname "$0")/summary.py" "$OUT" "$DEVICE" | tee "$OUT/summary.txt"
