"""Activation-sparse linear kernel for winaconv (WINA / TEAL rule).

y[t, o] = sum_i x[t, i] * keep[t, seg(o), i] * weight_t[i, o] + bias[o]
keep[t, s, i] = |x[t, i]| > tau[s, i]          (tau already divided by the column norm for WINA)

weight_t is W^T ([in, out], contiguous) so that one input channel is one contiguous row: a dropped
channel's row is never read.  Several output segments (fused q/k/v, gate/up) with their own
thresholds share one launch.

The Triton kernel ("tile"; measurements behind every choice: docs/results.md, "Kernels"):
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
numbers in benchmarks/NOTES_kernels.md, which left the tree with their code (git history: docs/results.md,
"History").

This file must import with only torch installed (it is copied into model folders and loaded by
transformers' trust_remote_code machinery): it imports only torch, triton (optional) and the stdlib.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

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
    "launch",
    "sparse_linear_reference",
    "sparse_linear_triton",
    "use_sparse_kernel",
]

# Kernel version: part of the torch.library op name so that two different copies of this file
# loaded in one process (package + model folder) never silently share an incompatible op.
# v2: the op lost v1's `counters` argument (the retired "sem" reduction); v3: `kept_percent`.
_OP_VERSION = 3
_MAX_SEG_PER_LAUNCH = 4
_REDUCE_BLOCK_N = 128


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
    def _segment_of(pid, ends, first_programs, N_SEG: tl.constexpr):
        """Segment index, first/last+1 column and first program id of the segment owning `pid`, from the
        launch's table (LaunchGroup.ends, LaunchGroup.first_programs); the loop unrolls at compile time."""
        seg = pid * 0
        start = pid * 0
        end = pid * 0 + ends[0]
        poff = pid * 0
        for s in tl.static_range(1, N_SEG):
            c = pid >= first_programs[s - 1]
            seg = tl.where(c, s, seg)
            start = tl.where(c, ends[s - 1], start)
            end = tl.where(c, ends[s], end)
            poff = tl.where(c, first_programs[s - 1], poff)
        return seg, start, end, poff

    @triton.jit
    def _column_block(pid, ends, first_programs, N_SEG: tl.constexpr, BLOCK_N: tl.constexpr):
        """Segment, output columns and their bounds mask of column-block program `pid`."""
        seg, start, end, poff = _segment_of(pid, ends, first_programs, N_SEG)
        cols = start + (pid - poff) * BLOCK_N + tl.arange(0, BLOCK_N)
        return seg, cols, cols < end

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
    def take_ticket(tickets_ptr, block, parts):
        """True for the program that stores the block's last partial (release of its stores, acquire of the
        others'): it alone reduces, then resets the ticket (tl.atomic_xchg to 0) for the next launch."""
        tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
        return tl.atomic_add(tickets_ptr + block, 1, sem="acq_rel") == parts - 1

    @triton.jit
    def _reduce_if_last(tickets_ptr, pid, n_parts, ws_ptr, stride_part, stride_ws, b_ptr, y_ptr, stride_y,
                        t_idx, T, cols, cmask, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """The program that finishes a column block last (its ticket says so) sums the block's n_parts fp32
        partials in part order (deterministic), adds the bias, stores y and resets the ticket for the next
        launch: the reduction without a second launch."""
        if take_ticket(tickets_ptr, pid, n_parts):
            omask = (t_idx < T)[:, None] & cmask[None, :]
            offs = t_idx[:, None] * stride_ws + cols[None, :]
            total = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for part in range(0, n_parts):
                total += tl.load(ws_ptr + part * stride_part + offs, mask=omask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + t_idx[:, None] * stride_y + cols[None, :], total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(tickets_ptr + pid, 0)

    @triton.jit
    def _wina_tile_kernel(
        x_ptr, w_ptr, tau_ptr, b_ptr, y_ptr, ws_ptr, tickets_ptr,
        T, K, stride_x, stride_w, stride_tau, stride_y, stride_split, stride_ws,
        ends, first_programs,
        N_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
        SPLIT: tl.constexpr,        # False: one K split, store y directly; True: fp32 partials for the reduce
        FUSED_REDUCE: tl.constexpr,  # with SPLIT: the column block's last program reduces (else a reduce launch)
        EVICT_FIRST: tl.constexpr,
        ITERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Split-K: program (n, k) multiplies the [ITERS*BLOCK_K, BLOCK_N] tile (n, k); every load of
        the program is issued up front (no loop-carried dependency), occupancy hides the latency."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        seg, cols, cmask = _column_block(pid, ends, first_programs, N_SEG, BLOCK_N)
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
            w_ptrs = w_ptr + ks[:, None] * stride_w + cols[None, :]
            if EVICT_FIRST:  # each weight byte is read once per token: keep x, tau and the partials in L2 instead
                w = tl.load(w_ptrs, mask=row[:, None] & cmask[None, :], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=row[:, None] & cmask[None, :], other=0.0)
            acc = _accumulate(acc, xm, w, USE_DOT, IEEE)
        if USE_DOT:
            out = acc
        else:
            out = tl.sum(acc, axis=0)[None, :]
        omask = (t_idx < T)[:, None] & cmask[None, :]
        if SPLIT:
            tl.store(ws_ptr + pid_k * stride_split + t_idx[:, None] * stride_ws + cols[None, :], out, mask=omask)
            if FUSED_REDUCE:
                _reduce_if_last(tickets_ptr, pid, tl.num_programs(1), ws_ptr, stride_split, stride_ws, b_ptr, y_ptr,
                                stride_y, t_idx, T, cols, cmask, HAS_BIAS, BLOCK_T, BLOCK_N)
        else:
            if HAS_BIAS:
                out = out + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + t_idx[:, None] * stride_y + cols[None, :], out.to(y_ptr.dtype.element_ty), mask=omask)

    @triton.jit
    def _wina_list_kernel(
        x_ptr, w_ptr, tau_ptr, ws_ptr, idx_ptr, xs_ptr, tickets_ptr, b_ptr, y_ptr,
        K, KC, stride_w, stride_tau, stride_ws, stride_list_seg, stride_list_group,
        ends, first_programs,
        N_SEG: tl.constexpr, EVICT_FIRST: tl.constexpr, NUM_STAGES: tl.constexpr,
        FUSED_REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One token. Program (n, g): column block n, input channels [g*KC, (g+1)*KC).
        1. compaction: the group's kept channels (|x| > tau of the block's segment) and their x values are
           written, in channel order, to the list of (segment, group) -- every program of that pair writes the
           same values, and reads only entries it wrote itself;
        2. a software-pipelined loop over the kept rows, BLOCK_R at a time: the row indices come from the list,
           so no load waits on a keep test and the number of rows read follows the kept count;
        3. the fp32 partial of the group goes to ws[g]; the groups' partials are summed in group order either by
           the reduce launch or (FUSED_REDUCE) by the last program of the column block to finish, which it
           learns from a per-column-block ticket that it resets for the next call."""
        pid = tl.program_id(0)
        g = tl.program_id(1)
        seg, cols, cmask = _column_block(pid, ends, first_programs, N_SEG, BLOCK_N)
        rc = tl.arange(0, BLOCK_C)
        ch = g * KC + rc
        cm = (rc < KC) & (ch < K)
        xv = tl.load(x_ptr + ch, mask=cm, other=0.0).to(tl.float32)
        th = tl.load(tau_ptr + seg * stride_tau + ch, mask=cm, other=float("inf"))
        keep = tl.abs(xv) > th
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        count = tl.sum(keep.to(tl.int32), axis=0)
        list_off = seg * stride_list_seg + g * stride_list_group
        tl.store(idx_ptr + list_off + pos, ch, mask=keep)
        tl.store(xs_ptr + list_off + pos, xv, mask=keep)
        tl.debug_barrier()  # the list is read back by other threads of this program
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for r0 in tl.range(0, count, BLOCK_R, num_stages=NUM_STAGES):
            j = r0 + rr
            jm = j < count
            rows = tl.load(idx_ptr + list_off + j, mask=jm, other=0)
            xr = tl.load(xs_ptr + list_off + j, mask=jm, other=0.0)
            w_ptrs = w_ptr + rows[:, None] * stride_w + cols[None, :]
            if EVICT_FIRST:
                w = tl.load(w_ptrs, mask=jm[:, None] & cmask[None, :], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=jm[:, None] & cmask[None, :], other=0.0)
            acc += xr[:, None] * w.to(tl.float32)
        tl.store(ws_ptr + g * stride_ws + cols, tl.sum(acc, axis=0), mask=cmask)
        if FUSED_REDUCE:
            _reduce_if_last(tickets_ptr, pid, tl.num_programs(1), ws_ptr, stride_ws, 0, b_ptr, y_ptr, 0,
                            tl.arange(0, 1), 1, cols, cmask, HAS_BIAS, 1, BLOCK_N)


    @triton.jit
    def _split_reduce_kernel(ws_ptr, b_ptr, y_ptr, N, n_split, stride_split, stride_ws, stride_y,
                             HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[t, cols] = sum over the K splits of the fp32 partials (+ bias), in a fixed order: program
        (n, t) walks the splits BLOCK_S at a time, so many splits (short K tiles) still reduce in few steps."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        t = tl.program_id(1)
        cmask = cols < N
        rs = tl.arange(0, BLOCK_S)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s0 in range(0, n_split, BLOCK_S):
            ss = s0 + rs
            part = tl.load(ws_ptr + ss[:, None] * stride_split + t * stride_ws + cols[None, :],
                           mask=(ss < n_split)[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(part, axis=0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + t * stride_y + cols, acc.to(y_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# configuration (measured on the H100 and the H200: docs/results.md, "Kernels")
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Geometry of one product's launches.

    kind "tile": program = block_n output columns x (iters x block_k) input rows, weight rows loaded where kept;
    kind "list" (one token): program = block_n columns x one of `groups` channel groups, looping over the
    group's kept rows block_k at a time with num_stages loads in flight.
    fused_reduce: the partials of a column block are summed by its last program (tickets) instead of a second
    launch."""

    block_n: int = 64
    block_k: int = 512
    num_warps: int = 4
    iters: int = 1
    num_stages: int = 1
    evict_first: bool = False
    kind: str = "tile"
    groups: int = 8
    fused_reduce: bool = False


# At or under this percentage of kept input channels the kept-list kind beats the tile at batch 1
# (the H200 sweep in docs/results.md, "Kernels").
LIST_KIND_MAX_KEPT_PERCENT = 25


def choose_config(num_tokens: int, in_features: int, out_features: int, kept_percent: int = 100) -> KernelConfig:
    """Launch configuration, a pure function of the shape and of the percentage of input channels the stored
    level keeps (the same config in eager, compile and graphs)."""
    if _interpreting():
        # the interpreter runs every program in numpy: big tiles = fewer python-level steps
        return KernelConfig(block_n=512, block_k=512)
    if num_tokens == 1:
        if kept_percent <= LIST_KIND_MAX_KEPT_PERCENT:
            return KernelConfig(kind="list", block_n=256 if out_features >= 16384 else 128, block_k=32,
                                groups=4 if in_features <= 8192 else 8, num_stages=3, evict_first=True,
                                fused_reduce=True)
        return KernelConfig(block_n=64, block_k=512, evict_first=out_features != in_features)
    # batch > 1: tensor-core tile (the dispatch runs dense there: see use_sparse_kernel)
    return KernelConfig(block_n=128, block_k=128)


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------
class LaunchGroup(NamedTuple):
    """One launch of a product: up to _MAX_SEG_PER_LAUNCH consecutive output segments, their column blocks
    numbered one after the other. The two tables have fixed lengths (padded with their last value) so that
    the kernel's signature depends on the segment count (N_SEG) alone."""
    first_segment: int  # its first segment: the row of tau it starts at
    first_column: int  # its first column of weight_t and y
    n_seg: int
    n_programs: int  # column blocks of all its segments
    ends: tuple  # segment ends, relative to first_column
    first_programs: tuple  # first column block of its segments 1, 2, 3


def _launch_groups(ends, block_n) -> list[LaunchGroup]:
    """Python-side launch arithmetic (pure ints) of a product with these segment ends and column blocks."""
    groups = []
    col0 = 0
    for g in range(0, len(ends), _MAX_SEG_PER_LAUNCH):
        group_ends = ends[g:g + _MAX_SEG_PER_LAUNCH]
        rel = [e - col0 for e in group_ends]
        n_seg = len(rel)
        offs = [0]
        prev = 0
        for e in rel:
            offs.append(offs[-1] + triton.cdiv(e - prev, block_n))
            prev = e
        n_prog = offs[n_seg]
        padded_ends = rel + [rel[-1]] * (_MAX_SEG_PER_LAUNCH - n_seg)
        first_programs = offs[1:n_seg] + [n_prog] * (_MAX_SEG_PER_LAUNCH - n_seg)
        groups.append(LaunchGroup(g, col0, n_seg, n_prog, tuple(padded_ends), tuple(first_programs)))
        col0 = group_ends[-1]
    return groups


def launch(x, weight_t, tau, segment_ends, bias, cfg: Optional[KernelConfig] = None, kept_percent: int = 100):
    """The launches of one product with an explicit config (no torch.library wrapper: benchmarks and tests)."""
    T, K = x.shape
    N = weight_t.shape[1]
    ends = [int(e) for e in segment_ends]
    if cfg is None:
        cfg = choose_config(T, K, N, kept_percent)
    if T > 16:  # decode-sized kernel: larger batches go 16 tokens per launch (callers use dense there)
        return torch.cat([launch(x[i:i + 16], weight_t, tau, segment_ends, bias, cfg)
                          for i in range(0, T, 16)], dim=0)
    use_dot = T > 1 or x.dtype == torch.float64
    if cfg.kind == "list" and not use_dot:
        return _launch_list(x, weight_t, tau, ends, bias, cfg)
    block_t = 16 if use_dot else 1  # tl.dot needs 16 rows
    ieee = x.dtype == torch.float32 or _interpreting()
    y = torch.empty((T, N), device=x.device, dtype=x.dtype)
    has_bias = bias is not None
    unused = x  # pointer for arguments a launch does not read
    nsplit = triton.cdiv(K, cfg.block_k * cfg.iters)
    split = nsplit > 1
    ws = torch.empty((nsplit, T, N), device=x.device, dtype=torch.float32) if split else y
    fused = split and cfg.fused_reduce
    launches = _launch_groups(ends, cfg.block_n)
    tickets = reduction_tickets(x.device, max(group.n_programs for group in launches)) if fused else ws
    for group in launches:
        g, col0 = group.first_segment, group.first_column
        w_g = weight_t if col0 == 0 else weight_t[:, col0:]
        tau_g = tau if g == 0 else tau[g:]
        b_g = (bias if col0 == 0 else bias[col0:]) if has_bias else unused
        y_g = y if col0 == 0 else y[:, col0:]
        ws_g = ws if (col0 == 0 or not split) else ws[:, :, col0:]
        _wina_tile_kernel[(group.n_programs, nsplit)](
            x, w_g, tau_g, b_g, y_g, ws_g, tickets, T, K,
            x.stride(0), w_g.stride(0), tau_g.stride(0), y.stride(0), ws.stride(0), ws.stride(1) if split else 0,
            group.ends, group.first_programs,
            N_SEG=group.n_seg, HAS_BIAS=has_bias, USE_DOT=use_dot, IEEE=ieee, SPLIT=split, FUSED_REDUCE=fused,
            EVICT_FIRST=cfg.evict_first,
            ITERS=cfg.iters,
            BLOCK_T=block_t, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
    if split and not fused:
        _split_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N), T)](
            ws, bias if has_bias else unused, y, N, nsplit, ws.stride(0), ws.stride(1), y.stride(0),
            HAS_BIAS=has_bias, BLOCK_S=min(32, triton.next_power_of_2(nsplit)), BLOCK_N=_REDUCE_BLOCK_N, num_warps=4)
    return y


_TICKETS = {}


def reduction_tickets(device, blocks: int = 0) -> torch.Tensor:
    """Per-output-block reduction tickets (take_ticket), zero between launches (the last program of a block
    resets its ticket). One set per device: launches on one stream never overlap. Raises if a launch needs
    more than the set holds."""
    key = str(device)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1 << 14, dtype=torch.int32, device=device)
    tickets = _TICKETS[key]
    if blocks > tickets.numel():
        raise ValueError(f"{blocks} output blocks exceed the {tickets.numel()} reduction tickets")
    return tickets


def _launch_list(x, weight_t, tau, ends, bias, cfg: KernelConfig):
    """The "list" kind (one token): compaction + pipelined kept-row loop, then the fixed-order reduce."""
    K = x.shape[1]
    N = weight_t.shape[1]
    groups = max(1, min(cfg.groups, K))
    kc = triton.cdiv(K, groups)
    block_c = triton.next_power_of_2(kc)
    y = torch.empty((1, N), device=x.device, dtype=x.dtype)
    ws = torch.empty((groups, 1, N), device=x.device, dtype=torch.float32)
    idx = torch.empty((len(ends), groups, block_c), device=x.device, dtype=torch.int32)
    xs = torch.empty((len(ends), groups, block_c), device=x.device, dtype=torch.float32)
    has_bias = bias is not None
    launches = _launch_groups(ends, cfg.block_n)
    tickets = reduction_tickets(x.device, max(group.n_programs for group in launches)) if cfg.fused_reduce else idx
    for group in launches:
        g, col0 = group.first_segment, group.first_column
        w_g = weight_t if col0 == 0 else weight_t[:, col0:]
        tau_g = tau if g == 0 else tau[g:]
        ws_g = ws if col0 == 0 else ws[:, :, col0:]
        b_g = (bias if col0 == 0 else bias[col0:]) if has_bias else x
        _wina_list_kernel[(group.n_programs, groups)](
            x, w_g, tau_g, ws_g, idx[g:], xs[g:], tickets, b_g, y[:, col0:], K, kc, w_g.stride(0), tau_g.stride(0),
            ws.stride(0), idx.stride(0), idx.stride(1), group.ends, group.first_programs,
            N_SEG=group.n_seg, EVICT_FIRST=cfg.evict_first, NUM_STAGES=cfg.num_stages, FUSED_REDUCE=cfg.fused_reduce,
            HAS_BIAS=has_bias, BLOCK_C=block_c, BLOCK_R=cfg.block_k, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
    if cfg.fused_reduce:
        return y
    _split_reduce_kernel[(triton.cdiv(N, _REDUCE_BLOCK_N), 1)](
        ws, bias if bias is not None else x, y, N, groups, ws.stride(0), ws.stride(1), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_S=min(32, triton.next_power_of_2(groups)), BLOCK_N=_REDUCE_BLOCK_N,
        num_warps=4)
    return y


_OPAQUE_OPS = {}  # each op this copy defined: torch holds a definition only weakly


def opaque_op(name: str, call, fake):
    """`call` as torch.ops.winaconv.<name>: an opaque custom op (its schema from `call`'s annotations) with an
    explicit `fake`, so torch.compile calls it as one extern kernel and a CUDA graph records its launches. (A
    triton_op, which lets inductor trace the launch, made compiling a whole decode step very slow: inductor
    analyses every call site of a user kernel.)
    Another copy of a runtime file (the package and a model folder's copy) finds the op defined and uses it: the
    version number in the name guarantees the same contract. It must not define it again: torch then destroys the
    first definition, and the op handles the first copy holds point at a freed operator (the CI failures that
    ended in std::bad_alloc, a SIGSEGV or "vector::reserve" in kernel tests run after a model folder's copy was
    imported)."""
    try:
        return getattr(torch.ops.winaconv, name)
    except (AttributeError, RuntimeError):  # not defined in this process yet
        pass
    definition = torch.library.custom_op(f"winaconv::{name}", mutates_args=())(call)
    definition.register_fake(fake)
    _OPAQUE_OPS[name] = definition
    return getattr(torch.ops.winaconv, name)


def _sparse_linear_call(x: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor, segment_ends: List[int],
                        bias: Optional[torch.Tensor], kept_percent: int) -> torch.Tensor:
    return launch(x, weight_t, tau, segment_ends, bias, kept_percent=kept_percent)


def _sparse_linear_fake(x, weight_t, tau, segment_ends, bias, kept_percent):
    return x.new_empty((x.shape[0], weight_t.shape[1]))


_op = opaque_op(f"sparse_linear_v{_OP_VERSION}", _sparse_linear_call, _sparse_linear_fake) if HAS_TRITON else None


def sparse_linear_triton(x, weight_t, tau, segment_ends, bias=None, kept_percent: int = 100):
    """Triton path (GPU, or CPU under TRITON_INTERPRET=1), registered as torch.ops.winaconv.sparse_linear_v3.
    kept_percent: the share of input channels the stored level keeps (it picks the kernel kind)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use sparse_linear_reference")
    _check_args(x, weight_t, tau, segment_ends, bias)
    if not x.is_contiguous():
        x = x.contiguous()
    if weight_t.stride(1) != 1:
        raise ValueError("weight_t must be contiguous along the output dimension ([in, out] row-major)")
    if tau.dtype != torch.float32 or tau.stride(1) != 1:
        tau = tau.float().contiguous()
    ends = [int(e) for e in segment_ends]
    return _op(x, weight_t, tau, ends, bias, int(kept_percent))


# ----------------------------------------------------------------------------------------------
# dispatch policy (measured on the H100: docs/results.md, "Kernels")
# ----------------------------------------------------------------------------------------------
def use_sparse_kernel(num_tokens: int, in_features: int, out_features: int) -> bool:
    """True where the sparse kernel beats dense F.linear at this batch size (sparsity-independent; the
    measurements are in docs/results.md, "Kernels"):
      * batch 1: about dense at sparsity 0, faster at the calibrated levels, on all four Llama-3-8B
        shapes -> sparse.  (At sparsity level 0 the caller should run dense: it knows its level.)
      * batch > 1: slower than dense at every level (the union of kept rows grows with the batch and
        the batched tile is slower than cuBLAS) -> dense.
      * tiny matrices (under 2^20 weights) are launch-bound -> dense.
    """
    if num_tokens != 1:
        return False
    return in_features * out_features >= (1 << 20)
