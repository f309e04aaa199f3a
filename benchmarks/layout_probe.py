"""Probe (issue 27): does a column-blocked weight layout make the batch-1 sparse GEMV follow the kept bytes?

Today's tile kernel reads W^T [in, out] row-major: one program's kept rows are BLOCK_N-column pieces (128 B at 64
bf16 columns) spaced `out * 2` bytes apart (57 KB on gate+up), so every kept row is a separate DRAM burst far from
the last. Stored blocked instead, as [out / BN, in, BN], the rows one program reads lie back to back in one
contiguous `in * BN * 2`-byte region, and level 0 becomes a plain stream. The question: how close does that bring
the kernel to its bytes, beside cuBLAS, the runtime's kernel and TEAL's public kernel, at every level?

One GPU call (CUDA-graph timing over rotating weight copies, as kernel_bench.py):
    PYTHONUNBUFFERED=1 python3 benchmarks/layout_probe.py --out $OUT/layout_probe_h200.txt
CPU smoke run (Triton's interpreter, correctness against float64 only; tests/test_benchmarks.py):
    python3 benchmarks/layout_probe.py --smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import kernel_bench as KB
from common import load_teal_kernels
from winaconv_runtime import kernels as K


@triton.jit
def _blocked_kernel(x_ptr, wb_ptr, tau_ptr, block_seg_ptr, ws_ptr, K, stride_tau, stride_ws,
                    EVICT_FIRST: tl.constexpr, ITERS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (n, k): column block n (its rows contiguous: wb[n] is [K, BLOCK_N]) x ITERS*BLOCK_K input rows,
    every load issued up front; the fp32 partial goes to ws[k] (summed in split order by the reduce launch)."""
    n = tl.program_id(0)
    k = tl.program_id(1)
    seg = tl.load(block_seg_ptr + n)
    c = tl.arange(0, BLOCK_N)
    base = wb_ptr + n.to(tl.int64) * K * BLOCK_N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for it in tl.static_range(ITERS):
        ks = (k * ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
        km = ks < K
        xv = tl.load(x_ptr + ks, mask=km, other=0.0).to(tl.float32)
        th = tl.load(tau_ptr + seg * stride_tau + ks, mask=km, other=float("inf"))
        keep = tl.abs(xv) > th
        ptrs = base + ks[:, None] * BLOCK_N + c[None, :]
        if EVICT_FIRST:
            w = tl.load(ptrs, mask=keep[:, None], other=0.0, eviction_policy="evict_first")
        else:
            w = tl.load(ptrs, mask=keep[:, None], other=0.0)
        acc += tl.where(keep, xv, 0.0)[:, None] * w.to(tl.float32)
    tl.store(ws_ptr + k * stride_ws + n * BLOCK_N + c, tl.sum(acc, axis=0))


def block_weights(wt: torch.Tensor, block_n: int) -> torch.Tensor:
    """W^T [in, out] -> [out / block_n, in, block_n] (out a multiple of block_n)."""
    Kd, N = wt.shape
    return wt.view(Kd, N // block_n, block_n).permute(1, 0, 2).contiguous()


def block_segments(ends, block_n, device) -> torch.Tensor:
    """The tau row of every column block (segment ends multiples of block_n)."""
    starts = [0] + list(ends[:-1])
    seg = [s for s, (a, b) in enumerate(zip(starts, ends)) for _ in range((b - a) // block_n)]
    return torch.tensor(seg, dtype=torch.int32, device=device)


def blocked_linear(x, wb, tau, block_seg, cfg):
    """y = the keep rule's product with blocked weights; cfg = (block_n, block_k, iters, warps, evict_first)."""
    bn, bk, iters, warps, evict = cfg
    n_blocks, Kd, _ = wb.shape
    N = n_blocks * bn
    nsplit = triton.cdiv(Kd, bk * iters)
    ws = torch.empty((nsplit, 1, N), device=x.device, dtype=torch.float32)
    y = torch.empty((1, N), device=x.device, dtype=x.dtype)
    _blocked_kernel[(n_blocks, nsplit)](x, wb, tau, block_seg, ws, Kd, tau.stride(0), ws.stride(0),
                                        EVICT_FIRST=evict, ITERS=iters, BLOCK_K=bk, BLOCK_N=bn, num_warps=warps)
    K._split_reduce_kernel[(triton.cdiv(N, 128), 1)](
        ws, x, y, N, nsplit, ws.stride(0), ws.stride(1), y.stride(0),
        HAS_BIAS=False, BLOCK_S=min(32, triton.next_power_of_2(nsplit)), BLOCK_N=128, num_warps=4)
    return y


CANDIDATES = {  # name: (block_n, block_k, iters, warps, evict_first)
    "B64x512": (64, 512, 1, 4, True),
    "B64x256": (64, 256, 1, 4, True),
    "B64x128i4": (64, 128, 4, 4, True),
    "B128x256": (128, 256, 1, 4, True),
    "B128x128": (128, 128, 1, 4, True),
    "B128x64i4": (128, 64, 4, 4, True),
    "B256x128w8": (256, 128, 1, 8, True),
    "B256x64": (256, 64, 1, 4, True),
    "B256x32i4": (256, 32, 4, 4, True),
    "B512x64w8": (512, 64, 1, 8, True),
    "B64x512n": (64, 512, 1, 4, False),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]


def check(device, shapes, log):
    """Every candidate against the float64 reference on these shapes at 0/50/90% (a wrong kernel is not timed)."""
    worst = 0.0
    for Kd, ends in shapes:
        for s in (0.0, 0.5, 0.9):
            x, tau, _ = KB.make_inputs(Kd, ends, 1, s, seed=3, dev=device)
            wt = (torch.randn(Kd, ends[-1], device=device) / math.sqrt(Kd)).bfloat16()
            ref = KB.ref64(x, wt, tau, ends, None)
            for name, cfg in CANDIDATES.items():
                if any(e % cfg[0] for e in ends):
                    continue
                y = blocked_linear(x, block_weights(wt, cfg[0]), tau, block_segments(ends, cfg[0], device), cfg)
                err = KB.relerr(y, ref)
                worst = max(worst, err)
                if not err < 2e-2:
                    raise AssertionError(f"{name} in={Kd} ends={ends} sparsity {s}: relative error {err:.3g}")
    log(f"correctness: every candidate within {worst:.2e} of float64")


def time_shape(name, Kd, ends, teal, log):
    N = ends[-1]
    wbytes = Kd * N * 2
    ncp = min(64, max(2, math.ceil(400e6 / wbytes)))
    wts = [(torch.randn(Kd, N, device="cuda") / math.sqrt(Kd)).bfloat16() for _ in range(ncp)]
    ws = [w.t().contiguous() for w in wts]
    blocked = {bn: ([block_weights(w, bn) for w in wts], block_segments(ends, bn, "cuda"))
               for bn in sorted({c[0] for c in CANDIDATES.values()})}
    wts16 = [w.half() for w in wts] if teal is not None else None
    ws16 = [w.t().contiguous() for w in wts16] if teal is not None else None
    rows = []
    log(f"-- {name}: in {Kd}, out {N}, {wbytes / 1e6:.1f} MB, {ncp} rotating copies")
    for s in SPARSITIES:
        x, tau, q = KB.make_inputs(Kd, ends, 1, s, seed=11)
        kept = float((x.float().abs() > q).float().mean())
        runtime = K.choose_config(1, Kd, N, round(100 * (1 - s)))
        row = {"shape": name, "sparsity": s, "kept": kept, "dense_bytes": wbytes}
        row["cublas"] = KB.graph_time(lambda i: F.linear(x, ws[i]), ncp, loop=16, replays=9)
        row["runtime"] = KB.graph_time(lambda i: K.launch(x, wts[i], tau, ends, None, runtime), ncp, loop=16, replays=9)
        for cname, cfg in CANDIDATES.items():
            copies, seg = blocked[cfg[0]]
            row[cname] = KB.graph_time(lambda i: blocked_linear(x, copies[i], tau, seg, cfg), ncp, loop=16, replays=9)
        if teal is not None:
            x16, sbin = x.half(), int(round(s * 100))
            KB.teal_public(teal, x16, wts16[0], ends, q, sbin)  # autotune outside the graph
            row["teal_fp16"] = KB.graph_time(lambda i: KB.teal_public(teal, x16, wts16[i], ends, q, sbin), ncp, loop=16,
                                             replays=9)
            row["cublas_fp16"] = KB.graph_time(lambda i: F.linear(x16, ws16[i]), ncp, loop=16, replays=9)
        best = min(CANDIDATES, key=lambda c: row[c])
        teal_s = (f" | TEAL fp16 x{row['cublas_fp16'] / row['teal_fp16']:.2f} of fp16 cuBLAS, best/TEAL time "
                  f"{row[best] / row['teal_fp16']:.2f}") if teal is not None else ""
        log(f"{name:8} {s:4.2f} kept {kept:4.2f} | cuBLAS {row['cublas']:6.1f} us | runtime x{row['cublas'] / row['runtime']:.2f}"
            f" | best blocked {best} {row[best]:6.1f} us x{row['cublas'] / row[best]:.2f}, kept bytes at "
            f"{kept * wbytes / row[best] / 1e6:.2f} TB/s{teal_s}")
        log("    all (us): " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()
                                         if isinstance(v, float) and k not in ("sparsity", "kept", "dense_bytes")))
        rows.append(row)
    del wts, ws, blocked, wts16, ws16
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="layout_probe.txt")
    ap.add_argument("--shapes", default=",".join(KB.SHAPES))
    ap.add_argument("--smoke", action="store_true", help="the correctness check on small odd shapes on the CPU")
    args = ap.parse_args()
    lines = []

    def log(*a):
        s = " ".join(map(str, a))
        print(s, flush=True)
        lines.append(s)

    if args.smoke:
        check("cpu", [(200, (128, 256)), (96, (512,))], log)
        return
    t0 = time.time()
    bw_copy, bw_read = KB.env_and_bandwidth()
    lines.extend(KB.LINES)
    teal = load_teal_kernels()
    log("TEAL's public kernel: " + ("loaded from .peers/teal" if teal is not None else "not found (.peers/teal)"))
    check("cuda", [(200, (128, 256)), (4096, (4096, 5120, 6144)), (14336, (4096,))], log)
    rows = []
    for name in args.shapes.split(","):
        Kd, ends = KB.SHAPES[name]
        rows += time_shape(name, Kd, ends, teal, log)
        log(f"[{time.time() - t0:.0f}s] {name} done")
    log("")
    log(f"== speed-up over cuBLAS, batch 1, bf16 (TEAL: over fp16 cuBLAS); copy BW {bw_copy:.2f} TB/s ==")
    keys = ["runtime", "teal_fp16"] + list(CANDIDATES)
    for name in args.shapes.split(","):
        rs = [r for r in rows if r["shape"] == name]
        for key in keys:
            if key in rs[0]:
                base = "cublas_fp16" if key == "teal_fp16" else "cublas"
                log(f"{name:8} {key:12} " + "  ".join(f"{int(r['sparsity'] * 100)}%:{r[base] / r[key]:.2f}" for r in rs))
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"rows": rows, "copy_bw_tbs": bw_copy, "read_bw_tbs": bw_read, "candidates": CANDIDATES}, fh,
                  indent=1)


if __name__ == "__main__":
    main()
