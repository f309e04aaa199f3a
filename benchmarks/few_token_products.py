"""Batch 2-8 decode on the GPU: the products a sparse level runs where the sparse kernel does not, against level 0's.

At a few tokens the runtime runs the masked dense product (sparse_linear.py): a joined product whose segments
keep different channels (q/k/v, gate/up) stacks one masked copy of the input per segment, so qkv at 4 tokens is
a [12, 4096] x [4096, 6144] product where level 0 runs [4, 4096] x [4096, 6144]. This times, per Llama-3-8B
shape and batch, in CUDA graphs over rotating weight copies (nothing served from L2), in us per product:
  dense        level 0's product, F.linear(x, W)
  stacked      the runtime's stacked_masked_products, masks included (eager: the compiled step fuses the masks
               into the kernel that makes x)
  stacked_mm   its product alone, on a stacked input made beforehand
  segments_mm  one product per segment on its own columns, inputs made beforehand (the alternative layout)
Usage (GPU machine, in benchmarks/, runtime importable as winaconv_runtime):
    python3 few_token_products.py --json $OUT/few_token_products.json
CPU smoke run (tiny shapes, one timed call per cell): python3 few_token_products.py --smoke
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from common import graph_time, median_ms, save_json, versions
from winaconv_runtime.sparse_linear import stacked_masked_products

SHAPES = {  # name: (in, segment sizes)
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "o": (4096, (4096,)),
    "down": (14336, (4096,)),
}
SMOKE_SHAPES = {"tiny": (64, (48, 16))}
COPY_BYTES = 512 << 20  # rotating weight copies per shape: more than L2 holds many times over


def timer(device: str):
    """graph_time on the GPU; on the CPU (smoke run) one call's wall time, in us either way."""
    if device == "cuda":
        return graph_time
    return lambda make_call, n_copies: median_ms(lambda: make_call(0), 1) * 1e3


def shape_row(name, in_features, sizes, tokens, device, dtype, sparsity=0.5):
    """Every variant's time for one shape and batch, and the largest difference of the products from the
    unstacked reference (the variants must agree before their times mean anything)."""
    out_features = sum(sizes)
    copies = max(2, COPY_BYTES // (in_features * out_features * 2)) if device == "cuda" else 1
    weights = [torch.randn(out_features, in_features, device=device, dtype=dtype).t().contiguous().t()
               for _ in range(copies)]  # W^T row-major, as the runtime stores it
    x = torch.randn(tokens, in_features, device=device, dtype=dtype)
    q = float(torch.quantile(x.float().abs().flatten(), sparsity))
    tau = torch.stack([torch.full((in_features,), q * (1 + 0.1 * s), device=device) for s in range(len(sizes))])
    ends = list(itertools.accumulate(sizes))
    starts = [0] + ends[:-1]
    masked = [x * (x.abs() > tau[s]) for s in range(len(sizes))]
    stacked_input = torch.cat(masked)

    reference = torch.cat([F.linear(masked[s].double(), weights[0][a:b].double()) for s, (a, b) in
                           enumerate(zip(starts, ends))], dim=1)
    stacked = torch.cat(stacked_masked_products(x, weights[0], None, tau, sizes), dim=1)
    error = float((stacked.double() - reference).abs().max() / reference.abs().max())

    def stacked_mm(i):
        y = F.linear(stacked_input, weights[i]).view(len(sizes), tokens, -1)
        return [y[s, :, a:b] for s, (a, b) in enumerate(zip(starts, ends))]

    time_of = timer(device)
    row = {
        "shape": name, "tokens": tokens, "rel_err": error,
        "dense": time_of(lambda i: F.linear(x, weights[i]), copies),
        "stacked": time_of(lambda i: stacked_masked_products(x, weights[i], None, tau, sizes), copies),
        "stacked_mm": time_of(stacked_mm, copies),
        "segments_mm": time_of(lambda i: [F.linear(masked[s], weights[i][a:b]) for s, (a, b) in
                                          enumerate(zip(starts, ends))], copies),
    }
    del weights
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    results = {"versions": versions(), "sparsity": args.sparsity, "rows": []}
    print("| shape | tokens | dense us | stacked us | stacked_mm us | segments_mm us | stacked / dense | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (in_features, sizes) in shapes.items():
        for tokens in (int(b) for b in args.batches.split(",")):
            row = shape_row(name, in_features, sizes, tokens, device, dtype, args.sparsity)
            results["rows"].append(row)
            print(f"| {name} | {tokens} | {row['dense']:.1f} | {row['stacked']:.1f} | {row['stacked_mm']:.1f} | "
                  f"{row['segments_mm']:.1f} | {row['stacked'] / row['dense']:.2f} | {row['rel_err']:.1e} |",
                  flush=True)
            save_json(args.json, results)


if __name__ == "__main__":
    main()
