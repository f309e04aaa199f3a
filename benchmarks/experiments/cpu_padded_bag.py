"""Probe (issue 13): one decode product through embedding_bag with padding_idx (dropped channels point at a zero
row and are skipped: no nonzero, no index_select, constant offsets) against today's gather and dense F.linear.

  python3 benchmarks/experiments/cpu_padded_bag.py

One token, 50% of channels kept, weights cycled through 128 MiB (cold caches), medians of 7 interleaved rounds;
times per product include the mask. results/cpu_padded_bag.txt: "today" there is the runtime at 0237e4f
(before the leaner one-token path of c285489)."""

import statistics
import time

import torch
import torch.nn.functional as F

from winaconv_runtime import cpu_kernels

COLD_BYTES = 128 << 20


def per_call_ms(fn, items):
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def main():
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, threads {threads}")
    for dtype in (torch.float32, torch.bfloat16):
        for in_f, out_f in ((576, 192), (576, 576), (576, 1536), (1536, 576), (2048, 8192), (8192, 2048)):
            copies = max(4, COLD_BYTES // (in_f * out_f * dtype.itemsize))
            g = torch.Generator().manual_seed(0)
            weights = [torch.randn(out_f, in_f, generator=g).to(dtype) for _ in range(copies)]
            padded = [torch.cat([w.t(), w.new_zeros(1, out_f)]).contiguous() for w in weights]
            plain_t = [p[:in_f] for p in padded]
            x = torch.randn(1, in_f, generator=g).to(dtype)
            tau = torch.full((1, in_f), torch.quantile(x.float().abs(), 0.5).item())
            arange = torch.arange(in_f)
            offsets = {b: torch.tensor([in_f * k // b for k in range(b)]) for b in (1, threads)}
            plan = cpu_kernels.GatherPlan(1.0, threads)  # the gather at any kept fraction
            acc = torch.promote_types(dtype, torch.float32)

            def dense(i):
                F.linear(x, weights[i])

            def masked(i):
                F.linear(x * (x.abs() > tau), weights[i])

            def today(i):
                cpu_kernels.sparse_linear_cpu(x, tau, [plain_t[i]], None, plan)

            def padded_bag(bags):
                def run(i):
                    idx = torch.where(x[0].abs() > tau[0], arange, in_f)
                    out = F.embedding_bag(idx, padded[i], offsets[bags], mode="sum", per_sample_weights=x[0],
                                          padding_idx=in_f)
                    if bags > 1:
                        out = out.sum(0, keepdim=True, dtype=acc).to(dtype)
                return run

            variants = {"dense": dense, "masked": masked, "today": today, "padded 1": padded_bag(1),
                        f"padded {threads}": padded_bag(threads)}
            cells = {k: [] for k in variants}
            items = list(range(copies))
            for fn in variants.values():
                fn(0)
            for _ in range(7):
                for name, fn in variants.items():
                    cells[name].append(per_call_ms(fn, items))
            med = {k: statistics.median(v) for k, v in cells.items()}
            print(f"{str(dtype)[6:]:9s} {in_f}x{out_f}: " + "  ".join(f"{k} {v * 1e3:7.1f}us" for k, v in med.items()),
                  flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
