"""Summarises a side_by_side.sh run: score parity of DEVICE against the CPU, and burnish's bench
against the transformers + PEFT peer, row by row. Usage: summary.py RESULTS_DIR DEVICE"""
import json
import pathlib
import sys

out, device = pathlib.Path(sys.argv[1]), sys.argv[2]
F32_BOUND = 1e-3  # |Δ logprob| of DEVICE in f32 against the CPU in f32
BF16_RELATIVE = 2e-2  # |Δ logprob| / |logprob| of DEVICE with a bf16 base against the CPU in f32


def logprobs(model, dev, dtype):
    return json.loads((out / f"score-{model}-{dev}-{dtype}.json").read_text())["logprobs"]


print(f"score parity against the CPU in f32 (max |Δ logprob|; bounds {F32_BOUND} in f32, "
      f"{BF16_RELATIVE:.0%} relative with a bf16 base):")
for build in ["", "-fusion", "-tuned"]:
    for model in ["llama", "mistral", "qwen2"]:
        name = f"{model}{build}"
        try:
            cpu = logprobs(model, "cpu", "f32")
            f32 = logprobs(model, f"{device}{build}", "f32")
            bf16 = logprobs(model, f"{device}{build}", "bf16")
        except (OSError, ValueError, KeyError) as e:
            if not build:
                print(f"  {name:15} missing: {e}")
            continue
        worst = max(abs(a - b) for a, b in zip(cpu, f32))
        worst_rel = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(cpu, bf16))
        ok = len(cpu) == len(f32) == len(bf16) and worst <= F32_BOUND and worst_rel <= BF16_RELATIVE
        print(f"  {name:15} f32 {worst:.2e}  bf16 {worst_rel:.2%} relative  {'ok' if ok else 'OVER'}")


def json_lines(path):
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


ours = json_lines(out / "ours.jsonl")
peer = {(r["shape"], r["mode"], r["B"], r["T"]): r
        for r in json_lines(out / "peer.txt") if r.get("attn") == "sdpa"}
card = json_lines(out / "peer.txt")[:1]
if card and "device" in card[0]:
    print(f"\ncard: {card[0]['device']}, torch {card[0]['torch']}, "
          f"bf16 matmul {card[0]['matmul_bf16_tflops']} TFLOP/s")

for checks in ["cublas-host", "cublas-stream", "wide-row-reduction", "gpu-kernels", "nf4"]:
    tests = out / f"{checks}-tests.txt"
    if tests.exists():
        results = [l for l in tests.read_text().splitlines()
                   if l.startswith(("test result:", "exit "))]
        print(f"\n{checks} checks: {'; '.join(results) or 'no result line'}")


def row(key, o, p):
    ratio = (o["tokens_per_s"] / p["tokens_per_s"]) if "tokens_per_s" in o and p else None
    mem = o.get("peak_memory_bytes")
    matmul = o.get("matmul", "—") + ("+fusion" if "fusion" in o.get("backend", "") else "")
    matmul += "+tuned" if o.get("autotune") else ""
    matmul += "+recomputed" if o.get("gradient_checkpointing") else ""
    # Rows packed with several documents (bench --documents N).
    matmul += f"+packed{o['documents']}" if o.get("documents", 1) > 1 else ""
    # A bf16 base whose activations were kept in f32 (BURNISH_ACTIVATIONS=f32).
    matmul += "+f32act" if o.get("dtype") == "bf16" and o.get("activations") == "f32" else ""
    # QLoRA's 4-bit base (bench --dtype nf4).
    matmul += "+nf4" if o.get("dtype") == "nf4" else ""
    # burnish's own GPU kernels in place of burn's ops (on CUDA: BURNISH_GPU_KERNELS=all).
    matmul += "+gpukernels" if o.get("gpu_kernels") else ""
    # cubek's routines for long rows in place of burn's default reductions (the default on
    # both GPU backends; BURNISH_GPU_KERNELS=burn turns them off).
    matmul += "+widereduce" if o.get("row_reduction") == "wide" else ""
    print(f"{key[0]:16} {key[1]:4} {key[2]:<2} {key[3]:<5} {matmul:20}"
          f"{round(o['step_ms'], 1) if 'step_ms' in o else o.get('error', '—'):<9} "
          f"{str(p.get('step_ms', '—')):<9} "
          f"{str(round(o['tokens_per_s'])) if 'tokens_per_s' in o else '—':<11} "
          f"{str(p.get('tokens_per_s', '—')):<11} {f'{ratio:.2f}' if ratio else '—':<6} "
          f"{f'{mem / 2**30:.2f}' if mem else '—':<13} {str(p.get('peak_gib', '—')):<9} "
          f"{p.get('peak_reserved_gib', '—')}")


print("\nshape            mode B  T     matmul              ours ms   peer ms   ours tok/s  peer tok/s  ratio  "
      "ours mem GiB  peer GiB  peer reserved GiB")
seen = set()
for o in ours:
    key = (o["shape"], o["mode"], o["batch"], o["seq"])
    seen.add(key)
    row(key, o, peer.get(key, {}))
for key in sorted(set(peer) - seen):
    row(key, {}, peer[key])
print("\nours mem: " + "; ".join(sorted({o["memory"] for o in ours if "memory" in o}) or ["—"]))
print("peer mem: torch.cuda.max_memory_allocated, and max_memory_reserved (its allocator's pools, "
      "the measure ours compares with); 0 on the CPU")
quickstart = out / "quickstart.txt"
if quickstart.exists():
    scores = [l for l in quickstart.read_text().splitlines() if l.startswith("exact match")]
    print(f"\nquickstart trained on {device}: {scores[0] if scores else 'no check result'}")
skipped = out / "skipped.txt"
if skipped.exists():
    print("\n" + skipped.read_text().strip())
