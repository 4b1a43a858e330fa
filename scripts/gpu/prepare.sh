#!/usr/bin/env bash
# Builds what a GPU run needs into gpu-bin/ (git-ignored), on the development machine: the GPU
# machine has no Rust toolchain. The CUDA binary; with FUSION=1 the same with burn's fusion
# backend (the `fusion` feature: off by default since on an H100 it timed within 0.3% of the
# plain build on the SmolLM2-135M rows, 2026-11-28, and costs a second build and carry); with
# TUNED=1 also one with fusion and cubecl's autotuning (`autotune`: off by default since its first SmolLM2 row did not finish in
# 150 s at `minimal` on an H100, 2026-11-27, a tenth of a run's device time); the test binaries
# holding the cuBLAS checks and the GPU kernels'; and the peer script, all stripped and gzipped
# so that together they fit a device run's 64 MiB carry.
# Then run scripts/gpu/side_by_side.sh on the GPU machine, carrying gpu-bin/.
set -euo pipefail
cd "$(dirname "$0")/../.."

rm -rf gpu-bin && mkdir gpu-bin
# name=features: gpu-bin/burnish-<name> (gpu-bin/burnish for the plain build, built last so that
# target/release/burnish stays the plain CUDA build).
builds=(plain=cuda)
[ "${FUSION:-0}" = 1 ] && builds=(fusion=cuda,fusion "${builds[@]}")
[ "${TUNED:-0}" = 1 ] && builds=(tuned=cuda,fusion,autotune "${builds[@]}")
for build in "${builds[@]}"; do
  name=${build%%=*}
  cargo build --release --features "${build#*=}" -p burnish
  binary=gpu-bin/burnish-$name
  [ "$name" = plain ] && binary=gpu-bin/burnish
  strip -o "$binary" target/release/burnish
done
# The library test binary of a package built with CUDA.
test_binary() {
  cargo test --release -p "$1" --features cuda --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])'
}
strip -o gpu-bin/peft-tests "$(test_binary burnish-peft)"
strip -o gpu-bin/model-tests "$(test_binary burnish-model)"
# Only binaries are in gpu-bin/ so far.
gzip -9 gpu-bin/*
cp ../shared/bench/peer_lora.py gpu-bin/
# The commit built (with "-dirty" for uncommitted changes), which side_by_side.sh records.
git describe --always --dirty >gpu-bin/commit
du -b gpu-bin/* | awk '{ print; total += $1 } END {
  printf "total %.1f MiB\n", total / 2^20; if (total > 64 * 2^20) { print "over the 64 MiB carry"; exit 1 } }'
