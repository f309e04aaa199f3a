"""Activation-sparse linear kernels for winaconv (WINA / TEAL rule).

y[t, o] = sum_i x[t, i] * keep[t, seg(o), i] * weight_t[i, o] + bias[o]
keep[t, s, i] = |x[t, i]| > tau[s, i]          (tau already divided by the column norm for WINA)

weight_t is W^T ([in, out], contiguous) so that one input channel is one contiguous row: a dropped
channel's row is never read.  Several output segments (fused q/k/v, gate/up) with their own
thresholds share one launch.

Design of the Triton kernel (measurements behind it: benchmarks/kernels.md, NOTES_kernels.md):
  * default ("tile"): grid = (column blocks of all segments, K tiles); program (n, k) multiplies one
    [BLOCK_K rows, BLOCK_N cols] tile with every load issued up front.  A weight row is loaded only
    when some token of the batch keeps that channel (predicated loads skip the memory traffic), so at
    batch > 1 a kept row is read ONCE for all tokens and each token multiplies with its own masked
    activations (a [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tensor-core product, rows >= T are zero); at
    batch 1 the product is FMA in fp32;
  * the K partials (fp32, uninitialised workspace) are summed in a fixed order by a small second
    launch ("two_pass", default) or by the last-arriving program of each column block ("sem",
    self-resetting int32 tickets): deterministic, no float atomics, no memset;
  * "stream": one launch, a program walks all K with a hand-written software pipeline (kept as an
    option; slower on the H100);
  * "gather" (opt-in via KernelConfig: on the H100 it beats the tile kernel only from 80 % sparsity,
    gate+up from 65 %, and loses at 25-50 %, benchmarks/kernels.md): a compaction
    launch writes, per segment and per block of `cblock` input channels, the indices of the channels
    some token keeps (prefix-sum ranks, no atomics) and their count; a persistent launch (fixed grid
    = progs x SMs, work count read on the device) streams tiles of block_k KEPT rows, so the rows in
    flight per program no longer shrink with sparsity; a third launch sums only the partials that
    exist this call, in a fixed order.  Per-segment compaction (not the union of segments): each
    segment reads only its own kept rows;
  * all loads are bounds-checked on both dimensions (any in/out, segment ends not multiples of the
    block); up to 4 segments per launch, more segments take more launches.

This file must import with only torch installed (it is copied into model folders and loaded by
transformers' trust_remote_code machinery): it imports only torch, triton (optional) and the stdlib.
"""
from __future__ import annotations

import os
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
    "sparse_linear_reference",
    "sparse_linear_triton",
    "use_sparse_kernel",
]

# Kernel version: part of the torch.library op name so that two different copies of this file
# loaded in one process (package + model folder) never silently share an incompatible op.
_OP_VERSION = 1
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


def sparse_linear_reference(x, weight_t, tau, segment_ends, bias=None):
    """Exact rule in plain torch (any device / dtype); fp32 accumulation, returns x.dtype."""
    ends = _check_args(x, weight_t, tau, segment_ends, bias)
    xf = x.float()
    ax = xf.abs()
    tau = tau.to(device=x.device, dtype=torch.float32)
    outs = []
    start = 0
    for s, end in enumerate(ends):
        xm = torch.where(ax > tau[s], xf, torch.zeros((), dtype=xf.dtype, device=xf.device))
        outs.append(xm @ weight_t[:, start:end].float())
        start = end
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


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
    def _epilogue(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, pid, pid_k, cols, cmask, t_idx, T,
                  stride_y, stride_split, stride_ws,
                  HAS_BIAS: tl.constexpr, RED: tl.constexpr, NSPLIT: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """Store a program's [BLOCK_T, BLOCK_N] fp32 result: directly (RED 0, one K split), as a
        partial for the reduce launch (RED 1), or as a partial that the last-arriving program of the
        column block sums in a fixed order (RED 2, self-resetting int32 tickets)."""
        omask = (t_idx < T)[:, None] & cmask[None, :]
        if RED == 0:
            if HAS_BIAS:
                out = out + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + t_idx[:, None] * stride_y + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)
        else:
            ws_off = t_idx[:, None] * stride_ws + cols[None, :]
            tl.store(ws_ptr + pid_k * stride_split + ws_off, out, mask=omask)
            if RED == 2:
                tl.debug_barrier()  # every thread's partial is written before the release below
                ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
                if ticket == NSPLIT - 1:  # last program of this column block: fixed-order sum
                    tot = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                    for s in tl.static_range(NSPLIT):
                        tot += tl.load(ws_ptr + s * stride_split + ws_off, mask=omask, other=0.0,
                                       cache_modifier=".cg")
                    if HAS_BIAS:
                        tot = tot + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_ptr + t_idx[:, None] * stride_y + cols[None, :], tot.to(y_ptr.dtype.element_ty),
                             mask=omask)
                    tl.atomic_xchg(cnt_ptr + pid, 0)  # self-resetting: ready for the next call

    @triton.jit
    def _wina_stream_kernel(
        x_ptr, w_ptr, tau_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        T, K, KSPAN, stride_x, stride_w, stride_tau, stride_y, stride_split, stride_ws,
        e0, e1, e2, e3, o1, o2, o3,
        N_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
        RED: tl.constexpr, NSPLIT: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Program (n, k) owns BLOCK_N columns and streams the KSPAN input rows of split k with a
        hand-written software pipeline: the weights of tile j+1 and the activations/thresholds of
        tile j+2 are in flight while tile j is accumulated, so the only exposed latency is the first
        tile's.  The K splits give the grid enough programs to fill the GPU (several per SM)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        seg, start, end, poff = _segment_of(pid, e0, e1, e2, e3, o1, o2, o3, N_SEG)
        cols = start + (pid - poff) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < end
        t_idx = tl.arange(0, BLOCK_T)
        tau_row = tau_ptr + seg * stride_tau
        rk = tl.arange(0, BLOCK_K)
        w_cols = w_ptr + cols[None, :]
        k_lo = pid_k * KSPAN
        k_hi = tl.minimum(K, k_lo + KSPAN)  # rows >= k_hi are masked out of every load

        xm0, row0 = _masked_x(x_ptr, tau_row, k_lo + rk, k_hi, t_idx, T, stride_x, USE_DOT)
        w0 = tl.load(w_cols + (k_lo + rk)[:, None] * stride_w, mask=row0[:, None] & cmask[None, :], other=0.0)
        xm1, row1 = _masked_x(x_ptr, tau_row, k_lo + BLOCK_K + rk, k_hi, t_idx, T, stride_x, USE_DOT)
        if USE_DOT:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks1 = k0 + BLOCK_K + rk
            w1 = tl.load(w_cols + ks1[:, None] * stride_w, mask=row1[:, None] & cmask[None, :], other=0.0)
            xm2, row2 = _masked_x(x_ptr, tau_row, k0 + 2 * BLOCK_K + rk, k_hi, t_idx, T, stride_x, USE_DOT)
            acc = _accumulate(acc, xm0, w0, USE_DOT, IEEE)
            xm0 = xm1
            w0 = w1
            xm1 = xm2
            row1 = row2
        if USE_DOT:
            out = acc
        else:
            out = tl.sum(acc, axis=0)[None, :]
        _epilogue(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, pid, pid_k, cols, cmask, t_idx, T,
                  stride_y, stride_split, stride_ws, HAS_BIAS, RED, NSPLIT, BLOCK_T, BLOCK_N)

    @triton.jit
    def _wina_tile_kernel(
        x_ptr, w_ptr, tau_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
        T, K, stride_x, stride_w, stride_tau, stride_y, stride_split, stride_ws,
        e0, e1, e2, e3, o1, o2, o3,
        N_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
        RED: tl.constexpr,          # 0: direct (one K split) 1: partials for a reduce launch 2: last program reduces
        NSPLIT: tl.constexpr, ITERS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Split-K: program (n, k) multiplies the [ITERS*BLOCK_K, BLOCK_N] tile (n, k); every load of
        the program is issued up front (no loop-carried dependency), occupancy hides the latency.
        The K partials are reduced in a fixed order (deterministic), never with float atomics."""
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
        _epilogue(out, y_ptr, ws_ptr, cnt_ptr, b_ptr, pid, pid_k, cols, cmask, t_idx, T,
                  stride_y, stride_split, stride_ws, HAS_BIAS, RED, NSPLIT, BLOCK_T, BLOCK_N)

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


    # ------------------------------------------------------------------------------------------
    # "gather" variant: compact the kept rows first, then stream only kept rows
    # ------------------------------------------------------------------------------------------
    @triton.jit
    def _wina_compact_kernel(x_ptr, tau_ptr, idx_ptr, cnt_ptr, T, K, stride_x, stride_tau, stride_idx,
                             stride_cnt, TB: tl.constexpr, CB: tl.constexpr):
        """Program (s, b): input channels [b*CB, (b+1)*CB) of segment s.  A channel is kept when
        some token of the batch keeps it (|x[t,i]| > tau[s,i], the union over the batch); its index
        is written at its rank among the kept channels of the block (idx[s, b*CB + rank]) and the
        block's kept count at cnt[s, b].  Entries past the count are left unwritten (never read).
        No atomics: ranks come from a prefix sum, so the output is deterministic."""
        s = tl.program_id(0)
        b = tl.program_id(1)
        r = tl.arange(0, CB)
        ks = b * CB + r
        km = ks < K
        th = tl.load(tau_ptr + s * stride_tau + ks, mask=km, other=float("inf"))
        keep = tl.zeros((CB,), dtype=tl.int32)
        for t in tl.static_range(TB):  # all loads issued up front; tokens >= T predicated off
            xv = tl.load(x_ptr + t * stride_x + ks, mask=km & ((r * 0 + t) < T), other=0.0).to(tl.float32)
            keep = keep | (tl.abs(xv) > th).to(tl.int32)
        rank = tl.cumsum(keep, axis=0) - 1
        tl.store(idx_ptr + s * stride_idx + b * CB + rank, ks, mask=keep > 0)
        tl.store(cnt_ptr + s * stride_cnt + b, tl.sum(keep, axis=0))

    @triton.jit
    def _seg_tiles(cnt_ptr, s, stride_cnt, NBLK, NB: tl.constexpr, BLOCK_K: tl.constexpr):
        """Per compaction block of segment s: kept count, tiles (of BLOCK_K kept rows) and the
        inclusive prefix of tiles; plus the segment's total tile count."""
        bo = tl.arange(0, NB)
        c = tl.load(cnt_ptr + s * stride_cnt + bo, mask=bo < NBLK, other=0)
        tiles = (c + BLOCK_K - 1) // BLOCK_K
        cum = tl.cumsum(tiles, axis=0)
        return c, tiles, cum, tl.sum(tiles, axis=0)

    @triton.jit
    def _into_segment(sel, new_seg, col_start, col_end, items_before, counts, tiles, cum_tiles,
                      seg, start, end, wl, cv, tv, cu):
        """Where `sel`, the work item belongs to segment new_seg (columns [col_start, col_end), its
        numbering starting after the previous segment's items_before items, its compaction counts,
        tiles and cumulative tiles): the gather kernel's walk from one segment to the next."""
        return (tl.where(sel, new_seg, seg), tl.where(sel, col_start, start), tl.where(sel, col_end, end),
                tl.where(sel, wl - items_before, wl), tl.where(sel, counts, cv), tl.where(sel, tiles, tv),
                tl.where(sel, cum_tiles, cu))

    @triton.jit
    def _wina_gather_kernel(
        x_ptr, w_ptr, tau_ptr, ws_ptr, idx_ptr, cnt_ptr,
        T, K, stride_x, stride_w, stride_tau, stride_idx, stride_cnt, stride_split, stride_ws,
        e0, e1, e2, e3, NBLK, NPROG,
        N_SEG: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Persistent grid of NPROG programs (fixed by the host; the work count lives on the device).
        Work item = (segment, tile of BLOCK_K KEPT rows, column block); items are numbered segment
        by segment, tile-major, so neighbouring programs share a tile's rows (x, indices) and read
        adjacent columns of the same weight rows.  Each item writes an fp32 partial
        ws[tile, t, cols]; _gather_reduce_kernel sums the valid ones in a fixed order."""
        pid = tl.program_id(0)
        bo = tl.arange(0, NB)
        c0, tl0, cu0, nt0 = _seg_tiles(cnt_ptr, 0, stride_cnt, NBLK, NB, BLOCK_K)
        w0 = nt0 * ((e0 + BLOCK_N - 1) // BLOCK_N)
        c1, tl1, cu1, nt1, w1 = c0, tl0, cu0, nt0, w0 * 0
        c2, tl2, cu2, nt2, w2 = c0, tl0, cu0, nt0, w0 * 0
        c3, tl3, cu3, nt3, w3 = c0, tl0, cu0, nt0, w0 * 0
        if N_SEG > 1:
            c1, tl1, cu1, nt1 = _seg_tiles(cnt_ptr, 1, stride_cnt, NBLK, NB, BLOCK_K)
            w1 = nt1 * ((e1 - e0 + BLOCK_N - 1) // BLOCK_N)
        if N_SEG > 2:
            c2, tl2, cu2, nt2 = _seg_tiles(cnt_ptr, 2, stride_cnt, NBLK, NB, BLOCK_K)
            w2 = nt2 * ((e2 - e1 + BLOCK_N - 1) // BLOCK_N)
        if N_SEG > 3:
            c3, tl3, cu3, nt3 = _seg_tiles(cnt_ptr, 3, stride_cnt, NBLK, NB, BLOCK_K)
            w3 = nt3 * ((e3 - e2 + BLOCK_N - 1) // BLOCK_N)
        total = w0 + w1 + w2 + w3
        t_idx = tl.arange(0, BLOCK_T)
        tmask = t_idx < T
        rk = tl.arange(0, BLOCK_K)
        for wi in range(pid, total, NPROG):
            # which segment (scalars) and which of its compaction blocks / tiles (vectors)
            seg = wi * 0
            start = wi * 0
            end = wi * 0 + e0
            wl = wi
            cv, tv, cu = c0, tl0, cu0
            if N_SEG > 1:
                seg, start, end, wl, cv, tv, cu = _into_segment(
                    wl >= w0, 1, e0, e1, w0, c1, tl1, cu1, seg, start, end, wl, cv, tv, cu)
            if N_SEG > 2:
                seg, start, end, wl, cv, tv, cu = _into_segment(
                    (seg == 1) & (wl >= w1), 2, e1, e2, w1, c2, tl2, cu2, seg, start, end, wl, cv, tv, cu)
            if N_SEG > 3:
                seg, start, end, wl, cv, tv, cu = _into_segment(
                    (seg == 2) & (wl >= w2), 3, e2, e3, w2, c3, tl3, cu3, seg, start, end, wl, cv, tv, cu)
            ncol = (end - start + BLOCK_N - 1) // BLOCK_N
            tile = wl // ncol
            cb = wl - tile * ncol
            blk = tl.sum((cu <= tile).to(tl.int32), axis=0)           # compaction block of this tile
            first = tl.sum(tl.where(bo < blk, tv, 0), axis=0)          # tiles in earlier blocks
            nkeep = tl.sum(tl.where(bo == blk, cv, 0), axis=0)         # kept rows in this block
            p = (tile - first) * BLOCK_K + rk                          # ranks inside the block
            rm = p < nkeep
            ks = tl.load(idx_ptr + seg * stride_idx + blk * CB + p, mask=rm, other=0)
            rm = rm & (ks >= 0) & (ks < K)                             # bounds, whatever is in idx
            cols = start + cb * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < end
            w = tl.load(w_ptr + ks[:, None] * stride_w + cols[None, :], mask=rm[:, None] & cmask[None, :],
                        other=0.0)
            if USE_DOT:
                xt = tl.load(x_ptr + t_idx[:, None] * stride_x + ks[None, :], mask=tmask[:, None] & rm[None, :],
                             other=0.0)
                th = tl.load(tau_ptr + seg * stride_tau + ks, mask=rm, other=float("inf"))
                xm = tl.where(tl.abs(xt.to(tl.float32)) > th[None, :], xt, tl.zeros_like(xt))
                acc = _accumulate(tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), xm, w, USE_DOT, IEEE)
                out = acc
            else:
                # one token: every compacted row is kept by it (same comparison as the compaction)
                xv = tl.load(x_ptr + ks, mask=rm, other=0.0).to(tl.float32)
                out = tl.sum(xv[:, None] * w.to(tl.float32), axis=0)[None, :]
            tl.store(ws_ptr + tile * stride_split + t_idx[:, None] * stride_ws + cols[None, :], out,
                     mask=tmask[:, None] & cmask[None, :])

    @triton.jit
    def _gather_reduce_kernel(ws_ptr, b_ptr, y_ptr, cnt_ptr, N, total, stride_split, stride_ws, stride_y,
                              stride_cnt, e0, e1, e2, NBLK,
                              N_SEG: tl.constexpr, NSPLIT: tl.constexpr, NB: tl.constexpr, BLOCK_K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
        """y[t, n] = sum of the valid partials of n's segment (tiles 0..ntiles-1, fixed order) + bias;
        partials of tiles that do not exist this call are neither written nor read."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < total
        t = offs // N
        n = offs - t * N
        _c, _t, _u, nt = _seg_tiles(cnt_ptr, 0, stride_cnt, NBLK, NB, BLOCK_K)
        ntc = n * 0 + nt
        ntmax = nt
        if N_SEG > 1:
            _c, _t, _u, nt = _seg_tiles(cnt_ptr, 1, stride_cnt, NBLK, NB, BLOCK_K)
            ntc = tl.where(n >= e0, nt, ntc)
            ntmax = tl.maximum(ntmax, nt)
        if N_SEG > 2:
            _c, _t, _u, nt = _seg_tiles(cnt_ptr, 2, stride_cnt, NBLK, NB, BLOCK_K)
            ntc = tl.where(n >= e1, nt, ntc)
            ntmax = tl.maximum(ntmax, nt)
        if N_SEG > 3:
            _c, _t, _u, nt = _seg_tiles(cnt_ptr, 3, stride_cnt, NBLK, NB, BLOCK_K)
            ntc = tl.where(n >= e2, nt, ntc)
            ntmax = tl.maximum(ntmax, nt)
        ntc = tl.minimum(ntc, NSPLIT)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        # fixed order s = 0, 1, 2, ... (deterministic); UNROLL loads in flight per step, and only as many
        # steps as the largest tile count of this call (no reads of partials that were not written)
        for s0 in range(0, tl.minimum(ntmax, NSPLIT), UNROLL):
            for u in tl.static_range(UNROLL):
                sp = s0 + u
                acc += tl.load(ws_ptr + sp * stride_split + t * stride_ws + n, mask=m & (sp < ntc), other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * stride_y + n, acc.to(y_ptr.dtype.element_ty), mask=m)

# ----------------------------------------------------------------------------------------------
# configuration (measured on the H100, see benchmarks/kernels.md)
# ----------------------------------------------------------------------------------------------
class KernelConfig(tuple):
    """kind: 'stream' (one launch, full K per program), 'tile' (split-K tiles) or 'gather'
    (compact the kept rows, then a persistent grid streams tiles of block_k KEPT rows);
    red (tile only): 'two_pass' (partials + reduce launch) or 'sem' (last program reduces);
    cblock (gather only): input channels per compaction block (power of 2; tiles never cross a block);
    progs (gather only): persistent programs per SM (grid = progs * SMs, capped by the dense work)."""

    __slots__ = ()

    def __new__(cls, kind="tile", block_n=64, block_k=256, num_warps=4, iters=1, red="two_pass", num_stages=1,
                cblock=4096, progs=2):
        return tuple.__new__(cls, (str(kind), int(block_n), int(block_k), int(num_warps), int(iters), str(red),
                                   int(num_stages), int(cblock), int(progs)))

    kind = property(lambda s: s[0])
    block_n = property(lambda s: s[1])
    block_k = property(lambda s: s[2])
    num_warps = property(lambda s: s[3])
    iters = property(lambda s: s[4])
    red = property(lambda s: s[5])
    num_stages = property(lambda s: s[6])
    cblock = property(lambda s: s[7])
    progs = property(lambda s: s[8])


_FORCE_CONFIG: Optional[KernelConfig] = None  # benchmarks / tests only


def choose_config(num_tokens: int, in_features: int, out_features: int) -> KernelConfig:
    """Launch configuration, a pure function of the shape (same config in eager, compile, graphs)."""
    if _FORCE_CONFIG is not None:
        return _FORCE_CONFIG
    if _interpreting():
        # the interpreter runs every program in numpy: big tiles = fewer python-level steps
        return KernelConfig("tile", 512, 512, 4, 1, "two_pass")
    if num_tokens == 1:
        # best of 13 candidates on all four Llama-3-8B shapes (graph-timed sweep, kernel_h100.txt);
        # 'sem' was equal within noise, two_pass keeps the op stateless (no mutated ticket buffer,
        # which made inductor skip its cudagraphs).
        return KernelConfig("tile", 64, 512, 4, 1, "two_pass")
    # batch > 1: tensor-core tile, best of 8 candidates -- but still slower than dense on the
    # H100 (see use_sparse_kernel), so this is used only when a caller insists.
    return KernelConfig("tile", 128, 128, 4, 1, "two_pass")


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------
_COUNTERS = {}
_N_COUNTERS = 1 << 16


def _counters(device):
    """Zero-initialised int32 tickets for RED == 'sem' (self-resetting, allocated once per device,
    never inside a CUDA-graph capture).  Not safe for two launches running concurrently on two streams."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(_N_COUNTERS, dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _plan(T, K, ends, cfg):
    """Python-side launch arithmetic (pure ints)."""
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


_SM_COUNT = {}


def _num_sms(device) -> int:
    """Streaming multiprocessors of `device` (cached; the CPU interpreter gets a small fixed grid)."""
    if device.type != "cuda":
        return 2
    key = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(key)
    if n is None:
        n = int(torch.cuda.get_device_properties(key).multi_processor_count)
        _SM_COUNT[key] = n
    return n


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _gather_geometry(K: int, cfg: KernelConfig):
    """(compaction block, kept rows per tile, blocks, blocks rounded to a power of 2, max tiles per segment)."""
    if cfg.cblock & (cfg.cblock - 1) or cfg.block_k & (cfg.block_k - 1) or cfg.block_n & (cfg.block_n - 1):
        raise ValueError(f"gather config needs powers of 2 for block_n, block_k and cblock: {tuple(cfg)}")
    cb = min(cfg.cblock, _pow2_at_least(K))
    bk = min(cfg.block_k, cb)
    nblk = -(-K // cb)
    return cb, bk, nblk, _pow2_at_least(nblk), nblk * (cb // bk)


def _launch_gather(x, weight_t, tau, ends, bias, cfg, wrap, y, use_dot, block_t, ieee):
    """Three launches, no host sync, grid sizes a pure function of the shape:
    (1) compaction of the kept rows per segment and per block of cblock input channels (union over
    the batch); (2) persistent gather kernel: fixed grid, device-side work count, each work item one
    tile of block_k kept rows x block_n columns -> fp32 partial; (3) reduce of the partials that
    exist (count read on the device), fixed order, + bias."""
    T, K = x.shape
    N = weight_t.shape[1]
    n_seg = len(ends)
    cb, bk, nblk, nb, nsplit = _gather_geometry(K, cfg)
    idx = _new_buffer((n_seg, nblk * cb), device=x.device, dtype=torch.int32)
    cnt = _new_buffer((n_seg, nblk), device=x.device, dtype=torch.int32)
    compact = _wina_compact_kernel if wrap is None else wrap(_wina_compact_kernel)
    compact[(n_seg, nblk)](x, tau, idx, cnt, T, K, x.stride(0), tau.stride(0), idx.stride(0), cnt.stride(0),
                           TB=_pow2_at_least(T), CB=cb, num_warps=4 if cb <= 1024 else 8)
    ws = _new_buffer((nsplit, T, N), device=x.device, dtype=torch.float32)
    gather = _wina_gather_kernel if wrap is None else wrap(_wina_gather_kernel)
    reduce_k = _gather_reduce_kernel if wrap is None else wrap(_gather_reduce_kernel)
    has_bias = bias is not None
    n_sms = _num_sms(x.device)
    for g, col0, n_cols, n_seg_g, n_prog, rel_p, offs_p in _plan(T, K, ends, cfg):
        w_g = weight_t if col0 == 0 else weight_t[:, col0:]
        tau_g = tau if g == 0 else tau[g:]
        idx_g = idx if g == 0 else idx[g:]
        cnt_g = cnt if g == 0 else cnt[g:]
        b_g = (bias if col0 == 0 else bias[col0:]) if has_bias else x
        y_g = y if col0 == 0 else y[:, col0:]
        ws_g = ws if col0 == 0 else ws[:, :, col0:]
        grid = max(1, min(cfg.progs * n_sms, n_prog * nsplit))
        gather[(grid,)](
            x, w_g, tau_g, ws_g, idx_g, cnt_g, T, K,
            x.stride(0), w_g.stride(0), tau_g.stride(0), idx.stride(0), cnt.stride(0), ws.stride(0), ws.stride(1),
            rel_p[0], rel_p[1], rel_p[2], rel_p[3], nblk, grid,
            N_SEG=n_seg_g, USE_DOT=use_dot, IEEE=ieee, NB=nb, CB=cb, BLOCK_T=block_t, BLOCK_K=bk,
            BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        total = T * n_cols
        rb = 256
        reduce_k[(-(-total // rb),)](
            ws_g, b_g, y_g, cnt_g, n_cols, total, ws.stride(0), ws.stride(1), y.stride(0), cnt.stride(0),
            rel_p[0], rel_p[1], rel_p[2], nblk,
            N_SEG=n_seg_g, NSPLIT=nsplit, NB=nb, BLOCK_K=bk, HAS_BIAS=has_bias, BLOCK=rb, UNROLL=8, num_warps=4)
    return y


def _stream_span(K: int, n_col_blocks: int, cfg: "KernelConfig", device) -> int:
    """Input rows per K split of the stream kind: enough splits that the grid has about
    cfg.progs programs per SM, each split a whole number of BLOCK_K tiles (a pure function of the
    shape and the device, so eager, compiled and graphed calls launch the same grid)."""
    tiles = -(-K // cfg.block_k)
    want = max(1, -(-cfg.progs * _num_sms(device) // max(1, n_col_blocks)))
    per_split = -(-tiles // min(tiles, want))
    return per_split * cfg.block_k


def _launch(x, weight_t, tau, segment_ends, bias, cfg: Optional[KernelConfig] = None, wrap=None, counters=None):
    """Raw launch (no torch.library wrapper). `wrap` is torch.library.wrap_triton inside the op."""
    T, K = x.shape
    N = weight_t.shape[1]
    ends = [int(e) for e in segment_ends]
    if cfg is None:
        cfg = choose_config(T, K, N)
    if T > 16:  # decode-sized kernel: larger batches go 16 tokens per launch (callers use dense there)
        return torch.cat([_launch(x[i:i + 16], weight_t, tau, segment_ends, bias, cfg, wrap, counters)
                          for i in range(0, T, 16)], dim=0)
    use_dot = T > 1 or x.dtype == torch.float64
    block_t = 16 if use_dot else 1
    ieee = x.dtype == torch.float32 or _interpreting()
    y = _new_buffer((T, N), device=x.device, dtype=x.dtype)
    has_bias = bias is not None
    bn, bk = cfg.block_n, cfg.block_k
    w_def = x  # dummy pointer for unused arguments

    if cfg.kind == "gather":
        return _launch_gather(x, weight_t, tau, ends, bias, cfg, wrap, y, use_dot, block_t, ieee)

    stream = cfg.kind == "stream"
    if stream:
        kernel = _wina_stream_kernel if wrap is None else wrap(_wina_stream_kernel)
        kt = _stream_span(K, sum(grp[4] for grp in _plan(T, K, ends, cfg)), cfg, x.device)
    else:
        kernel = _wina_tile_kernel if wrap is None else wrap(_wina_tile_kernel)
        kt = bk * cfg.iters
    nsplit = -(-K // kt)
    red = 0 if nsplit == 1 else (2 if cfg.red == "sem" else 1)
    if red == 2 and counters is None:
        if wrap is not None:
            red = 1  # inside the op: the caller decides (no tensor creation behind torch.compile's back)
        else:
            counters = _counters(x.device)
            if counters is None:
                red = 1
    ws = _new_buffer((nsplit, T, N), device=x.device, dtype=torch.float32) if red else y
    cnt = counters if red == 2 else x
    for g, col0, n_cols, n_seg, n_prog, rel_p, offs_p in _plan(T, K, ends, cfg):
        w_g = weight_t if col0 == 0 else weight_t[:, col0:]
        tau_g = tau if g == 0 else tau[g:]
        b_g = (bias if col0 == 0 else bias[col0:]) if has_bias else w_def
        y_g = y if col0 == 0 else y[:, col0:]
        ws_g = ws if (col0 == 0 or not red) else ws[:, :, col0:]
        if red == 2 and n_prog > _N_COUNTERS:
            raise ValueError("too many column blocks for the ticket buffer")
        strides = (x.stride(0), w_g.stride(0), tau_g.stride(0), y.stride(0), ws.stride(0), ws.stride(1) if red else 0)
        segments = (rel_p[0], rel_p[1], rel_p[2], rel_p[3], offs_p[0], offs_p[1], offs_p[2])
        shape_args = (T, K, kt) if stream else (T, K)
        extra = {} if stream else {"ITERS": cfg.iters}
        kernel[(n_prog, nsplit)](
            x, w_g, tau_g, b_g, y_g, ws_g, cnt, *shape_args, *strides, *segments,
            N_SEG=n_seg, HAS_BIAS=has_bias, USE_DOT=use_dot, IEEE=ieee, RED=red, NSPLIT=nsplit, **extra,
            BLOCK_T=block_t, BLOCK_K=bk, BLOCK_N=bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if red == 1:
        reduce_k = _split_reduce_kernel if wrap is None else wrap(_split_reduce_kernel)
        total = T * N
        rb = 1024
        reduce_k[(-(-total // rb),)](ws, bias if has_bias else w_def, y, N, total, ws.stride(0), ws.stride(1),
                                     y.stride(0), NSPLIT=nsplit, HAS_BIAS=has_bias, BLOCK=rb, num_warps=4)
    return y


_op = None
if HAS_TRITON:
    _OP_NAME = f"winaconv::sparse_linear_v{_OP_VERSION}"
    try:
        if not _interpreting():
            # GPU: triton_op + wrap_triton, so torch.compile traces the launch (and its fake) and
            # CUDA graphs capture it.
            @torch.library.triton_op(_OP_NAME, mutates_args=("counters",))
            def _sparse_linear_op(x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
                                  segment_ends: List[int], bias: Optional[torch.Tensor],
                                  counters: Optional[torch.Tensor]) -> torch.Tensor:
                # counters: self-resetting tickets of the 'sem' reduction (left as found), or None
                return _launch(x, weight_t, tau, segment_ends, bias, wrap=torch.library.wrap_triton,
                               counters=counters)
        else:
            # TRITON_INTERPRET=1 (CPU tests): wrap_triton cannot trace interpreted kernels, so the op
            # is an opaque custom op with an explicit fake implementation instead.
            @torch.library.custom_op(_OP_NAME, mutates_args=("counters",))
            def _sparse_linear_op(x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
                                  segment_ends: List[int], bias: Optional[torch.Tensor],
                                  counters: Optional[torch.Tensor]) -> torch.Tensor:
                return _launch(x, weight_t, tau, segment_ends, bias, counters=counters)

            @_sparse_linear_op.register_fake
            def _(x, weight_t, tau, segment_ends, bias, counters):
                return x.new_empty((x.shape[0], weight_t.shape[1]))
    except RuntimeError:
        # already registered by another copy of this file (package + model folder): the version
        # number in the name guarantees the same contract, reuse it.
        pass
    _op = getattr(torch.ops.winaconv, f"sparse_linear_v{_OP_VERSION}")


def sparse_linear_triton(x, weight_t, tau, segment_ends, bias=None):
    """Triton path (GPU, or CPU under TRITON_INTERPRET=1), registered as torch.ops.winaconv.sparse_linear_v1."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use sparse_linear_reference")
    _check_args(x, weight_t, tau, segment_ends, bias)
    if not x.is_contiguous():
        x = x.contiguous()
    if weight_t.stride(1) != 1:
        raise ValueError("weight_t must be contiguous along the output dimension ([in, out] row-major)")
    if tau.dtype != torch.float32 or tau.stride(1) != 1:
        tau = tau.float().contiguous()
    cfg = choose_config(x.shape[0], x.shape[1], weight_t.shape[1])
    counters = None
    if cfg.kind in ("tile", "stream") and cfg.red == "sem":
        counters = _counters(x.device)  # None while capturing before first use: falls back to two_pass
    return _op(x, weight_t, tau, [int(e) for e in segment_ends], bias, counters)


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
