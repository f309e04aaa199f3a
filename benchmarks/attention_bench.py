"""One-token attention over a static cache: the runtime's decode-attention kernel against transformers' sdpa path.

    python3 benchmarks/attention_bench.py --out $OUT/attention.json     # on the GPU, a table in a minute
    python3 benchmarks/attention_bench.py --smoke                       # the CPU, Triton's interpreter, seconds

Each cell: one decoder layer's attention call (query [B, H, 1, D] against a cache [B, KVH, L, D] whose first
`filled` positions the bool mask keeps), timed as a CUDA graph of 32 calls over 8 caches (common.graph_time, so a
call's cache is not in L2 from the last one); sdpa is transformers' sdpa_attention_forward as the compiled decode
step calls it (key/value heads repeated, masked). The error column is the kernel's largest difference from a
float64 reference, relative to the output's largest value.
"""
import argparse
import os
import sys

if "--smoke" in sys.argv:  # the kernel runs in Triton's CPU interpreter, chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from common import graph_time, save_json, versions

# (name, heads, key/value heads, head dim)
MODELS = [("llama3-8b", 32, 8, 128), ("qwen3-30b-a3b", 32, 4, 128)]
CASES = [(1, 512, 385), (1, 4096, 4000), (4, 512, 385), (1, 32768, 30000)]  # (batch, cache length, filled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from winaconv_runtime.decode_attention import decode_attention, decode_attention_reference

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    models, cases = ([("tiny", 4, 2, 16)], [(1, 40, 30)]) if args.smoke else (MODELS, CASES)
    results = {"versions": versions(), "rows": []}
    print("| model | batch | cache | filled | sdpa us | kernel us | sdpa / kernel | kernel error |\n|---|---|---|---|---|---|---|---|")
    for name, heads, kv_heads, dim in models:
        module = torch.nn.Module()
        module.num_key_value_groups = heads // kv_heads
        for batch, length, filled in cases:
            g = torch.Generator(device).manual_seed(0)
            copies = 1 if args.smoke else 8
            query = torch.randn(batch, heads, 1, dim, device=device, dtype=dtype, generator=g)
            caches = [(torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype, generator=g),
                       torch.randn(batch, kv_heads, length, dim, device=device, dtype=dtype, generator=g))
                      for _ in range(copies)]
            mask = (torch.arange(length, device=device) < filled).view(1, 1, 1, length).expand(batch, 1, 1, length)
            scale = dim ** -0.5
            out = decode_attention(query, *caches[0], mask, scale)
            reference = decode_attention_reference(query, *caches[0], mask, scale)
            error = ((out.double() - reference).abs().max() / reference.abs().max()).item()
            row = dict(model=name, batch=batch, cache=length, filled=filled, kernel_error=error)
            if args.smoke:
                row["sdpa_us"] = row["kernel_us"] = float("nan")
            else:
                row["sdpa_us"] = graph_time(lambda i: sdpa_attention_forward(module, query, *caches[i % copies], mask,
                                                                             scaling=scale)[0], copies, loop=32)
                row["kernel_us"] = graph_time(lambda i: decode_attention(query, *caches[i % copies], mask, scale),
                                              copies, loop=32)
            results["rows"].append(row)
            print(f"| {name} | {batch} | {length} | {filled} | {row['sdpa_us']:.1f} | {row['kernel_us']:.1f} | "
                  f"{row['sdpa_us'] / row['kernel_us']:.2f} | {error:.1e} |", flush=True)
            del caches
    save_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
