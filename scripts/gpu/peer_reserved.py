"""Runs the peer (peer_lora.py, loaded as a module) on the rows its own main runs, and adds to
each row torch's peak *reserved* memory (its caching allocator's pools) beside the peak allocated
one the peer reports. burnish's device memory column is the driver's count, cubecl's pools
included, so the reserved figure is the one it compares with.

Usage: peer_reserved.py PEER_LORA_PY [quick]   (DEV=cpu runs on the CPU, where both are 0)
Prints the peer's JSON lines, each row followed by the same row with `peak_reserved_gib`."""
import importlib.util
import json
import sys

import torch

spec = importlib.util.spec_from_file_location("peer_lora", sys.argv[1])
peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
on_cuda = peer.DEV == "cuda"

# The peer's own plan (its `__main__`), without the eager-attention row.
plan = [("smollm2-135m", "sft", 8, 1024), ("smollm2-135m", "dpo", 4, 1024),
        ("smollm2-360m", "sft", 8, 1024), ("smollm2-360m", "dpo", 4, 1024),
        ("tinyllama-1.1b", "sft", 8, 1024), ("tinyllama-1.1b", "dpo", 4, 1024)]
if sys.argv[2:] == ["quick"]:
    plan = [("tiny", "sft", 2, 64), ("tiny", "dpo", 2, 64)]

if on_cuda:
    print(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                          matmul_bf16_tflops=round(peer.matmul_peak(), 1))), flush=True)
for shape, mode, batch, seq in plan:
    try:
        row = peer.bench(shape, mode, batch, seq)
    except Exception as e:  # one out-of-memory row must not lose the others
        print(json.dumps(dict(plan=[shape, mode, batch, seq], error=repr(e)[:300])), flush=True)
        if on_cuda:
            torch.cuda.empty_cache()
        continue
    # bench() reset the peak statistics after its warm-up, so this peak is its timed steps'.
    reserved = torch.cuda.max_memory_reserved() / 2**30 if on_cuda else 0
    print(json.dumps(dict(row, peak_reserved_gib=round(reserved, 2))), flush=True)
