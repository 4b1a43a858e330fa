#!/usr/bin/env bash
# Builds what a GPU run needs into gpu-bin/ (git-ignored), on the development machine: the GPU
# machine has no Rust toolchain. The CUDA binary, the same with burn's fusion backend (the
# `fusion` feature, measured side by side), the test binary holding the cuBLAS checks, and the
# peer script, stripped and gzipped so that together they fit a device run's 64 MiB carry.
# Then run scripts/gpu/side_by_side.sh on the GPU machine, carrying gpu-bin/.
set -euo pipefail
cd "$(dirname "$0")/../.."

rm -rf gpu-bin && mkdir gpu-bin
cargo build --release --features cuda,fusion -p burnish
strip -o gpu-bin/burnish-fusion target/release/burnish
cargo build --release --features cuda -p burnish
strip -o gpu-bin/burnish target/release/burnish
tests=$(cargo test --release -p burnish-peft --features cuda --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')

strip -o gpu-bin/peft-tests "$tests"
gzip -9 gpu-bin/burnish gpu-bin/burnish-fusion gpu-bin/peft-tests
cp ../shared/bench/peer_lora.py gpu-bin/
du -b gpu-bin/* | awk '{ print; total += $1 } END {
  printf "total %.1f MiB\n", total / 2^20; if (total > 64 * 2^20) { print "over the 64 MiB carry"; exit 1 } }'
