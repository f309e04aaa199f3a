"""Kernel benchmark for winaconv's activation-sparse linear (runtime/kernels.py) on one GPU.

One run does everything (the GPU lease is short):
  1. environment + measured device copy bandwidth;
  2. correctness on the GPU against a float64 reference (eager op, torch.compile(fullgraph=True),
     CUDA-graph capture, determinism), odd and Llama-3-8B shapes, T = 1..8;
  3. optional config sweep (--sweep) for batch 1 and batch 2/4/8;
  4. the table: torch dense (F.linear on W[out,in], and mm on W^T), a TEAL-style split-K atomic
     baseline written here, and the winaconv kernel, at sparsity 0..90 %, timed with
     triton.testing.do_bench (median, L2 flushed) and under CUDA graphs (a loop of launches over
     rotating weight copies, so nothing is served from L2).

Usage (on the GPU machine, repo root):
    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py --sweep --out $OUT/kernel_h100.txt
    # the table alone (default config vs dense and the TEAL-style baseline), after a minute's check:
    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench.py --quick-check --skip-check --out $OUT/kernel_h200.txt
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import triton
import triton.language as tl
from triton.testing import do_bench

from common import capture_graph
from winaconv_runtime import kernels as K

SHAPES = {  # name: (in, segment_ends)
    "qkv": (4096, (4096, 5120, 6144)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 28672)),
    "down": (14336, (4096,)),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]
LINES = []
_LOG_PATH = None  # set by main(): every line is appended as it is logged (a timed-out run keeps its lines)


def log(*a):
    s = " ".join(str(v) for v in a)
    print(s, flush=True)
    LINES.append(s)
    if _LOG_PATH:
        with open(_LOG_PATH, "a") as fh:
            fh.write(s + "\n")


# ---------------------------------------------------------------------------------------------
# TEAL-style baseline (own implementation of the published design: W^T rows, split-K tiles,
# |x| > t masked row loads, fp32 atomics into a zeroed output; batch 1 only)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _teal_style_kernel(x_ptr, w_ptr, y_ptr, thr, K_, N_, stride_w,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = ks < K_
    cmask = cols < N_
    xv = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
    keep = tl.abs(xv) > thr
    w = tl.load(w_ptr + ks[:, None] * stride_w + cols[None, :], mask=keep[:, None] & cmask[None, :], other=0.0)
    acc = tl.sum(xv[:, None] * w.to(tl.float32), axis=0)
    tl.atomic_add(y_ptr + cols, acc, mask=cmask)


def teal_style(x, wt, thr, cfg):
    bk, bn, nw = cfg
    Kd, N = wt.shape
    y = torch.zeros((1, N), device=x.device, dtype=torch.float32)  # memset launch, as TEAL
    _teal_style_kernel[(triton.cdiv(N, bn), triton.cdiv(Kd, bk))](x, wt, y, thr, Kd, N, wt.stride(0),
                                                                   BLOCK_K=bk, BLOCK_N=bn, num_warps=nw)
    return y


TEAL_CFGS = [(128, 128, 4), (256, 64, 4), (64, 256, 4), (256, 128, 8), (128, 256, 8), (512, 64, 4)]

# ---------------------------------------------------------------------------------------------
KC = K.KernelConfig
# Tile geometries tried (the retired stream / sem / gather kinds and their numbers: NOTES_kernels.md).
CANDS_T1 = {
    "t64x512w4": KC(block_n=64, block_k=512),
    "t64x256w4": KC(block_n=64, block_k=256),
    "t32x512w4": KC(block_n=32, block_k=512),
    "t128x256w8": KC(block_n=128, block_k=256, num_warps=8),
    "t64x256w4i2": KC(block_n=64, block_k=256, iters=2),
    "t32x1024w8": KC(block_n=32, block_k=1024, num_warps=8),
    "t128x128w4": KC(block_n=128, block_k=128),
}
CANDS_TB = {
    "d64x256w4": KC(block_n=64, block_k=256),
    "d64x128w4": KC(block_n=64, block_k=128),
    "d128x128w4": KC(block_n=128, block_k=128),
    "d32x256w4": KC(block_n=32, block_k=256),
    "d64x512w8": KC(block_n=64, block_k=512, num_warps=8),
}
CANDS_MINI = {  # follow-up questions after the first sweep (more warps / taller tiles at batch 1)
    "t64x512w4": KC(block_n=64, block_k=512),
    "t64x512w8": KC(block_n=64, block_k=512, num_warps=8),
    "t64x1024w8": KC(block_n=64, block_k=1024, num_warps=8),
    "t128x512w8": KC(block_n=128, block_k=512, num_warps=8),
    "t32x512w2": KC(block_n=32, block_k=512, num_warps=2),
}
ALL_CANDS = {**CANDS_T1, **CANDS_TB, **CANDS_MINI}


def make_inputs(Kd, ends, T, s, dtype=torch.bfloat16, seed=0, dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn((T, Kd), device=dev, dtype=torch.float32, generator=g).to(dtype)
    ax = x.float().abs().flatten()
    q = 0.0 if s <= 0 else float(torch.quantile(ax[:2 ** 24], s))
    tau = torch.full((len(ends), Kd), q, device=dev, dtype=torch.float32)
    return x, tau, q


def bench(fn, warmup=10, rep=40):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


def graph_time(make_call, n_copies, loop=24, replays=15):
    """Capture `loop` launches cycling over weight copies; median replay time / loop, in us."""
    g, _ = capture_graph(lambda: [make_call(i % n_copies) for i in range(loop)])
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / loop)
    ts.sort()
    del g
    return ts[len(ts) // 2]


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
        worst, same = 0.0, True
        T = 1 if cname in CANDS_T1 else 3
        for Kd, ends in [(4096, (4096, 5120, 6144)), (14336, (4096,))]:
            wt = (torch.randn(Kd, ends[-1], device="cuda") / math.sqrt(Kd)).bfloat16()
            for s in (0.0, 0.5, 0.9):
                x, tau, _ = make_inputs(Kd, ends, T, s, seed=3)
                tau[:, ::13] = float("inf")
                y = K._launch(x, wt, tau, ends, None, cfg)
                same = same and torch.equal(y, K._launch(x, wt, tau, ends, None, cfg))
                worst = max(worst, relerr(y, ref64(x, wt, tau, ends, None)))
        log(f"{cname} T={T} worst rel err vs float64 {worst:.2e}, deterministic {same}")


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
    check_cfgs = ALL_CANDS if full else {**CANDS_MINI, "d128x128w4": CANDS_TB["d128x128w4"]}
    for cname, cfg in check_cfgs.items():
        for Kd, ends in [(1000, (576, 768, 3000))]:
            N = ends[-1]
            for T in ((3,) if cname in CANDS_TB else (1,)):
                x = torch.randn(T, Kd, device=dev).bfloat16()
                wt = (torch.randn(Kd, N, device=dev) / math.sqrt(Kd)).bfloat16()
                tau = torch.rand(len(ends), Kd, device=dev)
                b = torch.randn(N, device=dev).bfloat16()
                y = K._launch(x, wt, tau, ends, b, cfg)
                y2 = K._launch(x, wt, tau, ends, b, cfg)
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
    # TEAL-style baseline sanity
    x, tau1, q = make_inputs(4096, (4096,), 1, 0.5)
    wt1 = (torch.randn(4096, 4096, device=dev) / 64).bfloat16()
    yt = teal_style(x, wt1, q, TEAL_CFGS[0])
    log("TEAL-style baseline rel err:", relerr(yt, ref64(x, wt1, tau1, (4096,), None)))
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


def pick(times):
    gm = {c: math.exp(sum(math.log(v) for v in ts) / len(ts)) for c, ts in times.items()}
    return sorted(gm, key=gm.get)


def run_shape(name, Kd, ends, do_sweep, results, best, mini=False, batches=(1, 2, 4, 8)):
    N = ends[-1]
    wbytes = Kd * N * 2
    ncp = max(2, math.ceil(400e6 / wbytes))
    wts = [(torch.randn(Kd, N, device="cuda") / math.sqrt(Kd)).bfloat16() for _ in range(ncp)]
    ws = [w.t().contiguous() for w in wts]  # W [out, in] for F.linear

    def ours(cfg, x, tau):
        return lambda i: K._launch(x, wts[i], tau, ends, None, cfg)

    if mini:
        times = {}
        for cname, cfg in CANDS_MINI.items():
            ts = []
            for s in (0.0, 0.5, 0.8):
                x, tau, _ = make_inputs(Kd, ends, 1, s, seed=1)
                ts.append(graph_time(ours(cfg, x, tau), ncp, loop=16, replays=7))
            times[cname] = ts
        log(f"mini-sweep {name} T=1 graph us at s=(0, 0.5, 0.8): " + "; ".join(
            f"{c} " + "/".join(f"{v:.1f}" for v in times[c]) for c in pick(times)))
    def sweep(label, T, cands):
        """Graph-time every candidate config at batch T; returns the names, fastest first (geomean)."""
        sps = (0.0, 0.5, 0.8) if T == 1 else (0.5,)
        times = {}
        for cname, cfg in cands.items():
            try:
                ts = []
                for s in sps:
                    x, tau, _ = make_inputs(Kd, ends, T, s, seed=T)
                    ts.append(graph_time(ours(cfg, x, tau), ncp, loop=16, replays=7))
                times[cname] = ts
            except Exception as ex:  # noqa: BLE001
                log(f"  {label} {name} T={T} {cname}: ERROR {type(ex).__name__} {str(ex)[:200]}")
        order = pick(times)
        if order:
            log(f"{label} {name} T={T} graph us at s={sps}: " + "; ".join(
                f"{c} " + "/".join(f"{v:.1f}" for v in times[c]) for c in order))
        return order

    if do_sweep:
        for T in (1, 2, 4, 8):
            best[(name, T)] = sweep("sweep", T, CANDS_T1 if T == 1 else CANDS_TB)[0]
        x, tau, q = make_inputs(Kd, ends, 1, 0.5)
        tt = {c: [graph_time(lambda i: teal_style(x, wts[i], q, c), ncp, loop=16, replays=7)] for c in TEAL_CFGS}
        best[(name, "teal")] = pick(tt)[0]
        log(f"sweep {name} TEAL-style at 50%: " + "; ".join(f"{c}: {tt[c][0]:.1f}" for c in pick(tt)))

    def cfg_for(T):
        c = best.get((name, T))
        return ALL_CANDS[c] if c else K.choose_config(T, Kd, N)

    cfg = cfg_for(1)
    tcfg = best.get((name, "teal"), (512, 64, 4))
    log("")
    log(f"-- {name}: in {Kd}, out {N}, segments {ends}, weights {wbytes / 1e6:.1f} MB, ours {dataclasses.astuple(cfg)}, "
        f"teal-style {tcfg}, {ncp} rotating weight copies")
    log(f"{'shape':8} {'sp':>4} {'union':>5} | {'g.dense':>7} {'g.teal':>6} {'g.ours':>6} {'x dense':>7} {'x teal':>6} "
        f"{'effBW':>5} | {'e.dense':>7} {'e.mmWt':>6} {'e.teal':>6} {'e.ours':>6}")
    for s in SPARSITIES:
        x, tau, q = make_inputs(Kd, ends, 1, s, seed=11)
        union = float((x.float().abs() > q).any(0).float().mean())
        g_dense = graph_time(lambda i: F.linear(x, ws[i]), ncp)
        g_teal = graph_time(lambda i: teal_style(x, wts[i], q, tcfg), ncp)
        g_ours = graph_time(ours(cfg, x, tau), ncp)
        t_dense = bench(lambda: F.linear(x, ws[0]))
        t_mm = bench(lambda: torch.mm(x, wts[0]))
        t_teal = bench(lambda: teal_style(x, wts[0], q, tcfg))
        t_ours = bench(lambda: K._launch(x, wts[0], tau, ends, None, cfg))
        rb = union * wbytes
        results.append(dict(shape=name, T=1, sparsity=s, union=union, dense=t_dense, mm_wt=t_mm, teal=t_teal,
                            ours=t_ours, g_dense=g_dense, g_teal=g_teal, g_ours=g_ours, read_bytes=rb,
                            cfg=dataclasses.astuple(cfg)))
        log(f"{name:8} {s:4.2f} {union:5.2f} | {g_dense:7.1f} {g_teal:6.1f} {g_ours:6.1f} {g_dense / g_ours:7.2f} "
            f"{g_teal / g_ours:6.2f} {rb / g_ours / 1e6:5.2f} | {t_dense:7.1f} {t_mm:6.1f} {t_teal:6.1f} {t_ours:6.1f}")
    for T in [b for b in batches if b > 1]:
        cfg_b = cfg_for(T)
        for s in (0.0, 0.5, 0.9):
            x, tau, q = make_inputs(Kd, ends, T, s, seed=T)
            union = float((x.float().abs() > q).any(0).float().mean())
            g_dense = graph_time(lambda i: F.linear(x, ws[i]), ncp)
            g_ours = graph_time(ours(cfg_b, x, tau), ncp)
            results.append(dict(shape=name, T=T, sparsity=s, union=union, g_dense=g_dense, g_ours=g_ours,
                                read_bytes=union * wbytes, cfg=dataclasses.astuple(cfg_b)))
            log(f"{name:8} T={T} sp {s:4.2f} union {union:5.2f} | graph dense {g_dense:6.1f} ours {g_ours:6.1f} "
                f"x{g_dense / g_ours:5.2f} effBW {union * wbytes / g_ours / 1e6:.2f} TB/s  cfg {dataclasses.astuple(cfg_b)}")
    del wts, ws
    torch.cuda.empty_cache()


def summary(results, bw_copy):
    log("")
    log(f"== summary: speed-up over dense F.linear under CUDA graphs, batch 1; copy BW {bw_copy:.2f} TB/s ==")
    for name in SHAPES:
        rs = [r for r in results if r["shape"] == name and r["T"] == 1]
        if not rs:
            continue
        log(f"{name:8} ours " + "  ".join(f"{int(r['sparsity'] * 100)}%:{r['g_dense'] / r['g_ours']:.2f}" for r in rs))
        log(f"{name:8} teal " + "  ".join(f"{int(r['sparsity'] * 100)}%:{r['g_dense'] / r['g_teal']:.2f}" for r in rs))
    for T in (2, 4, 8):
        rs = [r for r in results if r["T"] == T]
        if not rs:  # batch size not run (--batches)
            continue
        log(f"T={T}: " + "  ".join(f"{r['shape']}@{int(r['sparsity'] * 100)}%:{r['g_dense'] / r['g_ours']:.2f}" for r in rs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="pick configs by measurement (else the runtime's choose_config)")
    ap.add_argument("--mini", action="store_true", help="small follow-up sweep at batch 1 (table still uses choose_config)")
    ap.add_argument("--full-check", action="store_true", help="check every candidate config on the GPU")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--quick-check", action="store_true",
                    help="a minute's correctness check (default op eager/compiled/graphed, every candidate tile config)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes of the table (1 = the batch-1 rows; others: the batched rows)")
    ap.add_argument("--out", default="kernel_bench.txt")
    args = ap.parse_args()
    global _LOG_PATH
    _LOG_PATH = args.out + ".partial"
    open(_LOG_PATH, "w").close()
    t0 = time.time()
    bw_copy, _ = env_and_bandwidth()
    ok = True
    if args.quick_check:
        quick_check()
    if not args.skip_check:
        ok = correctness(args.full_check)
        log(f"[{time.time() - t0:.0f}s] correctness {'OK' if ok else 'FAILED'}")
    best, res = {}, []
    for name, (Kd, ends) in SHAPES.items():
        if name not in args.shapes.split(","):
            continue
        run_shape(name, Kd, ends, args.sweep, res, best, mini=args.mini,
                  batches=tuple(int(b) for b in args.batches.split(",")))
        log(f"[{time.time() - t0:.0f}s] {name} done")
    log(f"best: {best}")
    summary(res, bw_copy)
    log(f"[{time.time() - t0:.0f}s] done")
    with open(args.out, "w") as fh:
        fh.write("\n".join(LINES) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"results": res, "best": {str(k): v for k, v in best.items()}, "copy_bw_tbs": bw_copy}, fh, indent=1)


if __name__ == "__main__":
    main()
