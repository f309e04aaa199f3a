"""Kernel benchmark for winaconv's activation-sparse linear (runtime/kernels.py) on one GPU.

One run does everything (the GPU lease is short):
  1. environment + measured device copy bandwidth;
  2. correctness on the GPU against a float64 reference (eager op, torch.compile(fullgraph=True),
     CUDA-graph capture and replays with new inputs, determinism), odd and Llama-3-8B shapes, T = 1..8;
  3. per shape and level (0..90 %), timed under CUDA graphs (a loop of launches over rotating weight copies,
     so nothing is served from L2): cuBLAS (F.linear), the runtime's choice for that level (or, with --sweep,
     every candidate config), and TEAL's public kernel beside its own fp16 cuBLAS when `.peers/teal/` holds it
     (FasterDecoding/TEAL kernels/sparse_gemv.py without its compile-wrapper tail; fetched at benchmark time,
     ignored by git, never shipped); then batch 2/4/8 at 0/50/90 %.

Usage (on the GPU machine, in benchmarks/, with runtime/ importable as winaconv_runtime):
    PYTHONUNBUFFERED=1 python3 kernel_bench.py --skip-check --out $OUT/kernel_h200.txt   # the runtime's table
    PYTHONUNBUFFERED=1 python3 kernel_bench.py --sweep --batches 1 --out $OUT/sweep.txt   # every candidate
CPU smoke run (the table code on one small shape, kernels in Triton's interpreter, one timed call per cell instead
of a CUDA graph; seconds; tests/test_benchmarks.py):
    python3 benchmarks/kernel_bench.py --smoke --out /tmp/kernel_smoke.txt
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

if "--smoke" in sys.argv:  # the kernels run in Triton's CPU interpreter, which must be chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import torch.nn.functional as F

import triton
import triton.language as tl
from triton.testing import do_bench

from common import capture_graph, graph_time, load_teal_kernels
from winaconv_runtime import kernels as K

SHAPES = {  # name: (in, segment_ends)
    "qkv": (4096, (4096, 5120, 6144)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 28672)),
    "down": (14336, (4096,)),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]
LINES = []
DEVICE = "cuda"  # a dry run of the table code sets "cpu" (tests under TRITON_INTERPRET=1)
_LOG_PATH = None  # set by main(): every line is appended as it is logged (a timed-out run keeps its lines)


def log(*a):
    s = " ".join(str(v) for v in a)
    print(s, flush=True)
    LINES.append(s)
    if _LOG_PATH:
        with open(_LOG_PATH, "a") as fh:
            fh.write(s + "\n")


# ---------------------------------------------------------------------------------------------
KC = K.KernelConfig
# Batch-1 candidates. "t": the split-K tile (columns x rows per program; `e` = weight loads marked evict-first).
# "L": the kept-list kind (columns, kept rows per loop step, channel groups, loads in flight; `f` = the groups'
# partials summed by the last program of each column block instead of a reduce launch). Wide tiles (TEAL's
# geometry) were swept and retired on 2026-12-04 (docs/results.md, History).
def _list(bn, rows, groups, stages, fused=True, warps=4):
    return KC(kind="list", block_n=bn, block_k=rows, groups=groups, num_stages=stages, fused_reduce=fused,
              evict_first=True, num_warps=warps)


CANDS_T1 = {
    "t64x512w4": KC(block_n=64, block_k=512),
    "t64x512w4e": KC(block_n=64, block_k=512, evict_first=True),
    "t64x512w4f": KC(block_n=64, block_k=512, fused_reduce=True),
    "t64x512w4ef": KC(block_n=64, block_k=512, evict_first=True, fused_reduce=True),
    "L128r32g8s3f": _list(128, 32, 8, 3),
    "L128r32g8s3": _list(128, 32, 8, 3, fused=False),
    "L128r32g16s3f": _list(128, 32, 16, 3),
    "L128r32g4s3f": _list(128, 32, 4, 3),
    "L128r32g2s3f": _list(128, 32, 2, 3),
    "L256r32g4s3f": _list(256, 32, 4, 3),
    "L256r32g8s3f": _list(256, 32, 8, 3),
    "L128r16g8s4f": _list(128, 16, 8, 4),
    "L128r64g8s2f": _list(128, 64, 8, 2),
    "L64r32g16s3f": _list(64, 32, 16, 3),
    "L64r64g16s3f": _list(64, 64, 16, 3),
    "L256r16g8s4f": _list(256, 16, 8, 4),
    "L128r32g32s3f": _list(128, 32, 32, 3),
}
CANDS_TB = {  # batch 2-8: tensor-core tile, each kept row read once for all tokens
    "d128x128w4": KC(block_n=128, block_k=128),
    "d128x128w4f": KC(block_n=128, block_k=128, fused_reduce=True),
    "d64x256w4": KC(block_n=64, block_k=256),
    "d128x64w4e": KC(block_n=128, block_k=64, evict_first=True),
    "d256x64w8e": KC(block_n=256, block_k=64, num_warps=8, evict_first=True),
    "d256x32w4e": KC(block_n=256, block_k=32, evict_first=True),
}
ALL_CANDS = {**CANDS_T1, **CANDS_TB}
SELECTED = set(ALL_CANDS)  # --candidates narrows the sweep and the quick check


# ---------------------------------------------------------------------------------------------
# TEAL's public kernel (FasterDecoding/TEAL kernels/sparse_gemv.py), fetched into .peers/teal/ (ignored by git,
# never shipped): fp16 only, batch 1, one scalar threshold per matrix (three for its fused qkv), autotuned
# per sparsity bin, fp16 atomics into a zeroed output (the memset is part of each call, as in TEAL).
# ---------------------------------------------------------------------------------------------
def teal_public(mod, x16, wt16, ends, q, sparsity_bin):
    """One TEAL launch on W^T [in, out] (TEAL wants the [out, in] view of it, 'column major')."""
    w = wt16.t()
    x3 = x16.view(1, 1, -1)
    if len(ends) == 3:
        return mod.qkv_gemv(x3, w, q, q, q, sparsity_bin, ends[1] - ends[0])
    return mod.splitk_sparse_gemv(x3, w, q, sparsity_bin)


# ---------------------------------------------------------------------------------------------
# Experiment: the product if the kept-channel list came for free (made by the kernel that writes x, e.g. a fused
# RMSNorm): programs own BLOCK_R consecutive KEPT rows x BLOCK_N columns, so work scales with kept rows; the list
# is made outside the timed region here. One threshold per matrix (as TEAL), so it bounds what that design buys.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _gather_list_kernel(idx_ptr, xk_ptr, cnt_ptr, w_ptr, ws_ptr, N, stride_w, stride_ws,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    c = tl.program_id(1)
    count = tl.load(cnt_ptr)
    if c * BLOCK_R < count:
        j = c * BLOCK_R + tl.arange(0, BLOCK_R)
        kept = j < count
        rows = tl.load(idx_ptr + j)          # the list buffer is K long: no mask needed on the index load
        xv = tl.load(xk_ptr + j).to(tl.float32)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=kept[:, None] & cmask[None, :],
                    other=0.0, eviction_policy="evict_first")
        part = tl.sum(xv[:, None] * w.to(tl.float32), axis=0)
        tl.store(ws_ptr + c * stride_ws + cols, part, mask=cmask)


@triton.jit
def _gather_list_reduce(ws_ptr, cnt_ptr, y_ptr, N, stride_ws, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    n_chunks = tl.cdiv(tl.load(cnt_ptr), BLOCK_R)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(0, n_chunks, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        part = tl.load(ws_ptr + ss[:, None] * stride_ws + cols[None, :], mask=(ss < n_chunks)[:, None] & cmask[None, :],
                       other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(y_ptr + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


def kept_list(x, q):
    """(indices, kept x values, count) of one token's kept channels, in K-long buffers."""
    Kd = x.shape[1]
    keep = x[0].float().abs() > q
    idx = torch.zeros(Kd, dtype=torch.int32, device=x.device)
    xk = torch.zeros(Kd, dtype=x.dtype, device=x.device)
    nz = keep.nonzero().flatten()
    idx[:nz.numel()] = nz.int()
    xk[:nz.numel()] = x[0, nz]
    return idx, xk, torch.tensor([nz.numel()], dtype=torch.int32, device=x.device)


def gather_list(lst, wt, cfg):
    idx, xk, cnt = lst
    br, bn, nw = cfg
    Kd, N = wt.shape
    chunks = triton.cdiv(Kd, br)
    ws = torch.empty((chunks, N), device=wt.device, dtype=torch.float32)
    y = torch.empty((1, N), device=wt.device, dtype=wt.dtype)
    _gather_list_kernel[(triton.cdiv(N, bn), chunks)](idx, xk, cnt, wt, ws, N, wt.stride(0), ws.stride(0),
                                                      BLOCK_R=br, BLOCK_N=bn, num_warps=nw)
    _gather_list_reduce[(triton.cdiv(N, 128),)](ws, cnt, y, N, ws.stride(0), BLOCK_R=br, BLOCK_S=32, BLOCK_N=128,
                                                num_warps=4)
    return y


FP16_PROBES = ("t64x512w4", "L128r32g8s3f")
GATHER_CFGS = [(32, 256, 4), (64, 256, 4), (16, 512, 4), (32, 512, 8), (64, 128, 4)]


def make_inputs(Kd, ends, T, s, dtype=torch.bfloat16, seed=0, dev=None):
    dev = dev or DEVICE
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn((T, Kd), device=dev, dtype=torch.float32, generator=g).to(dtype)
    ax = x.float().abs().flatten()
    q = 0.0 if s <= 0 else float(torch.quantile(ax[:2 ** 24], s))
    tau = torch.full((len(ends), Kd), q, device=dev, dtype=torch.float32)
    return x, tau, q


def bench(fn, warmup=10, rep=40):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def one_call_time(make_call, n_copies, loop=16, replays=9):
    """The smoke run's timer: one call on the CPU, in us (the table code's interface of graph_time)."""
    start = time.perf_counter()
    out = make_call(0)
    assert torch.isfinite(out).all()
    return (time.perf_counter() - start) * 1e6


def ref64(x, wt, tau, ends, bias):
    return K.sparse_linear_reference(x, wt, tau, ends, bias, accumulate=torch.float64)


def relerr(a, r):
    a = a.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
def quick_check():
    """A minute's check: the default op eager, under torch.compile(fullgraph) and replayed from a CUDA
    graph (qkv shape, batch 1, 50 %), then every candidate tile config (batch 1 at T=1, batched at T=3)
    on two Llama-3-8B shapes at 0/50/90 % with +inf thresholds; relative error against the float64
    masked product, and bit-equality of two runs."""
    Kd, ends = 4096, (4096, 5120, 6144)
    wt = (torch.randn(Kd, ends[-1], device="cuda") / math.sqrt(Kd)).bfloat16()
    b = torch.randn(ends[-1], device="cuda").bfloat16()
    x, tau, _ = make_inputs(Kd, ends, 1, 0.5, seed=5)
    ref = ref64(x, wt, tau, ends, b)
    compiled = torch.compile(lambda v: K.sparse_linear_triton(v, wt, tau, ends, b), fullgraph=True)
    e_compiled = relerr(compiled(x), ref)
    graph, y = capture_graph(compiled, x)
    graph.replay()
    torch.cuda.synchronize()
    log(f"default op: compiled {e_compiled:.1e}, graph {relerr(y, ref):.1e}, "
        f"eager {relerr(K.sparse_linear_triton(x, wt, tau, ends, b), ref):.1e}")
    for cname, cfg in {**CANDS_T1, **CANDS_TB}.items():
        if cname not in SELECTED:
            continue
        if cfg.fused_reduce:
            graph_replays_check(cname)
        worst, same = 0.0, True
        T = 1 if cname in CANDS_T1 else 3
        for Kd, ends in [(4096, (4096, 5120, 6144)), (14336, (4096,))]:
            wt = (torch.randn(Kd, ends[-1], device="cuda") / math.sqrt(Kd)).bfloat16()
            for s in (0.0, 0.5, 0.9):
                x, tau, _ = make_inputs(Kd, ends, T, s, seed=3)
                tau[:, ::13] = float("inf")
                y = K.launch(x, wt, tau, ends, None, cfg)
                same = same and torch.equal(y, K.launch(x, wt, tau, ends, None, cfg))
                worst = max(worst, relerr(y, ref64(x, wt, tau, ends, None)))
        log(f"{cname} T={T} worst rel err vs float64 {worst:.2e}, deterministic {same}")


def graph_replays_check(cname):
    """A config's results across CUDA-graph replays with new inputs each time (tickets must reset), against
    float64, and two replays of one input bit-equal."""
    Kd, ends = 4096, (4096, 5120, 6144)
    wt = (torch.randn(Kd, ends[-1], device="cuda") / 64).bfloat16()
    tau = torch.rand(3, Kd, device="cuda")
    b = torch.randn(ends[-1], device="cuda").bfloat16()
    xs = torch.randn(1, Kd, device="cuda").bfloat16()
    g, yg = capture_graph(lambda v: K.launch(v, wt, tau, ends, b, ALL_CANDS[cname]), xs)
    errs, same = [], []
    for _ in range(4):
        xs.copy_(torch.randn(1, Kd, device="cuda").bfloat16())
        g.replay()
        first = yg.clone()
        g.replay()
        torch.cuda.synchronize()
        errs.append(relerr(yg, ref64(xs, wt, tau, ends, b)))
        same.append(torch.equal(first, yg))
    log(f"{cname} graph replays: max rel err {max(errs):.1e}, replays bit-equal {all(same)}")
    return max(errs) < 1.5e-2 and all(same)


def correctness(full=False):
    log("== correctness on GPU (rel. error vs float64 reference of the masked product) ==")
    dev = "cuda"
    worst = {"bf16": 0.0, "fp32": 0.0, "fp16": 0.0}
    fails = []
    cases = [(1000, (3000,)), (576, (576, 768, 960)), (1536, (1536, 3072)),
             (4096, (4096, 5120, 6144)), (14336, (4096,)), (960, (100, 200, 300, 400, 500, 600))]
    torch.manual_seed(1)
    n = 0
    for Kd, ends in cases:
        N = ends[-1]
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float16, "fp16")):
            wt = (torch.randn(Kd, N, device=dev) / math.sqrt(Kd)).to(dtype)
            for T in ((1, 2, 3, 8) if dtype == torch.bfloat16 else (1, 4)):
                for s in (0.0, 0.5, 0.9):
                    for use_bias in ((False, True) if s == 0.5 else (True,)):
                        x = torch.randn(T, Kd, device=dev).to(dtype)
                        ax = x.float().abs()
                        tau = torch.stack([torch.quantile(ax.flatten(), s) * torch.rand(Kd, device=dev) * 2
                                           for _ in ends]).float() if s > 0 else torch.zeros(len(ends), Kd, device=dev)
                        tau[:, ::13] = float("inf")
                        b = torch.randn(N, device=dev).to(dtype) if use_bias else None
                        r = ref64(x, wt, tau, ends, b)
                        y = K.sparse_linear_triton(x, wt, tau, ends, b)
                        y2 = K.sparse_linear_triton(x, wt, tau, ends, b)
                        yr = K.sparse_linear_reference(x, wt, tau, ends, b)
                        e = relerr(y, r)
                        er = relerr(yr, r)
                        tol = 1e-5 if dtype == torch.float32 else 1.5e-2
                        worst[name] = max(worst[name], e)
                        n += 1
                        if not (e < tol and er < tol and torch.equal(y, y2) and y.dtype == dtype
                                and y.shape == (T, N)):
                            fails.append((Kd, ends, name, T, s, use_bias, e, er, torch.equal(y, y2)))
    # forced configs incl. split and FMA paths
    check_cfgs = ALL_CANDS
    for cname, cfg in check_cfgs.items():
        for Kd, ends in [(1000, (576, 768, 3000))]:
            N = ends[-1]
            for T in ((3,) if cname in CANDS_TB else (1,)):
                x = torch.randn(T, Kd, device=dev).bfloat16()
                wt = (torch.randn(Kd, N, device=dev) / math.sqrt(Kd)).bfloat16()
                tau = torch.rand(len(ends), Kd, device=dev)
                b = torch.randn(N, device=dev).bfloat16()
                y = K.launch(x, wt, tau, ends, b, cfg)
                y2 = K.launch(x, wt, tau, ends, b, cfg)
                e = relerr(y, ref64(x, wt, tau, ends, b))
                n += 1
                if not (e < 1.5e-2 and torch.equal(y, y2)):
                    fails.append(("cfg", cname, Kd, ends, T, e, torch.equal(y, y2)))
    log(f"checks: {n}, worst rel err: {worst}, failures: {len(fails)}")
    for f in fails[:20]:
        log("  FAIL", f)

    # torch.compile(fullgraph) and CUDA graph capture through the registered op
    Kd, ends = 4096, (4096, 5120, 6144)
    N = ends[-1]
    wt = (torch.randn(Kd, N, device=dev) / 64).bfloat16()
    tau = torch.rand(3, Kd, device=dev)
    b = torch.randn(N, device=dev).bfloat16()

    def f(x):
        return K.sparse_linear_triton(x, wt, tau, ends, b) * 2 + 1

    res = {}
    for mode in ("default", "reduce-overhead"):
        try:
            torch._dynamo.reset()
            cf = torch.compile(f, fullgraph=True, mode=mode)
            errs = []
            for T in (1, 4, 1):
                for _ in range(3):
                    x = torch.randn(T, Kd, device=dev).bfloat16()
                    out = cf(x).clone()
                    errs.append(relerr((out.float() - 1) / 2, ref64(x, wt, tau, ends, b)))
            res[mode] = max(errs)
        except Exception as ex:  # noqa: BLE001
            res[mode] = f"ERROR {type(ex).__name__}: {str(ex)[:300]}"
    log("torch.compile(fullgraph=True):", res)
    try:
        xs = torch.randn(1, Kd, device=dev).bfloat16()
        g, yg = capture_graph(f, xs)
        errs = []
        for _ in range(3):
            xs.copy_(torch.randn(1, Kd, device=dev).bfloat16())
            g.replay()
            torch.cuda.synchronize()
            errs.append(relerr((yg.float() - 1) / 2, ref64(xs, wt, tau, ends, b)))
        log("CUDA graph capture of the op: max rel err", max(errs))
    except Exception as ex:  # noqa: BLE001
        log("CUDA graph capture ERROR", type(ex).__name__, str(ex)[:300])
    for cname in ("L128r32g8s3f", "L64r32g16s3f", "t64x512w4ef"):
        if not graph_replays_check(cname):
            fails.append(("graph", cname))
    # the kept-list experiment against the same reference (one threshold, one segment)
    x, tau1, q = make_inputs(4096, (4096,), 1, 0.5)
    wt1 = (torch.randn(4096, 4096, device=dev) / 64).bfloat16()
    for cfg in GATHER_CFGS:
        e = relerr(gather_list(kept_list(x, q), wt1, cfg), ref64(x, wt1, tau1, (4096,), None))
        log(f"kept-list {cfg} rel err: {e:.1e}")
        if not e < 1.5e-2:
            fails.append(("kept-list", cfg, e))
    return not fails


# ---------------------------------------------------------------------------------------------
def env_and_bandwidth():
    p = torch.cuda.get_device_properties(0)
    log(f"GPU: {p.name}, SMs {p.multi_processor_count}, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB, "
        f"mem {p.total_memory / 2**30:.0f} GiB")
    log(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
    try:
        import subprocess
        log(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
    except Exception:  # noqa: BLE001
        pass
    a = torch.empty(2 ** 29, device="cuda", dtype=torch.bfloat16).normal_()  # 1 GiB
    bcopy = torch.empty_like(a)
    t = bench(lambda: bcopy.copy_(a), rep=100)
    bw_copy = 2 * a.numel() * 2 / (t * 1e-6) / 1e12
    t2 = bench(lambda: a.sum(), rep=100)
    bw_read = a.numel() * 2 / (t2 * 1e-6) / 1e12
    log(f"device copy bandwidth (read+write): {bw_copy:.2f} TB/s; read-only (sum): {bw_read:.2f} TB/s")
    del a, bcopy
    torch.cuda.empty_cache()
    return bw_copy, bw_read


def run_shape(name, Kd, ends, teal, results, batches=(1, 2, 4, 8), sweep=True):
    """Graph-timed table of one shape: cuBLAS, every candidate (or the runtime's choice), TEAL's public kernel
    and the kept-list experiment at every level, batch 1; then batch 2/4/8 at 0/50/90%."""
    N = ends[-1]
    wbytes = Kd * N * 2
    ncp = min(64, max(2, math.ceil(400e6 / wbytes)))
    wts = [(torch.randn(Kd, N, device=DEVICE) / math.sqrt(Kd)).bfloat16() for _ in range(ncp)]
    ws = [w.t().contiguous() for w in wts]  # W [out, in] for F.linear
    wts16 = [w.half() for w in wts] if teal is not None else None
    ws16 = [w.t().contiguous() for w in wts16] if teal is not None else None
    log("")
    log(f"-- {name}: in {Kd}, out {N}, segments {ends}, weights {wbytes / 1e6:.1f} MB, {ncp} rotating weight copies")

    def timed(make_call):
        try:
            return graph_time(make_call, ncp, loop=16, replays=9)
        except Exception as ex:  # noqa: BLE001
            log(f"   ERROR {type(ex).__name__}: {str(ex)[:200]}")
            return float("nan")

    for s in SPARSITIES if 1 in batches else ():  # --batches without 1: the batched rows alone
        x, tau, q = make_inputs(Kd, ends, 1, s, seed=11)
        kept = float((x.float().abs() > q).float().mean())
        kept_percent = round(100 * (1 - s))  # what a stored level of this sparsity tells the runtime
        runtime = K.choose_config(1, Kd, N, kept_percent)
        cands = {k: v for k, v in CANDS_T1.items() if k in SELECTED} if sweep else {"runtime": runtime}
        row = {"shape": name, "T": 1, "sparsity": s, "kept": kept, "dense_bytes": wbytes, "runtime_config": str(runtime)}
        row["cublas"] = timed(lambda i: F.linear(x, ws[i]))
        for cname, cfg in cands.items():
            row[cname] = timed(lambda i: K.launch(x, wts[i], tau, ends, None, cfg))
        if teal is not None:
            x16, sbin = x.half(), int(round(s * 100))
            teal_public(teal, x16, wts16[0], ends, q, sbin)  # autotune outside the graph
            row["teal_fp16"] = timed(lambda i: teal_public(teal, x16, wts16[i], ends, q, sbin))
            row["cublas_fp16"] = timed(lambda i: F.linear(x16, ws16[i]))
            for cname in FP16_PROBES if sweep else ():  # is bf16 slower than fp16 in our kernel
                row["fp16:" + cname] = timed(lambda i: K.launch(x16, wts16[i], tau, ends, None, ALL_CANDS[cname]))
        results.append(row)
        ours = {k: v for k, v in row.items() if k in cands}
        best = min(ours, key=ours.get)
        if sweep:
            row["runtime"] = timed(lambda i: K.launch(x, wts[i], tau, ends, None, runtime))
        teal_s = (f" | TEAL fp16 {row['teal_fp16']:.1f} (x{row['cublas_fp16'] / row['teal_fp16']:.2f} of fp16 cuBLAS "
                  f"{row['cublas_fp16']:.1f}), best/TEAL {row['teal_fp16'] / row[best]:.2f}") if teal is not None else ""
        log(f"{name:8} {s:4.2f} kept {kept:4.2f} | cuBLAS {row['cublas']:6.1f} | best {best} ({runtime.kind} is the runtime's) {row[best]:6.1f} "
            f"x{row['cublas'] / row[best]:.2f} effBW {kept * wbytes / row[best] / 1e6:.2f} TB/s{teal_s} | "
            f"runtime's choice {row['runtime']:.1f} x{row['cublas'] / row['runtime']:.2f}")
        log("    all: " + "  ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)
                                 and (k in cands or k.startswith(("fp16:", "teal", "runtime")))))
    for T in [b for b in batches if b > 1]:
        for s in (0.0, 0.5, 0.9):
            x, tau, q = make_inputs(Kd, ends, T, s, seed=T)
            union = float((x.float().abs() > q).any(0).float().mean())
            row = {"shape": name, "T": T, "sparsity": s, "kept": union, "dense_bytes": wbytes}
            row["cublas"] = timed(lambda i: F.linear(x, ws[i]))
            for cname, cfg in ({k: v for k, v in CANDS_TB.items() if k in SELECTED} if sweep
                               else {"runtime": K.choose_config(T, Kd, N)}).items():
                row[cname] = timed(lambda i: K.launch(x, wts[i], tau, ends, None, cfg))
            results.append(row)
            ours = {k: v for k, v in row.items() if k in CANDS_TB or k == "runtime"}
            if not ours:
                continue
            best = min(ours, key=ours.get)
            log(f"{name:8} T={T} {s:4.2f} union {union:4.2f} | cuBLAS {row['cublas']:6.1f} | best {best} {row[best]:6.1f} "
                f"x{row['cublas'] / row[best]:.2f} | all: " + "  ".join(f"{k} {v:.1f}" for k, v in ours.items()))
    del wts, ws, wts16, ws16
    torch.cuda.empty_cache()


def summary(results, bw_copy):
    log("")
    log(f"== summary: speed-up over cuBLAS (F.linear) under CUDA graphs, batch 1; copy BW {bw_copy:.2f} TB/s ==")
    for name in SHAPES:
        rs = [r for r in results if r["shape"] == name and r["T"] == 1]
        if not rs:
            continue
        for key in [k for k in rs[0] if k in CANDS_T1 or k == "runtime"]:
            log(f"{name:8} {key:14} " + "  ".join(f"{int(r['sparsity'] * 100)}%:{r['cublas'] / r[key]:.2f}" for r in rs))
        if "teal_fp16" in rs[0]:
            log(f"{name:8} {'TEAL fp16':14} " + "  ".join(
                f"{int(r['sparsity'] * 100)}%:{r['cublas_fp16'] / r['teal_fp16']:.2f}" for r in rs))
            log(f"{name:8} {'TEAL / ours':14} " + "  ".join(
                f"{int(r['sparsity'] * 100)}%:{r['teal_fp16'] / r['runtime']:.2f}" for r in rs))
    for T in (2, 4, 8):
        rs = [r for r in results if r["T"] == T and "runtime" in r]
        if rs:
            log(f"T={T} runtime over cuBLAS: " + "  ".join(
                f"{r['shape']}@{int(r['sparsity'] * 100)}%:{r['cublas'] / r['runtime']:.2f}" for r in rs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="time every candidate config (else the runtime's choose_config)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--full-check", action="store_true", help="check every candidate config on the GPU")
    ap.add_argument("--quick-check", action="store_true",
                    help="a minute's correctness check (default op eager/compiled/graphed, every candidate tile config)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes of the table (1 = the batch-1 rows; others: the batched rows)")
    ap.add_argument("--candidates", default="", help="comma-separated candidate names (default: all)")
    ap.add_argument("--out", default="kernel_bench.txt")
    ap.add_argument("--smoke", action="store_true", help="one small shape on the CPU (Triton's interpreter): checks the script runs")
    args = ap.parse_args()
    global DEVICE, SPARSITIES, graph_time
    if args.smoke:
        SHAPES.clear()
        SHAPES["small"] = (192, (64, 160))
        DEVICE, SPARSITIES, graph_time = "cpu", [0.0, 0.5, 0.9], one_call_time
        args.skip_check, args.shapes, args.batches = True, "small", "1,2"
    if args.candidates:
        SELECTED.intersection_update(args.candidates.split(","))
    global _LOG_PATH
    _LOG_PATH = args.out + ".partial"
    open(_LOG_PATH, "w").close()
    t0 = time.time()
    bw_copy, _ = env_and_bandwidth() if DEVICE == "cuda" else (1.0, 1.0)
    teal = load_teal_kernels() if DEVICE == "cuda" else None
    log("TEAL's public kernel: " + ("loaded from .peers/teal" if teal is not None else "not found (.peers/teal)"))
    if args.quick_check:
        quick_check()
    if not args.skip_check:
        ok = correctness(args.full_check)
        log(f"[{time.time() - t0:.0f}s] correctness {'OK' if ok else 'FAILED'}")
    res = []
    for name, (Kd, ends) in SHAPES.items():
        if name not in args.shapes.split(","):
            continue
        run_shape(name, Kd, ends, teal, res, batches=tuple(int(b) for b in args.batches.split(",")), sweep=args.sweep)
        log(f"[{time.time() - t0:.0f}s] {name} done")
    summary(res, bw_copy)
    log(f"[{time.time() - t0:.0f}s] done")
    with open(args.out, "w") as fh:
        fh.write("\n".join(LINES) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"results": res, "copy_bw_tbs": bw_copy}, fh, indent=1)


if __name__ == "__main__":
    main()
