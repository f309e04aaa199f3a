"""Probe (issue 13): could one fused, JIT-compiled call per product (numba: mask, compaction and row gather in one
loop, output columns split over 2 threads) beat the runtime's embedding_bag gather, whose ~10 torch calls per
product are what SmolLM2's decode loses? Prints the relative error against a float64 masked product, then us per
product at 50% kept: cold (weights cycled through 128 MiB) and hot (one matrix); "bag" is the runtime's path.

    pip install numba   # not a winaconv dependency
    python3 benchmarks/experiments/cpu_numba_gather.py   # output: results/cpu_numba_gather.txt
"""
import time, statistics, numpy as np, torch, torch.nn.functional as F
from numba import njit, prange, config
from winaconv_runtime import cpu_kernels as K

@njit(fastmath=True, cache=True, nogil=True)
def kept_channels(x, tau):
    """The kept channels and their values, compacted."""
    idx = np.empty(x.shape[0], np.int64); vals = np.empty(x.shape[0], np.float32); k = 0
    for i in range(x.shape[0]):
        v = x[i]
        if abs(v) > tau[i]:
            idx[k] = i; vals[k] = v; k += 1
    return idx, vals, k


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def gather_f32(x, tau, wt, out, chunks):
    n_in, n_out = wt.shape
    idx, vals, k = kept_channels(x, tau)
    step = (n_out + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * step; hi = min(n_out, lo + step)
        for t in range(lo, hi): out[t] = 0.0
        for j in range(k):
            v = vals[j]; i = idx[j]
            for t in range(lo, hi):
                out[t] += v * wt[i, t]
    return k

@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def gather_bf16(x, tau, wt, out, chunks):  # x: float32, wt: uint16 bits of bf16, out float32
    n_in, n_out = wt.shape
    idx, vals, k = kept_channels(x, tau)
    step = (n_out + chunks - 1) // chunks
    for c in prange(chunks):
        lo = c * step; hi = min(n_out, lo + step)
        tmp = np.empty(hi - lo, np.uint32); f = tmp.view(np.float32)
        acc = np.zeros(hi - lo, np.float32)
        for j in range(k):
            v = vals[j]; i = idx[j]
            for t in range(hi - lo):
                tmp[t] = np.uint32(wt[i, lo + t]) << 16
            for t in range(hi - lo):
                acc[t] += v * f[t]
        for t in range(hi - lo): out[lo + t] = acc[t]
    return k

def nb_product(x, tau, wt):
    out = torch.empty(wt.shape[1], dtype=torch.float32)
    if wt.dtype == torch.float32:
        gather_f32(x.numpy(), tau.numpy(), wt.numpy(), out.numpy(), 2)
        return out
    gather_bf16(x.float().numpy(), tau.numpy(), wt.view(torch.uint16).numpy(), out.numpy(), 2)
    return out.to(wt.dtype)

def per_call(fn, items):
    s = time.perf_counter()
    for it in items: fn(it)
    return (time.perf_counter() - s) / len(items) * 1e6

for dt in (torch.float32, torch.bfloat16):
    for i, o in ((576, 192), (576, 576), (576, 1536), (1536, 576), (2048, 8192), (8192, 2048)):
        n = max(4, (128 << 20) // (i * o * dt.itemsize))
        g = torch.Generator().manual_seed(0)
        Ws = [torch.randn(o, i, generator=g).to(dt) for _ in range(n)]
        Wts = [w.t().contiguous() for w in Ws]
        x = torch.randn(1, i, generator=g).to(dt)
        tau = torch.full((1, i), torch.quantile(x.float().abs(), 0.5).item())
        ref = (x.double() * (x.double().abs() > tau.double())) @ Ws[0].double().t()
        got = nb_product(x[0], tau[0], Wts[0]).double()
        err = ((got - ref[0]).norm() / ref.norm()).item()
        plan = K.GatherPlan(1.0, 2)
        vs = {"dense": lambda k: F.linear(x, Ws[k]),
              "bag": lambda k: K.sparse_linear_cpu(x, tau, [Wts[k]], None, plan),
              "numba": lambda k: nb_product(x[0], tau[0], Wts[k])}
        cells = {k: [] for k in vs}
        items = list(range(n))
        for f in vs.values(): f(0)
        for _ in range(7):
            for name, f in vs.items(): cells[name].append(per_call(f, items))
        m = {k: statistics.median(v) for k, v in cells.items()}
        hot = {k: per_call(f, [0] * 500) for k, f in vs.items()}
        print(f"{str(dt)[6:]} {i}x{o} err {err:.1e} cold: " + " ".join(f"{k} {v:.0f}" for k, v in m.items())
              + " | hot: " + " ".join(f"{k} {v:.0f}" for k, v in hot.items()), flush=True)
