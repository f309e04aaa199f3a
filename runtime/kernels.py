"""Activation-sparse linear kernel for winaconv (WINA / TEAL rule).

y[t, o] = sum_i x[t, i] * keep[t, seg(o), i] * weight_t[i, o] + bias[o]
keep[t, s, i] = |x[t, i]| > tau[s, i]          (tau already divided by the column norm for WINA)

weight_t is W^T ([in, out], contiguous) so that one input channel is one contiguous row: a dropped
channel's row is never read.  Several output segments (fused q/k/v, gate/up) with their own
thresholds share one launch.

The Triton kernel ("tile"; measurements behind every choice: benchmarks/kernels.md, NOTES_kernels.md):
  * grid = (column blocks of all segments, K tiles); program (n, k) multiplies one [BLOCK_K rows,
    BLOCK_N cols] tile with every load issued up front.  A weight row is loaded only when some token
    of the batch keeps that channel (predicated loads skip the memory traffic), so at batch > 1 a kept
    row is read ONCE for all tokens and each token multiplies with its own masked activations (a
    [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tensor-core product, rows >= T are zero); at batch 1 the
    product is FMA in fp32;
  * the K partials (fp32, uninitialised workspace) are summed in a fixed order by a small second
    launch: deterministic, no float atomics, no memset;
  * all loads are bounds-checked on both dimensions (any in/out, segment ends not multiples of the
    block); up to 4 segments per launch, more segments take more launches.
Kinds that were measured and retired (a software-pipelined "stream" kernel, with and without split-K;
a last-program "sem" reduction; a "gather" kernel over compacted kept rows) are described with their
numbers in benchmarks/NOTES_kernels.md; their code is in the git history.

This file must import with only torch installed (it is copied into model folders and loaded by
transformers' trust_remote_code machinery): it imports only torch, triton (optional) and the stdlib.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

try:  # triton is optional: CPU-only installs use sparse_linear_reference / masked dense.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "choose_config",
    "sparse_linear_reference",
    "sparse_linear_triton",
    "use_sparse_kernel",
]

# Kernel version: part of the torch.library op name so that two different copies of this file
# loaded in one process (package + model folder) never silently share an incompatible op.
# v2: the op lost v1's `counters` argument (the retired "sem" reduction).
_OP_VERSION = 2
_MAX_SEG_PER_LAUNCH = 4
# Every output / workspace buffer of a launch comes from here: the tests swap in a poisoning
# allocator to catch unwritten elements without patching torch itself.
_new_buffer = torch.empty


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------
def _check_args(x, weight_t, tau, segment_ends, bias):
    if x.dim() != 2:
        raise ValueError(f"x must be [T, in], got {tuple(x.shape)}")
    if weight_t.dim() != 2 or weight_t.shape[0] != x.shape[1]:
        raise ValueError(f"weight_t must be [in, out] with in={x.shape[1]}, got {tuple(weight_t.shape)}")
    n_out = weight_t.shape[1]
    ends = [int(e) for e in segment_ends]
    if not ends or ends[-1] != n_out or any(b <= a for a, b in zip([0] + ends[:-1], ends)):
        raise ValueError(f"segment_ends {tuple(ends)} must be strictly increasing and end at out={n_out}")
    if tau.dim() != 2 or tau.shape[0] != len(ends) or tau.shape[1] != x.shape[1]:
        raise ValueError(f"tau must be [n_seg={len(ends)}, in={x.shape[1]}], got {tuple(tau.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n_out):
        raise ValueError(f"bias must be [out={n_out}], got {tuple(bias.shape)}")
    return ends


def sparse_linear_reference(x, weight_t, tau, segment_ends, bias=None, accumulate=torch.float32):
    """Exact rule in plain torch (any device / dtype): the keep decisions in float32, as the kernels make
    them, the products in `accumulate`. Returns x.dtype, or float64 when accumulating in float64 (the
    reference benchmarks compare against)."""
    ends = _check_args(x, weight_t, tau, segment_ends, bias)
    xf = x.to(accumulate)
    ax = x.float().abs()
    tau = tau.to(device=x.device, dtype=torch.float32)
    outs = []
    start = 0
    for s, end in enumerate(ends):
        xm = torch.where(ax > tau[s], xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
        outs.append(xm @ weight_t[:, start:end].to(accumulate))
        start = end
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if bias is not None:
        y = y + bias.to(accumulate)
    return y if accumulate == torch.float64 else y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _segment_of(pid, e0, e1, e2, e3, o1, o2, o3, N_SEG: tl.constexpr):
        """Segment index, first/last+1 column and first program id of the segment owning `pid`."""
        seg = pid * 0
        start = pid * 0
        end = pid * 0 + e0
        poff = pid * 0
        if N_SEG > 1:
            c = pid >= o1
            seg = tl.where(c, 1, seg)
            start = tl.where(c, e0, start)
            end = tl.where(c, e1, end)
            poff = tl.where(c, o1, poff)
        if N_SEG > 2:
            c = pid >= o2
            seg = tl.where(c, 2, seg)
            start = tl.where(c, e1, start)
            end = tl.where(c, e2, end)
            poff = tl.where(c, o2, poff)
        if N_SEG > 3:
            c = pid >= o3
            seg = tl.where(c, 3, seg)
            start = tl.where(c, e2, start)
            end = tl.where(c, e3, end)
            poff = tl.where(c, o3, poff)
        return seg, start, end, poff

    @triton.jit
    def _masked_x(x_ptr, tau_row, ks, K, t_idx, T, stride_x, USE_DOT: tl.constexpr):
        """Masked activations of rows ks: ([BT, BK] or [BK]) and the row mask 'some token keeps k'."""
        kmask = ks < K
        th = tl.load(tau_row + ks, mask=kmask, other=float("inf"))
        if USE_DOT:
            xt = tl.load(x_ptr + t_idx[:, None] * stride_x + ks[None, :],
                         mask=(t_idx < T)[:, None] & kmask[None, :], other=0.0)
            keep = tl.abs(xt.to(tl.float32)) > th[None, :]
            xm = tl.where(keep, xt, tl.zeros_like(xt))
            row = tl.max(keep.to(tl.int32), axis=0) > 0
        else:
            xv = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            row = tl.abs(xv) > th
            xm = tl.where(row, xv, 0.0)
        return xm, row

    @triton.jit
    def _accumulate(acc, xm, w, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
        if USE_DOT:
            if IEEE:  # fp32 inputs, or the CPU interpreter (its bf16 dot is broken in triton 3.9)
                acc = tl.dot(xm.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xm.to(w.dtype), w, acc)
        else:
            acc += xm[:, None] * w.to(tl.float32)
        return acc

    @triton.jit
    def _wina_tile_kernel(
        x_ptr, w_ptr, tau_ptr, b_ptr, y_ptr, ws_ptr,
        T, K, stride_x, stride_w, stride_tau, stride_y, stride_split, stride_ws,
        e0, e1, e2, e3, o1, o2, o3,
        N_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
        SPLIT: tl.constexpr,        # False: one K split, store y directly; True: fp32 partials for the reduce
        ITERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Split-K: program (n, k) multiplies the [ITERS*BLOCK_K, BLOCK_N] tile (n, k); every load of
        the program is issued up front (no loop-carried dependency), occupancy hides the latency."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        seg, start, end, poff = _segment_of(pid, e0, e1, e2, e3, o1, o2, o3, N_SEG)
        cols = start + (pid - poff) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < end
        t_idx = tl.arange(0, BLOCK_T)
        tau_row = tau_ptr + seg * stride_tau
        rk = tl.arange(0, BLOCK_K)
        if USE_DOT:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for it in tl.static_range(ITERS):
            ks = (pid_k * ITERS + it) * BLOCK_K + rk
            xm, row = _masked_x(x_ptr, tau_row, ks, K, t_idx, T, stride_x, USE_DOT)
            w = tl.load(w_ptr + ks[:, None] * stride_w + cols[None, :], mask=row[:, None] & cmask[None, :], other=0.0)
            acc = _accumulate(acc, xm, w, USE_DOT, IEEE)
        if USE_DOT:
            out = acc
        else:
            out = tl.sum(acc, axis=0)[None, :]
        omask = (t_idx < T)[:, None] & cmask[None, :]
        if SPLIT:
            tl.store(ws_ptr + pid_k * stride_split + t_idx[:, None] * stride_ws + cols[None, :], out, mask=omask)
        else:
            if HAS_BIAS:
                out = out + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + t_idx[:, None] * stride_y + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _split_reduce_kernel(ws_ptr, b_ptr, y_ptr, N, total, stride_split, stride_ws, stride_y,
                             NSPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        t = offs // N
        n = offs - t * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(NSPLIT):  # fixed order: deterministic
            acc += tl.load(ws_ptr + s * stride_split + t * stride_ws + n, mask=m, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * stride_y + n, acc.to(y_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# configuration (measured on the H100 and the H200, see benchmarks/kernels.md)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Tile geometry of one launch: block_n output columns x (iters x block_k) input rows per program."""

    block_n: int = 64
    block_k: int = 512
    num_warps: int = 4
    iters: int = 1
    num_stages: int = 1


def choose_config(num_tokens: int, in_features: int, out_features: int) -> KernelConfig:
    """Launch configuration, a pure function of the shape (same config in eager, compile, graphs)."""
    if _interpreting():
        # the interpreter runs every program in numpy: big tiles = fewer python-level steps
        return KernelConfig(block_n=512, block_k=512)
    if num_tokens == 1:
        # best of 13 candidates on all four Llama-3-8B shapes (graph-timed sweep, kernel_h100.txt);
        # still the best against 7 split-K stream configs on the H200 (kernel_stream_h200.txt)
        return KernelConfig(block_n=64, block_k=512)
    # batch > 1: tensor-core tile, best of 8 candidates -- but still slower than dense (see
    # use_sparse_kernel), so this is used only when a caller insists.
    return KernelConfig(block_n=128, block_k=128)


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------
def _plan(T, K, ends, cfg):
    """Python-side launch arithmetic (pure ints): per group of <= 4 segments, its first segment, first
    column, column count, segment count, program count, padded segment ends and program offsets."""
    groups = []
    col0 = 0
    for g in range(0, len(ends), _MAX_SEG_PER_LAUNCH):
        g_ends = ends[g:g + _MAX_SEG_PER_LAUNCH]
        rel = [e - col0 for e in g_ends]
        n_seg = len(rel)
        offs = [0]
        prev = 0
        for e in rel:
            offs.append(offs[-1] + -(-(e - prev) // cfg.block_n))
            prev = e
        n_prog = offs[n_seg]
        rel_p = rel + [rel[-1]] * (4 - n_seg)
        offs_p = offs[1:n_seg] + [n_prog] * (4 - n_seg)
        groups.append((g, col0, rel[-1], n_seg, n_prog, rel_p, offs_p))
        col0 = g_ends[-1]
    return groups


def _launch(x, weight_t, tau, segment_ends, bias, cfg: Optional[KernelConfig] = None):
    """Raw launch (no torch.library wrapper)."""
    T, K = x.shape
    N = weight_t.shape[1]
    ends = [int(e) for e in segment_ends]
    if cfg is None:
        cfg = choose_config(T, K, N)
    if T > 16:  # decode-sized kernel: larger batches go 16 tokens per launch (callers use dense there)
        return torch.cat([_launch(x[i:i + 16], weight_t, tau, segment_ends, bias, cfg)
                          for i in range(0, T, 16)], dim=0)
    use_dot = T > 1 or x.dtype == torch.float64
    block_t = 16 if use_dot else 1
    ieee = x.dtype == torch.float32 or _interpreting()
    y = _new_buffer((T, N), device=x.device, dtype=x.dtype)
    has_bias = bias is not None
    unused = x  # pointer for arguments a launch does not read
    nsplit = -(-K // (cfg.block_k * cfg.iters))
    split = nsplit > 1
    ws = _new_buffer((nsplit, T, N), device=x.device, dtype=torch.float32) if split else y
    for g, col0, n_cols, n_seg, n_prog, rel_p, offs_p in _plan(T, K, ends, cfg):
        w_g = weight_t if col0 == 0 else weight_t[:, col0:]
        tau_g = tau if g == 0 else tau[g:]
        b_g = (bias if col0 == 0 else bias[col0:]) if has_bias else unused
        y_g = y if col0 == 0 else y[:, col0:]
        ws_g = ws if (col0 == 0 or not split) else ws[:, :, col0:]
        _wina_tile_kernel[(n_prog, nsplit)](
            x, w_g, tau_g, b_g, y_g, ws_g, T, K,
            x.stride(0), w_g.stride(0), tau_g.stride(0), y.stride(0), ws.stride(0), ws.stride(1) if split else 0,
            rel_p[0], rel_p[1], rel_p[2], rel_p[3], offs_p[0], offs_p[1], offs_p[2],
            N_SEG=n_seg, HAS_BIAS=has_bias, USE_DOT=use_dot, IEEE=ieee, SPLIT=split, ITERS=cfg.iters,
            BLOCK_T=block_t, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    if split:
        total = T * N
        rb = 1024
        _split_reduce_kernel[(-(-total // rb),)](ws, bias if has_bias else unused, y, N, total, ws.stride(0), ws.stride(1),
                                     y.stride(0), NSPLIT=nsplit, HAS_BIAS=has_bias, BLOCK=rb, num_warps=4)
    return y


_op = None
if HAS_TRITON:
    _OP_NAME = f"winaconv::sparse_linear_v{_OP_VERSION}"
    try:
        # An opaque custom op with an explicit fake: torch.compile calls it as one extern kernel and a
        # CUDA graph records its launches. (A triton_op, which lets inductor trace the launch, made
        # compiling a 32-layer decode step take minutes: inductor analyses every call site of a user
        # kernel; benchmarks/experiments/gpu_generate_probe.py.)
        @torch.library.custom_op(_OP_NAME, mutates_args=())
        def _sparse_linear_op(x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
                              segment_ends: List[int], bias: Optional[torch.Tensor]) -> torch.Tensor:
            return _launch(x, weight_t, tau, segment_ends, bias)

        @_sparse_linear_op.register_fake
        def _(x, weight_t, tau, segment_ends, bias):
            return x.new_empty((x.shape[0], weight_t.shape[1]))
    except RuntimeError:
        # already registered by another copy of this file (package + model folder): the version
        # number in the name guarantees the same contract, reuse it.
        pass
    _op = getattr(torch.ops.winaconv, f"sparse_linear_v{_OP_VERSION}")


def sparse_linear_triton(x, weight_t, tau, segment_ends, bias=None):
    """Triton path (GPU, or CPU under TRITON_INTERPRET=1), registered as torch.ops.winaconv.sparse_linear_v2."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use sparse_linear_reference")
    _check_args(x, weight_t, tau, segment_ends, bias)
    if not x.is_contiguous():
        x = x.contiguous()
    if weight_t.stride(1) != 1:
        raise ValueError("weight_t must be contiguous along the output dimension ([in, out] row-major)")
    if tau.dtype != torch.float32 or tau.stride(1) != 1:
        tau = tau.float().contiguous()
    return _op(x, weight_t, tau, [int(e) for e in segment_ends], bias)


# ----------------------------------------------------------------------------------------------
# dispatch policy (measured on the H100; see benchmarks/kernels.md)
# ----------------------------------------------------------------------------------------------
def use_sparse_kernel(num_tokens: int, in_features: int, out_features: int) -> bool:
    """True where the sparse kernel beats dense F.linear at this batch size (sparsity-independent).

    Measured on the H100 (bf16, CUDA graphs, benchmarks/kernels.md):
      * batch 1: 0.95-1.03x of dense at 0 % sparsity, faster from 25 % on, on all four Llama-3-8B
        shapes -> sparse.  (At sparsity level 0 the caller should run dense: it knows its level.)
      * batch 2, 4, 8: slower than dense at every sparsity up to 90 % (the union of kept rows
        grows with the batch and the batched tile is slower than cuBLAS) -> dense.
      * tiny matrices (< 1M weights) are launch-bound -> dense.
    """
    if num_tokens != 1:
        return False
    return in_features * out_features >= (1 << 20)
