"""Probe (issue 13, second host): what the masked dense product costs on the CPU when it drops nothing.
SmolLM2 bf16 decode with every threshold at -1 (the masked path, values identical to level 0) against
level 0, alternated; then one 576x1536 bf16 linear, 40 copies cycled: F.linear against the runtime's
SparseLinear with thresholds -1 and against its parts.

    python benchmarks/experiments/cpu_masked_overhead.py > benchmarks/results/cpu_masked_overhead.txt
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder: cpu_decode's helpers
import cpu_decode as cd  # noqa: E402
from winaconv_runtime import cpu_kernels  # noqa: E402
from winaconv_runtime.sparse_linear import SparseLinear  # noqa: E402

cpu_kernels.GATHER_MODE = "never"  # the masked dense product only
print(", ".join(f"{k} {v}" for k, v in cd.versions().items()), flush=True)

plain = cd.load_plain("smollm2-135m", torch.bfloat16)
model = cd.sparsified_copy(plain)
g = torch.Generator().manual_seed(1)
calib = torch.randint(0, plain.config.vocab_size, (1, 128), generator=g)
prompt = torch.randint(0, plain.config.vocab_size, (1, 32), generator=g)
inputs = cd.linear_inputs(model, calib)
times = {"level 0": [], "masked, every channel kept": []}
for _ in range(3):
    for name in times:
        for linear in inputs:
            linear.set_thresholds(None if name == "level 0" else [-1.0], [False])
        times[name].append(cd.decode_ms_per_token(model, prompt, 16))
print("SmolLM2 bf16 decode ms/token, median of 3 alternated:",
      {k: round(statistics.median(v), 1) for k, v in times.items()}, flush=True)

torch.manual_seed(0)
linears = [SparseLinear(576, 1536, bias=False, dtype=torch.bfloat16) for _ in range(40)]
for linear in linears:
    linear.set_thresholds([-1.0], [False])
x = torch.randn(1, 1, 576).bfloat16()
flat = x.reshape(-1, 576)


def us(fn):
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        with torch.no_grad():
            for linear in linears:
                fn(linear)
        runs.append((time.perf_counter() - start) / len(linears) * 1e6)
    return round(statistics.median(runs), 1)


for _ in range(2):
    print("one 576x1536 bf16 product, us:", {
        "F.linear": us(lambda m: F.linear(flat, m.weight)),
        "|x| > tau, cast (not used), F.linear": us(lambda m: ((flat.abs() > m.tau[0]).to(flat.dtype), F.linear(flat, m.weight))),
        "mask, multiply, F.linear": us(lambda m: F.linear(flat * (flat.abs() > m.tau[0]).to(flat.dtype), m.weight)),
        "SparseLinear (masked path)": us(lambda m: m(x)),
    }, flush=True)
