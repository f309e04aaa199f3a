"""Probe: the random 1B bf16 model's decode ms/token at level 0 (runtime SparseLinear, no thresholds) against
plain transformers, with no sparse level set yet, and again after a level-0.5 round trip (median of 3,
8 tokens each).

    python benchmarks/experiments/level0_vs_plain.py

Output of 2026-12-02 (2 idle cores) in benchmarks/results/level0_vs_plain.txt.
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder: cpu_decode's helpers
import cpu_decode as cd  # noqa: E402

plain = cd.load_plain("random-1b", torch.bfloat16)
model = cd.sparsified_copy(plain)
g = torch.Generator().manual_seed(1)
calib = torch.randint(0, plain.config.vocab_size, (1, 128), generator=g)
prompt = torch.randint(0, plain.config.vocab_size, (1, 32), generator=g)


def ms(m):
    return round(statistics.median(cd.decode_ms_per_token(m, prompt, 8) for _ in range(3)), 1)


print("plain", ms(plain), "level0 fresh", ms(model), flush=True)
inputs = cd.linear_inputs(model, calib)
cd.set_level(model, inputs, 0.5)
print("0.5", ms(model), flush=True)
cd.set_level(model, inputs, 0.0)
print("level0 after", ms(model), "plain", ms(plain), flush=True)
