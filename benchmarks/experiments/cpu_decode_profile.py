"""Probe (issue 13): where SmolLM2's CPU decode step spends its time, per level -- why 50% sparsity buys so
little there. For each level: ms per token (unprofiled), and from torch's profiler per token: every aten op's own
time, the lm_head (the only mm left at sparse levels: it is not one of the seven projections), the seven
projections' products (mm at level 0; embedding_bag at sparse levels), and everything else. Median of 3.

    python3 benchmarks/experiments/cpu_decode_profile.py float32   # or bfloat16; output: results/cpu_decode_profile.txt
"""

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder: cpu_decode's helpers
import cpu_decode as cd  # noqa: E402
from winaconv_runtime.decoding import GreedyDecoder  # noqa: E402

STEPS = 8
PRODUCTS = ("aten::mm", "aten::_embedding_bag_forward_only", "aten::_embedding_bag")


def step_ms_and_profile(model, prompt):
    decoder = GreedyDecoder(model, max_length=prompt.shape[1] + 2 * STEPS + 4)
    decoder.generate(prompt, max_new_tokens=2)
    engine = decoder.engine
    engine.start(prompt, torch.ones_like(prompt), engine.settings)
    start = time.perf_counter()
    for _ in range(STEPS):
        engine.step()
    wall = (time.perf_counter() - start) / STEPS * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(STEPS):
            engine.step()
    events = prof.key_averages()
    per_token = {e.key: (e.self_cpu_time_total / STEPS / 1e3, e.count / STEPS) for e in events}
    total = sum(ms for ms, _ in per_token.values())
    products = sum(per_token.get(k, (0, 0))[0] for k in PRODUCTS)
    calls = sum(per_token.get(k, (0, 0))[1] for k in PRODUCTS)
    return wall, total, products, calls


def main():
    dtype = getattr(torch, sys.argv[1] if len(sys.argv) > 1 else "float32")
    plain = cd.load_plain("smollm2-135m", dtype)
    model = cd.sparsified_copy(plain)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, plain.config.vocab_size, (1, 128), generator=g)
    prompt = torch.randint(0, plain.config.vocab_size, (1, 32), generator=g)
    inputs = cd.linear_inputs(model, calib)
    # the lm_head alone, timed the same way the step is: its share is the same at every level
    head, hidden = model.lm_head, torch.randn(1, 1, plain.config.hidden_size, dtype=dtype)
    head(hidden)
    start = time.perf_counter()
    for _ in range(20):
        head(hidden)
    head_ms = (time.perf_counter() - start) / 20 * 1e3
    rows = {}
    for _ in range(3):
        for level in (0.0, 0.5, 0.65):
            cd.set_level(model, inputs, level)
            rows.setdefault(level, []).append(step_ms_and_profile(model, prompt))
    print(f"SmolLM2-135M {str(dtype)[6:]}, threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"lm_head alone {head_ms:.1f} ms")
    print("| level | ms/token | aten ops (profiled) | products incl. lm_head | product calls | other aten ops | "
          "not in aten ops (Python, dispatch) |")
    print("|---|---|---|---|---|---|---|")
    for level, samples in rows.items():
        wall, total, products, calls = (statistics.median(s[i] for s in samples) for i in range(4))
        print(f"| {level:g} | {wall:.1f} | {total:.1f} | {products:.1f} | {calls:.0f} | {total - products:.1f} | "
              f"{wall - total:.1f} |")


if __name__ == "__main__":
    with torch.no_grad():
        main()
