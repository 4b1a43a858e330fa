"""Sums a cubecl profiling log (CUBECL_DEBUG_OPTION=profile) per kernel: one line per kernel
launch, `| <duration> | <kernel name>`, in the order they ran. Prints the kernels by total time,
per step. Usage: kernel_profile.py LOG STEPS [TOP]"""
import collections
import re
import sys

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
DURATION = re.compile(r"^([0-9.]+)(ns|µs|us|ms|s)$")

log, steps = sys.argv[1], int(sys.argv[2])
top = int(sys.argv[3]) if len(sys.argv) > 3 else 40
total = collections.Counter()
count = collections.Counter()
with open(log, encoding="utf-8", errors="replace") as lines:
    for line in lines:
        # Kernel names hold ` | ` themselves (`KernelBinop | MulOp | CudaRuntime`): split on the
        # first two bars only. Summary rows start with a name and fail the duration match.
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.rstrip("\n").split("|", 2)[1:]]
        found = len(cells) == 2 and DURATION.match(cells[0])
        if not found:
            continue
        seconds = float(found.group(1)) * UNITS[found.group(2)]
        # Kernel names carry their generic arguments; keep the leading path for grouping.
        name = cells[1][:160]
        total[name] += seconds
        count[name] += 1

overall = sum(total.values())
print(f"kernel time per step: {overall / steps * 1e3:.1f} ms over {sum(count.values()) / steps:.0f} "
      f"launches ({steps} steps logged)")
print(f"{'ms/step':>8} {'share':>6} {'launches/step':>13}  kernel")
for name, seconds in total.most_common(top):
    print(f"{seconds / steps * 1e3:8.2f} {seconds / overall:6.1%} {count[name] / steps:13.0f}  {name}")
