"""Probe: does splitting each sparse product's kept rows into one embedding_bag per thread pay, against a
single bag (no per-thread partial sums)? Decode ms/token at levels 0 / 0.5 / 0.65, 3 repeats of 16 tokens.

    python benchmarks/experiments/cpu_bag_split.py s32   # SmolLM2 fp32 (s16: bf16, b16: random 1B bf16)

Output of 2026-12-02 (2 idle cores) in benchmarks/results/cpu_bag_split.txt.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder: cpu_decode's helpers
import cpu_decode as cd  # noqa: E402
from winaconv_runtime import cpu_kernels, sparse_linear  # noqa: E402

name, dtype = {"s32": ("smollm2-135m", torch.float32), "s16": ("smollm2-135m", torch.bfloat16),
               "b16": ("random-1b", torch.bfloat16)}[sys.argv[1]]
plain = cd.load_plain(name, dtype)
model = cd.sparsified_copy(plain)
g = torch.Generator().manual_seed(1)
calib = torch.randint(0, plain.config.vocab_size, (1, 128), generator=g)
prompt = torch.randint(0, plain.config.vocab_size, (1, 32), generator=g)
inputs = cd.linear_inputs(model, calib)
new = 16 if name.startswith("smol") else 8
per_thread = cpu_kernels.sparse_linear_cpu


def one_bag(flat, tau, weights_t, bias, plan):
    return per_thread(flat, tau, weights_t, bias, plan._replace(bags=1))


cells = {}
for _ in range(3):
    cells.setdefault("plain", []).append(cd.decode_ms_per_token(plain, prompt, new))
    for level in (0.0, 0.5, 0.65):
        cd.set_level(model, inputs, level)
        for variant, product in (("threads", per_thread), ("one_bag", one_bag)):
            if level == 0 and variant != "threads":
                continue
            sparse_linear.sparse_linear_cpu = product
            cells.setdefault((level, variant), []).append(cd.decode_ms_per_token(model, prompt, new))
        sparse_linear.sparse_linear_cpu = per_thread
print(sys.argv[1], {str(k): round(statistics.median(v), 1) for k, v in cells.items()}, flush=True)
